"""The trial of a plan while aligning: load it into a copy of the destination and run both models.

Planning, not checking: the outputs decide what structure could not, and set the confidence of
every match. The source runs once, with forward hooks on its layers; one scratch copy of the
destination (never the user's) is loaded by `archalign.apply` (the one writer) with each plan the
search tries, and runs with hooks on its layers. A `Trial` then says, for every matched layer,
whether it received what its source counterpart received and produced what it produced (up to
the layout of activations, see `archalign.activations.same`), and whether the final outputs
agree, on something that carries information (`archalign.activations.informative`): an output
that ignores its input, such as a zero-initialised head's, proves nothing about what feeds it,
so the deepest informative layer judges the plan instead.

The search that repairs a failing plan is `archalign.repair`; `decide_by_activations` wires the
two together and turns what the trial showed into confidences.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .activations import Activation, Recording, informative, record_activations, same
from .apply import apply_plan
from .inputs import BATCH, BoundInputs
from .ops import Op, OpKind, apply_ops
from .plan import Match, Plan
from .verify import output_leaves

__all__ = ["LayerCheck", "Trial", "TrialRunner"]

logger = logging.getLogger(__name__)

_FEATURE_PERMUTING = frozenset({OpKind.REGROUP, OpKind.ROPE, OpKind.UNROPE})  # ops whose
# effect on a layer's weight rows shows in its output features, in the same order


class LayerCheck(NamedTuple):
    """What one matched destination layer did in a trial, against its source counterpart."""

    src: str  # source unit key ("a+b" for a fused group)
    dst: str  # destination unit key
    input_same: bool | None  # it received what its counterpart received (None: not comparable)
    output_same: bool | None  # it produced what its counterpart produced, up to the plan's own
    # row layout (None: not comparable, or the source's output carries no information)


class Trial(NamedTuple):
    """What running the destination loaded by one plan showed."""

    ok: bool  # the final outputs (or, below an uninformative output, the deepest informative
    # layer) agree: the plan reproduces the source
    scope: str  # what `ok` rests on, for the plan ("outputs", or the layer that stood in)
    diff: float  # max |src - dst| of the final outputs (inf: not comparable)
    checks: dict[str, LayerCheck]  # destination unit key -> its check, for matched layers that ran
    order: tuple[str, ...]  # destination units in the order they ran (layers only)
    first_bad: int  # index in `order` of the first layer whose input or output differs
    # (len(order) when none does)
    ran: frozenset[str]  # every destination layer that ran, checked or not

    @property
    def agreeing(self) -> int:
        """How many layers produced what their counterparts produced."""
        return sum(c.output_same is True for c in self.checks.values())

    @property
    def score(self) -> tuple[bool, int, int]:
        """Better trials compare greater: reproduced, then how far the destination agrees."""
        return (self.ok, self.first_bad, self.agreeing)


class TrialRunner:
    """Both models on one input: the source's activations once, the destination's per plan.

    Parameters
    ----------
    src, dst : nn.Module
        The models; ``dst`` is copied once and never written.
    inputs : BoundInputs
        The input, as each model takes it.
    src_layers, dst_layers : collection of str
        Module paths whose activations are compared (the units' owning layers).

    Raises
    ------
    Exception
        Whatever the source raises on its input (the caller decides whether to go on).
    """

    def __init__(self, src: nn.Module, dst: nn.Module, inputs: BoundInputs,
                 src_layers: Iterable[str], dst_layers: Iterable[str]) -> None:
        self.inputs = inputs  # what each model is run on
        self.source = record_activations(src, inputs.src, set(src_layers))  # once
        self.scratch = copy.deepcopy(dst)  # the copy every trial loads and runs
        modules = dict(dst.named_modules())
        self.dst_layers = frozenset(k for k in dst_layers if k in modules)  # hooked layers
        self.trials = 0  # how many trials ran
        self._loaded: dict[tuple[str, ...], Match] = {}  # what the scratch copy holds, by dst keys
        self._initial: dict[str, torch.Tensor] = {}  # its own values of the keys ever written
        self._last: Recording | None = None  # the destination's activations in the last trial

    def run(self, plan: Plan) -> Trial:
        """Load ``plan`` (every match, whatever its confidence) into the scratch copy and run it.

        Raises
        ------
        Exception
            Whatever loading or running the destination raises (a plan the trial cannot load).
        """
        self._load(plan)
        self.trials += 1
        recording = record_activations(self.scratch, self.inputs.dst, self.dst_layers)
        self._last = recording
        return self._judge(plan, recording)

    def received(self, dst_unit: str) -> torch.Tensor | None:
        """What destination layer ``dst_unit`` received in the last trial (None: it did not
        run, or no trial ran)."""
        ran = self._last.layers.get(dst_unit) if self._last is not None else None
        return ran.input if ran is not None else None

    def local_check(self, match: Match) -> bool | None:
        """Whether the loaded destination layer, given what its counterpart received, produces
        what its counterpart produced: its own tensors and layout are right, whatever happens
        before it. None when that cannot be asked (a fused group, a layer that takes more than
        one input, inputs of other layouts, an uninformative output).

        Call it right after `run` of the plan ``match`` belongs to.
        """
        if "+" in match.dst_unit or "+" in match.src_unit or self._last is None:
            return None
        theirs = self.source.layers.get(match.src_unit)
        ours = self._last.layers.get(match.dst_unit)
        if theirs is None or ours is None or theirs.input is None or ours.input is None:
            return None
        if theirs.input.shape != ours.input.shape:
            return None
        expected = _expected_output([theirs], match)
        if not informative(expected):
            return None
        try:
            layer = self.scratch.get_submodule(match.dst_unit)
            with torch.no_grad():
                produced = layer(theirs.input.to(ours.input.dtype))
        except Exception:  # a layer that needs more than its first input
            return None
        return same(expected, produced if isinstance(produced, torch.Tensor) else None)

    # ------------------------------------------------------------------ loading

    def _load(self, plan: Plan) -> None:
        """Bring the scratch copy to ``plan``: write the matches that changed, and put back the
        destination's own values where a match went away."""
        wanted = {m.dst: m for m in plan.matches}
        gone = [keys for keys in self._loaded if keys not in wanted]
        changed = [m for keys, m in wanted.items() if self._loaded.get(keys) != m]
        state = self.scratch.state_dict(keep_vars=True)
        with torch.no_grad():
            for keys in gone:
                for key in keys:
                    state[key].copy_(self._initial[key])
                del self._loaded[keys]
            for match in changed:
                for key in match.dst:
                    self._initial.setdefault(key, state[key].detach().clone())
        if changed:
            subset = dataclasses.replace(plan, matches=tuple(changed), mismatches=())
            apply_plan(subset, self.scratch, min_confidence=0.0, check_finite=False)
            self._loaded.update((m.dst, m) for m in changed)

    # ------------------------------------------------------------------ judging

    def _judge(self, plan: Plan, recording: Recording) -> Trial:
        checks: dict[str, LayerCheck] = {}
        for match in plan.matches:
            if match.dst_unit in checks:
                continue
            check = self._check(match, recording)
            if check is not None:
                checks[match.dst_unit] = check
        order = tuple(p for p in recording.order if p in checks)
        first_bad = next((i for i, p in enumerate(order)
                          if checks[p].input_same is False or checks[p].output_same is False),
                         len(order))
        diff, agree = _outputs_agree(self.source.output, recording.output)
        src_out = _first_output(self.source.output)
        if informative(src_out, BATCH):
            ok, scope = agree, "outputs"
        else:  # the output ignores its input: the deepest informative layer judges instead
            deepest = next((p for p in reversed(order) if checks[p].output_same is not None),
                           None)
            ok = deepest is not None and first_bad == len(order)
            scope = (f"the output carries no information; layers up to {deepest}"
                     if deepest is not None else "nothing informative to compare")
        return Trial(ok=ok, scope=scope, diff=diff,
                     checks=checks, order=order, first_bad=first_bad,
                     ran=frozenset(recording.order))

    def _check(self, match: Match, recording: Recording) -> LayerCheck | None:
        """The layer check of one match, when the destination side is a layer that ran."""
        dst_units = match.dst_unit.split("+")
        src_units = match.src_unit.split("+")
        if len(dst_units) > 1:  # a split: each destination member is checked on its own match
            return None
        ran = recording.layers.get(match.dst_unit)
        if ran is None:
            return None
        sources = [self.source.layers.get(u) for u in src_units]
        if any(s is None for s in sources):
            return LayerCheck(match.src_unit, match.dst_unit, None, None)
        seen = [s for s in sources if s is not None]
        input_same = same(seen[0].input, ran.input)
        expected = _expected_output(seen, match)
        output_same = (same(expected, ran.output) if informative(expected) and ran.output is not None
                       and expected is not None and expected.numel() == ran.output.numel()
                       else None)  # layers of other kinds (attention against its projection)
        return LayerCheck(match.src_unit, match.dst_unit, input_same, output_same)


def _expected_output(sources: Sequence[Activation], match: Match) -> torch.Tensor | None:
    """What the destination layer should produce: its counterpart's output (the members'
    outputs side by side, for a concatenation), with the features in the plan's row layout."""
    outputs = [s.output for s in sources]
    if any(o is None or not o.is_floating_point() for o in outputs):
        return None
    tensors = [o for o in outputs if o is not None]
    axis = _feature_axis(tensors[0], match)
    if len(tensors) > 1 and any(_without(t.shape, axis) != _without(tensors[0].shape, axis)
                                for t in tensors):
        return None  # pieces that ran on different inputs (a cross-attention's q and kv)
    out = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=axis)
    permuting = [op for op in match.ops if op.kind in _FEATURE_PERMUTING]
    if not permuting or out.dim() == 0:
        return out
    moved = out.movedim(axis, 0)
    if not _fits(moved.shape[0], permuting):
        return None
    return apply_ops([moved], permuting)[0].movedim(0, axis)


