"""Checks of a checkpoint's plan on the destination alone: what can be checked without a source.

When the source is a checkpoint (a state_dict or a file) there is nothing to compare the
destination with, but the loaded destination can still be run, on the input made for it
(`archalign.inputs.make_inputs`) or the user's, and a few things checked that a right load shows:

- the outputs are finite, and vary across the batch (or, for one sample, across positions) when
  the input does: a constant output means a broken load or a zero head;
- every BatchNorm (any module holding ``running_mean`` and ``running_var`` buffers) whose running
  statistics were loaded is consistent with what the loaded layers before it produce: across its
  channels, the mean and log variance of its actual input correlate with its running mean and
  log running variance (`norm_fit`). The input is synthetic, so equality is not asked for; the
  checks are relative and lenient (see `NORM_ANTI_FIT` and `NORM_FIT_MARGIN`, measured on the
  corpus pairs that have BatchNorm).

A failed check caps the implicated matches at `CHECKPOINT_CHECK_CAP` (below `HIGH_CONFIDENCE`):
the BatchNorm's own matches, or every match when the outputs are not finite or constant (and
every destination tensor was loaded: an untouched destination head may be constant by design).
The plan is loaded into a copy of the destination by `archalign.apply` (the one writer), at the
default minimum confidence; the user's destination is never written. One forward pass.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .apply import apply_plan
from .confidence import CHECKPOINT_CHECK_CAP, DEFAULT_MIN_CONFIDENCE, NORM_ANTI_FIT, NORM_FIT_MARGIN
from .inputs import BoundInputs
from .plan import Match, Plan
from .running import first_line, run_in_eval
from .verify import output_leaves

__all__ = ["CheckpointChecks", "NormCheck", "check_checkpoint", "norm_fit", "run_checks"]

logger = logging.getLogger(__name__)


class NormCheck(NamedTuple):
    """One loaded BatchNorm's running statistics against its input on the check's run."""

    layer: str  # the destination module's name
    fit: float  # `norm_fit` of its input's statistics with its own running statistics (nan:
    # not comparable, e.g. constant running statistics)
    rival: str  # another checked BatchNorm of as many channels whose running statistics fit
    # this input better than its own by `NORM_FIT_MARGIN` ("" when none does)
    rival_fit: float  # that rival's fit (nan when there is no rival)

    @property
    def ok(self) -> bool:
        """Consistent: not clearly uncorrelated (below ``-NORM_ANTI_FIT``), and no rival fits better."""
        return not self.rival and not self.fit < -NORM_ANTI_FIT

    @property
    def why(self) -> str:
        """What the failed check showed, for the verification sentence."""
        if self.rival:
            return (f"{self.layer}'s input fits the running statistics of {self.rival} "
                    f"({self.rival_fit:.2f}) better than its own ({self.fit:.2f})")
        return f"{self.layer}'s running statistics do not fit its input ({self.fit:.2f})"


class CheckpointChecks(NamedTuple):
    """What the checks of a loaded destination showed (`run_checks`)."""

    finite: bool  # every floating-point output is finite
    constant: tuple[str, ...]  # output leaves ("" for a lone tensor) that do not vary although
    # the input does
    varying_checked: bool  # whether constancy could be judged (the input varies, the output
    # has a batch or position dimension)
    norms: tuple[NormCheck, ...]  # the loaded BatchNorms that ran, in the order they ran
    norms_not_run: tuple[str, ...]  # loaded BatchNorms whose input the run never reached, or
    # whose input has no channel dimension of their size


def check_checkpoint(plan: Plan, dst: nn.Module, inputs: BoundInputs) -> Plan:
    """Run the plan loaded into a copy of ``dst`` and check what can be checked without a source.

    Parameters
    ----------
    plan : Plan
        A plan whose source is a checkpoint (it carries the source's tensors).
    dst : nn.Module
        The destination; copied, never written.
    inputs : BoundInputs
        The destination's input (``inputs.dst``): the user's or one made for it alone.

    Returns
    -------
    Plan
        With ``verification`` naming the checks that ran, what they showed and what could not
        run; the matches a failed check implicates capped at `CHECKPOINT_CHECK_CAP`.

    Raises
    ------
    RunError
        If the destination does not run on an input the user gave (``inputs.how == "given"``).
    """
    try:  # a destination that cannot be copied (sparse parameters) or take the plan: say so
        scratch = copy.deepcopy(dst)
        report = apply_plan(plan, scratch, min_confidence=DEFAULT_MIN_CONFIDENCE,
                            check_finite=False)
    except Exception as exc:
        why = (f"copying the destination or loading the plan into the copy failed "
               f"({type(exc).__name__}: {first_line(exc)})")
        return dataclasses.replace(plan, verification=f"checkpoint checks not run: {why}")
    loaded = frozenset(report.loaded)
    try:
        checks = run_checks(scratch, inputs.dst, loaded)
    except Exception as exc:
        if inputs.how == "given":
            raise
        why = f"the destination does not run on the input made for it ({first_line(exc)})"
        return dataclasses.replace(plan, verification=f"checkpoint checks not run: {why}")
    complete = not report.missing
    text = describe(checks, inputs, complete)
    capped = _capped(plan, checks, complete)
    if capped is not plan:
        logger.warning("checkpoint checks failed: %s", text)
    return dataclasses.replace(capped, verification=text)


def run_checks(model: nn.Module, inputs: Any, loaded: frozenset[str]) -> CheckpointChecks:
    """Run ``model`` once in eval mode and check its outputs and its loaded BatchNorms.

    Parameters
    ----------
    model : nn.Module
        The loaded destination (a copy: hooks are added and removed again).
    inputs : Tensor, tuple, list or dict
        What ``model`` is called with.
    loaded : frozenset of str
        The destination keys the load wrote: a BatchNorm is checked when both its
        ``running_mean`` and ``running_var`` are among them.

    Returns
    -------
    CheckpointChecks

    Raises
    ------
    RunError
        If the model does not run on ``inputs``.
    """
    norms = {name: m for name, m in model.named_modules() if _is_norm(m)
             and {f"{name}.running_mean" if name else "running_mean",
                  f"{name}.running_var" if name else "running_var"} <= loaded}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(_input_stats(seen, name)) for name, m in norms.items()]
    try:
        output = run_in_eval(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    leaves = [(k, t) for k, t in output_leaves(output) if t.is_floating_point() or t.is_complex()]
    finite = all(bool(torch.isfinite(t).all()) for _, t in leaves)
    varies = _input_varies(inputs)
    judged = [(k, t) for k, t in leaves if varies and _sample_dim(t) is not None]
    constant = tuple(k for k, t in judged if finite and _constant(t))
    stats = {name: (norms[name].running_mean.detach().double().cpu(),
                    norms[name].running_var.detach().double().cpu())
             for name in seen}
    checks = tuple(_norm_check(name, seen, stats) for name in seen)
    return CheckpointChecks(finite=finite, constant=constant, varying_checked=bool(judged),
                            norms=checks, norms_not_run=tuple(n for n in norms if n not in seen))


def norm_fit(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
             running_var: torch.Tensor) -> float:
    """How well an input's per-channel statistics fit a BatchNorm's running statistics.

    The mean of two Pearson correlations across channels: of the input's mean with the running
    mean, and of the input's log variance with the log running variance (variances span orders
    of magnitude; their logs compare on one scale). A correlation that cannot be computed (its
    values constant across channels) is left out; nan when neither can. In [-1, 1]: 1 when the
    statistics agree up to an affine change per statistic, which a synthetic input's shift
    from real data mostly is.
    """
    parts = [_pearson(mean, running_mean),
             _pearson(var.clamp_min(1e-12).log(), running_var.clamp_min(1e-12).log())]
    found = [p for p in parts if p == p]
    return sum(found) / len(found) if found else float("nan")


def describe(checks: CheckpointChecks, inputs: BoundInputs, complete: bool) -> str:
    """The verification sentence: which checks ran, what they showed, which could not run."""
    where = "the given input" if inputs.how == "given" else "an input made for the destination"
    ran: list[str] = []
    not_run: list[str] = []
    if not checks.finite:
        ran.append("OUTPUTS HOLD NaN OR Inf")
    elif checks.constant:
        names = ", ".join(k or "output" for k in checks.constant)
        extra = "" if complete else " (some destination tensors were not loaded: an untouched " \
                                    "head may be constant by design)"
        ran.append(f"outputs finite; CONSTANT OUTPUTS: {names} do not vary with the input{extra}")
    elif checks.varying_checked:
        ran.append("outputs finite and varying")
    else:
        ran.append("outputs finite")
        not_run.append("output variation (the input does not vary across its batch, or the "
                       "output has no batch dimension)")
    if checks.norms:
        good = [c for c in checks.norms if c.ok]
        line = (f"{len(good)}/{len(checks.norms)} BatchNorm running statistics consistent with "
                "their inputs")
        bad = [c.why for c in checks.norms if not c.ok]
        if bad:
            line += "; INCONSISTENT: " + "; ".join(bad[:5]) + (
                f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        ran.append(line)
    else:
        not_run.append("BatchNorm statistics (no loaded BatchNorm ran)")
    if checks.norms_not_run:
        not_run.append(f"{len(checks.norms_not_run)} loaded BatchNorms whose input could not be "
                       "read per channel")
    text = f"checkpoint checks on {where}: " + "; ".join(ran)
    if not_run:
        text += "; not checked: " + ", ".join(not_run)
    return text + "; no source model to compare outputs with"


# ------------------------------------------------------------------------ internals

def _capped(plan: Plan, checks: CheckpointChecks, complete: bool) -> Plan:
    """The plan with the matches the failed checks implicate capped (the same plan if none)."""
    if not checks.finite or (checks.constant and complete):
        term = "outputs_nonfinite" if not checks.finite else "outputs_constant"
        return dataclasses.replace(plan, matches=tuple(_cap(m, term) for m in plan.matches))
    bad = {c.layer for c in checks.norms if not c.ok}
    if not bad:
        return plan
    return dataclasses.replace(plan, matches=tuple(
        _cap(m, "norm_inconsistent") if set(m.dst_unit.split("+")) & bad else m
        for m in plan.matches))


def _cap(match: Match, term: str) -> Match:
    return dataclasses.replace(match, confidence=min(match.confidence, CHECKPOINT_CHECK_CAP),
                               costs=(*match.costs, (term, 1.0)))


def _is_norm(module: nn.Module) -> bool:
    mean, var = module._buffers.get("running_mean"), module._buffers.get("running_var")
    return (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)
            and mean.ndim == 1 and mean.shape == var.shape)


def _input_stats(store: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str) -> Any:
    """A forward pre-hook keeping the per-channel mean and variance of the first call's input."""
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if name in store or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach()
        channels = module._buffers["running_mean"].shape[0]  # type: ignore[union-attr]
        if x.ndim >= 2 and x.shape[1] == channels:
            dim = 1  # (N, C, ...): the BatchNorm convention
        elif x.ndim >= 1 and x.shape[-1] == channels:
            dim = x.ndim - 1  # channels last
        else:
            return
        flat = x.double().movedim(dim, 0).reshape(channels, -1)
        if flat.shape[1] < 2:
            return
        store[name] = (flat.mean(1).cpu(), flat.var(1).cpu())

    return hook


