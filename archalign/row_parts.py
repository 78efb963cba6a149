"""Which output rows of a layer each consumer reads: the row layout of a fused projection, found
by running the model that holds it.

A fused projection (GPT-2's ``c_attn``, timm's ``qkv``, GPTBigCode's ``c_attn``) computes several
parts in one product, and the code after it cuts the output into them: into blocks first
(``q | k | v``), or per head first (``q_h, k_h, v_h`` for each head ``h``). The weights look the
same either way; only that code tells. `find_row_parts` runs the model once under a
`TorchFunctionMode` that follows an *index tensor* (every element holds the output row it comes
from) through each shape operation the output goes through (view, reshape, transpose, split,
indexing, ...), and records, where the output meets the first operation that computes with it (a
product, an attention, a sum), which rows arrive there and in which order.

`find_position_offsets` answers the same question for a table: the first row a learned position
embedding reads (OPT's starts at row 2), from the indices it is called with.

Reading only: the model is run in eval mode without gradients on a given input, and put back as
it was (`archalign.running.run_in_eval`); no parameter is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .running import first_line, run_in_eval

__all__ = ["RowParts", "find_position_offsets", "find_row_parts", "parts_of", "position_offset"]

logger = logging.getLogger(__name__)

# operations that move elements without computing with them: followed
_SHAPE_FUNCTIONS = frozenset({
    "view", "reshape", "transpose", "permute", "split", "split_with_sizes", "chunk",
    "tensor_split", "unbind", "__getitem__", "narrow", "select", "unflatten", "flatten",
    "squeeze", "unsqueeze", "t", "swapaxes", "swapdims", "movedim", "moveaxis", "view_as",
    "reshape_as", "contiguous", "clone", "detach"})
# conversions that keep every element where it is: the index passes through unchanged
_SAME_PLACES = frozenset({"to", "float", "half", "bfloat16", "double", "type", "type_as", "cpu",
                          "cuda", "requires_grad_"})


class RowParts(NamedTuple):
    """How the code after a layer reads its output rows."""

    layer: str  # the layer's module path, e.g. "transformer.h.0.attn.c_attn"
    rows: int  # its output rows (features)
    parts: tuple[tuple[int, ...], ...]  # each part's rows in the order its consumer reads them
    # (row-major over the features of the tensor it arrives as), parts ordered by their first row


def find_row_parts(module: nn.Module, layers: Iterable[str], inputs: Any
                   ) -> dict[str, RowParts]:
    """Run ``module`` on ``inputs`` and find the parts each of ``layers`` is read as.

    Parameters
    ----------
    module : nn.Module
        The model; run once in eval mode without gradients, never written.
    layers : iterable of str
        Module paths of layers whose output (one tensor, features last) is to be followed.
    inputs
        What ``module`` is called with (as `archalign.running.run_in_eval` takes it).

    Returns
    -------
    dict
        ``layer -> RowParts`` for each layer read as two parts or more that together hold
        each of its rows once; a layer read whole, read in overlapping pieces, or never run is
        absent.

    Raises
    ------
    RunError
        If the forward pass raises (as `run_in_eval`).
    """
    modules = dict(module.named_modules())
    wanted = [name for name in dict.fromkeys(layers) if name in modules]
    if not wanted:
        return {}
    follow = _Follow()
    handles = [modules[name].register_forward_hook(follow.hook(name)) for name in wanted]
    try:
        with follow:
            run_in_eval(module, inputs)
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for name in wanted:
        rows = follow.rows.get(name)
        parts = parts_of(follow.seen.get(name, []), rows) if rows else None
        if parts is not None:
            found[name] = RowParts(name, rows, parts)  # type: ignore[arg-type]
    logger.debug("row parts of %d of %d layers: %s", len(found), len(wanted),
                 {k: [len(p) for p in v.parts] for k, v in found.items()})
    return found


def find_position_offsets(module: nn.Module, layers: Iterable[str], inputs: Any
                          ) -> dict[str, int]:
    """Run ``module`` on ``inputs`` and find the first row each table of ``layers`` reads,
    for the tables read as positions (`position_offset`).

    Returns
    -------
    dict
        ``layer -> first row read`` for each layer whose ``weight`` is first looked up
        (``F.embedding``, however the layer calls it) at positions; a table read at other rows
        (token ids), or never read, is absent.

    Raises
    ------
    RunError
        If the forward pass raises (as `run_in_eval`).
    """
    modules = dict(module.named_modules())
    weights = {id(w): name for name in dict.fromkeys(layers) if name in modules
               for w in [getattr(modules[name], "weight", None)] if isinstance(w, torch.Tensor)}
    if not weights:
        return {}
    lookups = _Lookups(weights)
    with lookups:
        run_in_eval(module, inputs)
    seen = lookups.seen
    found = {name: position_offset(index) for name, index in seen.items()}
    return {name: offset for name, offset in found.items() if offset is not None}


def position_offset(index: torch.Tensor) -> int | None:
    """The first row of positions ``index`` reads: ``index`` holds, along its last axis, at
    least two consecutive rows ``o, o + 1, ...`` and repeats them along every other axis; None
    for anything else (token ids, a lone position)."""
    if index.dtype in (torch.bool,) or index.is_floating_point() or index.dim() == 0:
        return None
    if index.device.type == "meta" or index.shape[-1] < 2:
        return None
    first = index.reshape(-1, index.shape[-1])
    run = first[0]
    if not torch.equal(first, run.expand_as(first)):
        return None
    start = int(run[0])
    if start < 0 or not torch.equal(run, torch.arange(start, start + run.numel(),
                                                      device=run.device, dtype=run.dtype)):
        return None
    return start


def parts_of(records: Sequence[torch.Tensor], rows: int) -> tuple[tuple[int, ...], ...] | None:
    """The parts a layer's ``rows`` output rows are read as, from the index tensors its
    consumers received (`RowParts.parts`); None unless the largest pieces read are at least two,
    disjoint, and hold every row once (pieces inside a larger one, as a rotary half inside its
    head, are not parts).
    """
    sequences: dict[frozenset[int], tuple[int, ...]] = {}
    for record in records:
        sequence = _sequence(record)
        if sequence == ():
            continue  # an empty slice reads no row
        if len(set(sequence)) != len(sequence):
            return None  # a row read twice in one piece (expanded): not a cut into parts
        rows_read = frozenset(sequence)
        if sequences.get(rows_read, sequence) != sequence:
            return None  # the same rows read in two orders: which one is the part's?
        sequences[rows_read] = sequence
    largest = [s for s in sequences if not any(s < other for other in sequences)]
    if len(largest) < 2 or sum(map(len, largest)) != rows:
        return None
    if frozenset().union(*largest) != frozenset(range(rows)):
        return None
    return tuple(sorted((sequences[s] for s in largest), key=min))


def _sequence(index: torch.Tensor) -> tuple[int, ...]:
    """The rows an index tensor holds, row-major over the axes along which it varies (the
    features; batch and sequence axes repeat the same rows)."""
    if index.dim() == 0:
        return (int(index),)
    if not index.numel():
        return ()
    sub = index
    for axis in reversed(range(index.dim())):
        first = sub.narrow(axis, 0, 1)
        if sub.shape[axis] > 1 and torch.equal(sub, first.expand_as(sub)):
            sub = first
    return tuple(int(v) for v in sub.reshape(-1).tolist())


class _Lookups(TorchFunctionMode):
    """Records the indices of the first ``F.embedding`` call on each of some weights."""

    def __init__(self, weights: dict[int, str]) -> None:
        super().__init__()
        self.weights = weights  # id of a layer's weight -> the layer
        self.seen: dict[str, torch.Tensor] = {}  # layer -> the indices it was first read at

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "embedding" and len(args) >= 2:
            layer = self.weights.get(id(args[1]))
            if layer is not None and layer not in self.seen and isinstance(args[0], torch.Tensor):
                self.seen[layer] = args[0].detach().clone()
        return func(*args, **kwargs)


class _Follow(TorchFunctionMode):
    """Follows each hooked layer's output through shape operations (see the module)."""

    def __init__(self) -> None:
        super().__init__()
        self.index: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (layer, its index)
        self.rows: dict[str, int] = {}  # layer -> output rows (its last axis)
        self.seen: dict[str, list[torch.Tensor]] = {}  # layer -> the index each consumer got

    def hook(self, name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor) or output.dim() == 0:
                return
            if name in self.rows:  # a layer run twice: its first call decides
                return
            rows = output.shape[-1]
            self.rows[name] = rows
            index = torch.arange(rows).expand(tuple(output.shape))
            self.index[output] = (name, index)
        return record

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        followed = [(t, self.index[t]) for t in _tensors(args, kwargs) if t in self.index]
        if not followed or not _holds_tensor(out):
            return out  # nothing followed, or a question about a tensor (its shape, its size)
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        if len(followed) == 1 and followed[0][0] is first:
            layer, index = followed[0][1]
            if name in _SAME_PLACES and isinstance(out, torch.Tensor) and out.shape == first.shape:
                self.index[out] = (layer, index)
                return out
            if name in _SHAPE_FUNCTIONS:
                try:
                    moved = func(index, *args[1:], **kwargs)
                except Exception as exc:  # an index that cannot follow: a consumer
                    logger.debug("%s of %s not followed: %s", name, layer, first_line(exc))
                else:
                    self._pair(out, moved, layer)
                    return out
        if name == "cat" and len(followed) == 1 and isinstance(out, torch.Tensor):
            others = [t for t in _tensors(args, kwargs) if t is not followed[0][0]]
            if all(t.numel() == 0 for t in others) and out.shape == followed[0][0].shape:
                self.index[out] = followed[0][1]  # joined to an empty cache: the same tensor
                return out
        for _tensor, (layer, index) in followed:
            self.seen.setdefault(layer, []).append(index)
        return out

    def _pair(self, out: Any, moved: Any, layer: str) -> None:
        if isinstance(out, torch.Tensor) and isinstance(moved, torch.Tensor):
            if out.shape == moved.shape:
                self.index[out] = (layer, moved)
        elif isinstance(out, (tuple, list)) and isinstance(moved, (tuple, list)):
            for a, b in zip(out, moved):
                self._pair(a, b, layer)


def _tensors(args: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors among a call's arguments (inside lists and tuples too), each once."""
    found: dict[int, torch.Tensor] = {}
    stack = [*args, *kwargs.values()]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.setdefault(id(item), item)
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return list(found.values())


def _holds_tensor(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out)
