"""One exception family: every error archalign raises on purpose derives from `ArchalignError`."""

from __future__ import annotations

__all__ = ["AlignError", "ApplyError", "ArchalignError", "PlanError", "RunError", "SourceError",
           "StrictError", "UsageError"]


class ArchalignError(Exception):
    """Base class of every error archalign raises on purpose."""


class SourceError(ArchalignError, TypeError):
    """A source or destination is not something archalign can read (wrong type, empty, bad file)."""


class AlignError(ArchalignError):
    """The alignment itself cannot be computed (e.g. contradictory hints)."""


class PlanError(ArchalignError, ValueError):
    """A plan is malformed, or no longer agrees with the models it is applied to."""


class ApplyError(ArchalignError):
    """Applying a plan was refused (``strict`` and something stayed unloaded, or a copy failed)."""


class StrictError(ApplyError):
    """``strict=True`` and some destination tensor would stay unloaded: nothing was written."""


class RunError(ArchalignError, RuntimeError):
    """A model could not be run on the example inputs (it rejects their shape, type or device)."""


class UsageError(ArchalignError, ValueError):
    """An argument is out of its range (e.g. ``min_confidence`` outside [0, 1])."""