def _norm_check(name: str, seen: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> NormCheck:
    mean, var = seen[name]
    own = norm_fit(mean, var, *stats[name])
    best, best_fit = "", float("nan")
    for other, (r_mean, r_var) in stats.items():
        if other == name or r_mean.shape != mean.shape:
            continue
        fit = norm_fit(mean, var, r_mean, r_var)
        if fit > (own if own == own else -1.0) + NORM_FIT_MARGIN and not fit <= best_fit:
            best, best_fit = other, fit
    return NormCheck(layer=name, fit=own, rival=best, rival_fit=best_fit)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.numel() < 3 or not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    norm = float(a.norm() * b.norm())
    if norm <= 1e-12 * max(float(a.abs().max()), float(b.abs().max()), 1e-300) ** 2:
        return float("nan")
    return float((a * b).sum()) / norm


def _sample_dim(t: torch.Tensor) -> int | None:
    """The dimension an output should vary along: the batch, or for one sample its positions."""
    if t.ndim >= 1 and t.shape[0] > 1:
        return 0
    if t.ndim >= 3 and t.shape[1] > 1:
        return 1
    return None


def _constant(t: torch.Tensor) -> bool:
    """Whether ``t`` is the same along its sample dimension (up to float rounding)."""
    dim = _sample_dim(t)
    if dim is None or not t.numel():
        return False
    x = t.detach().double().cpu()
    if x.is_complex():
        x = torch.view_as_real(x)
    first = x.narrow(dim, 0, 1)
    scale = float(x.abs().max())
    return float((x - first).abs().max()) <= 1e-6 * scale + 1e-12


def _input_varies(inputs: Any) -> bool:
    """Whether some input tensor differs along its batch dimension (else a constant output
    proves nothing)."""
    if isinstance(inputs, torch.Tensor):
        tensors = [inputs]
    elif isinstance(inputs, Mapping):
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    elif isinstance(inputs, (tuple, list)):
        tensors = [v for v in inputs if isinstance(v, torch.Tensor)]
    else:
        return False
    for t in tensors:
        if t.ndim >= 1 and t.shape[0] > 1 and not bool((t == t[:1]).all()):
            return True
        if t.ndim >= 2 and t.shape[0] == 1 and t.shape[1] > 1 and not bool(
                (t == t[:, :1]).all()):
            return True
    return False
