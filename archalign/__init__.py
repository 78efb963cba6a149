"""archalign: move trained weights between PyTorch models whose parameter names do not line up."""

from .apply import apply_plan
from .cost import CostWeights
from .errors import (
    AlignError,
    ApplyError,
    ArchalignError,
    PlanError,
    RunError,
    SourceError,
    StrictError,
    UsageError,
)
from .hints import Hints
from .outputs import save_model
from .pipeline import align, align_and_load
from .plan import Match, Mismatch, Plan, load_plan
from .report import Divergence, LoadReport, Skipped, Verification
from .source import read_source
from .verify import verify

__all__ = [
    "AlignError",
    "ApplyError",
    "ArchalignError",
    "CostWeights",
    "Divergence",
    "Hints",
    "LoadReport",
    "Match",
    "Mismatch",
    "Plan",
    "PlanError",
    "RunError",
    "Skipped",
    "SourceError",
    "StrictError",
    "UsageError",
    "Verification",
    "align",
    "align_and_load",
    "apply_plan",
    "load_plan",
    "read_source",
    "save_model",
    "verify",
]

__version__ = "0.1.0"