def _without(shape: torch.Size, axis: int) -> tuple[int, ...]:
    dims = list(shape)
    if dims:
        del dims[axis]
    return tuple(dims)


def _feature_axis(output: torch.Tensor, match: Match) -> int:
    """Where a layer's output features lie: axis 1 for a convolution (NCHW), else the last."""
    weight = max(match.dst_shapes, key=len)
    return 1 if len(weight) >= 3 and output.dim() >= 3 else -1


def _fits(rows: int, ops: Sequence[Op]) -> bool:
    for op in ops:
        size = 2 * op.groups[0] if op.kind in (OpKind.ROPE, OpKind.UNROPE) else _prod(op.groups)
        if not size or rows % size:
            return False
    return True


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _outputs_agree(src: object, dst: object) -> tuple[float, bool]:
    """(max |src - dst| over the compared outputs, whether they agree): every informative
    floating output of the source must be found among the destination's, by name when both
    name it (``logits``), else anywhere (a tensor against a Hugging Face output's fields), up to
    the layout of its axes."""
    mine = {k: v for k, v in output_leaves(src) if v.is_floating_point()}
    theirs = {k: v for k, v in output_leaves(dst) if v.is_floating_point()}
    if not mine or not theirs:
        return float("inf"), False
    worst = 0.0
    for key, value in mine.items():
        candidates = [theirs[key]] if key in theirs else list(theirs.values())
        found = [c for c in candidates if same(value, c, rtol=_OUTPUT_RTOL)]
        if not found:
            exact = [c for c in candidates if c.shape == value.shape]
            worst = max(worst, *(float((value - c).abs().max()) for c in exact), 0.0) or float(
                "inf")
            return worst, False
        if found[0].shape == value.shape:
            worst = max(worst, float((value.double() - found[0].double()).abs().max()))
    return worst, True


_OUTPUT_RTOL = 1e-4  # outputs agree within this fraction of their scale (as `verify` judges)


def _first_output(output: object) -> torch.Tensor | None:
    from .activations import first_tensor

    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    return first_tensor(output)
