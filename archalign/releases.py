"""Releases split over several pickle files: tensor-parallel ranks, or disjoint parts of one state.

Two layouts ship as a folder of numbered pickles, and are told apart by their keys:

- **tensor-parallel ranks** (Meta's LLaMA releases: ``consolidated.00.pth``, ``consolidated.01.pth``,
  ... and ``params.json``): every rank holds the same keys. A tensor equal on every rank (a norm,
  ``rope.freqs``) is replicated and kept once; a split tensor is concatenated along the axis its
  layer was split on. Shapes alone cannot tell that axis (``wq`` and ``wo`` are both square once
  merged), so the axis comes from the documented layout of the layers that wrote the release,
  `META_MODEL_PARALLEL` (fairscale's model-parallel layers, as transformers'
  ``convert_llama_weights_to_hf.py`` reads them). A key that differs across ranks and that no rule
  names is refused (`SourceError` naming it), never guessed.
- **disjoint parts** (the first Mixtral release: ``consolidated.00.pt`` ... ``.03.pt``): each file
  holds its own keys; the state is their union, in file order.

A folder whose files fit neither (a rank that lacks keys the others hold: a half-saved release; a
gap in the numbering: a missing file; ranks that merge to shapes ``params.json`` contradicts) is
refused with the files and keys named. Every file is read with ``torch.load(weights_only=True,
mmap=True)``: nothing is unpickled but tensors, and a split tensor is concatenated only when it is
asked for.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .errors import SourceError

__all__ = ["META_MODEL_PARALLEL", "Merge", "SplitRule", "TensorParallelTensors", "load_flat",
           "numbered_files", "read_release"]

logger = logging.getLogger(__name__)


class SplitRule(NamedTuple):
    """How one kind of tensor is split over the ranks of a tensor-parallel release."""

    pattern: str  # regular expression that the whole key matches
    axis: int  # the axis the ranks' pieces are concatenated along
    layer: str  # the model-parallel layer that split it, e.g. "ColumnParallelLinear"
    why: str  # what that layer splits, for the log and the description


# fairscale.nn.model_parallel.layers, as Meta's llama/model.py uses them and transformers'
# convert_llama_weights_to_hf.py (and mlx-examples' llama/convert.py) concatenate them back
META_MODEL_PARALLEL: tuple[SplitRule, ...] = (
    SplitRule(r"(.*\.)?attention\.w[qkv]\.(weight|bias)", 0, "ColumnParallelLinear",
              "each rank computes a slice of the output features (rows)"),
    SplitRule(r"(.*\.)?feed_forward\.w[13]\.(weight|bias)", 0, "ColumnParallelLinear",
              "each rank computes a slice of the output features (rows)"),
    SplitRule(r"(.*\.)?output\.weight", 0, "ColumnParallelLinear",
              "each rank computes a slice of the vocabulary's logits (rows)"),
    SplitRule(r"(.*\.)?attention\.wo\.weight", 1, "RowParallelLinear",
              "each rank reads a slice of the input features (columns)"),
    SplitRule(r"(.*\.)?feed_forward\.w2\.weight", 1, "RowParallelLinear",
              "each rank reads a slice of the input features (columns)"),
    SplitRule(r"(.*\.)?tok_embeddings\.weight", 1, "ParallelEmbedding",
              "LLaMA 1/2: each rank holds a slice of the embedding's columns (LLaMA 3's "
              "VocabParallelEmbedding splits the rows: told apart by the model's width)"),
)


class Merge(NamedTuple):
    """How one key of a tensor-parallel release is put back together."""

    key: str  # the key, the same on every rank
    axis: int | None  # the axis the ranks are concatenated along; None: replicated, rank 0's
    reason: str  # the rule or fact that decided it, e.g. "ColumnParallelLinear: ..."


class TensorParallelTensors(Mapping[str, torch.Tensor]):
    """The merged tensors of a tensor-parallel release; a split tensor is concatenated from the
    ranks' memory-mapped pieces each time it is asked for (nothing is merged while planning).

    Attributes
    ----------
    merges : dict
        ``key -> Merge``: the axis of every key, and why.
    files : tuple of Path
        The ranks' files, in rank order.
    """

    def __init__(self, ranks: Sequence[Mapping[str, torch.Tensor]], merges: dict[str, Merge],
                 files: Sequence[Path]) -> None:
        self._ranks = list(ranks)  # each rank's (memory-mapped) state_dict
        self.merges = merges
        self.files = tuple(files)

    def __getitem__(self, key: str) -> torch.Tensor:
        merge = self.merges[key]
        if merge.axis is None:
            return self._ranks[0][key]
        return torch.cat([rank[key] for rank in self._ranks], dim=merge.axis)

    def __iter__(self) -> Iterator[str]:
        return iter(self.merges)

    def __len__(self) -> int:
        return len(self.merges)

    def shape(self, key: str) -> tuple[int, ...]:
        """The merged shape of ``key``, from the pieces' shapes (nothing is read)."""
        merge, first = self.merges[key], tuple(self._ranks[0][key].shape)
        if merge.axis is None:
            return first
        total = sum(int(rank[key].shape[merge.axis]) for rank in self._ranks)
        return (*first[:merge.axis], total, *first[merge.axis + 1:])


_NUMBERED = re.compile(r"(?P<stem>.*?)[.\-_]?(?P<n>\d+)(?P<suffix>\.(pth|pt|bin|ckpt))")


def numbered_files(folder: Path, files: Sequence[Path], role: str) -> list[Path]:
    """The pickles of ``folder`` as one numbered set (``consolidated.00.pth`` ...), in order.

    Raises
    ------
    SourceError
        If they are not one set of ``<stem>.<number><suffix>`` names, or a number is missing
        (numbers run from 0, or from 1).
    """
    where = f"the {role} folder {str(folder)!r}"
    names = [p.name for p in files]
    found = [_NUMBERED.fullmatch(n) for n in names]
    if not all(found) or len({(m["stem"], m["suffix"]) for m in found if m}) != 1:
        raise SourceError(f"{where} holds {len(files)} pickle files that are not one numbered "
                          f"set of a release ({', '.join(names[:6])}): name the file to read")
    numbers = {int(m["n"]): p for m, p in zip(found, files) if m}
    start = 0 if 0 in numbers else 1
    wanted = range(start, start + max(len(numbers), max(numbers) + 1 - start))
    missing = [n for n in wanted if n not in numbers]
    if missing:
        first = found[0]
        assert first is not None
        width = len(first["n"])
        gaps = ", ".join(f"{first['stem']}.{n:0{width}d}{first['suffix']}" for n in missing[:5])
        raise SourceError(f"{where} holds {', '.join(names[:6])} but not {gaps}: the release is "
                          "incomplete (an interrupted download or copy?); copy the missing files")
    return [numbers[n] for n in sorted(numbers)]


def read_release(folder: Path, files: Sequence[Path], role: str) -> tuple[
        Mapping[str, torch.Tensor], dict[str, tuple[tuple[int, ...], torch.dtype]] | None, str]:
    """Read a folder of numbered pickles as one state: tensor-parallel ranks or disjoint parts.

    Parameters
    ----------
    folder : Path
        The release's folder (``params.json``, when present, is read to check the merge).
    files : sequence of Path
        Its pickle files (at least two).
    role : str
        "source" or "destination", used in error messages.

    Returns
    -------
    tensors : Mapping[str, Tensor]
        The merged state (`TensorParallelTensors` for ranks; a dict for disjoint parts).
    headers : dict or None
        ``key -> (shape, dtype)`` for ranks (merged shapes, nothing read); None for parts.
    description : str
        How to name the release in messages, with what was merged.

    Raises
    ------
    SourceError
        If a file cannot be read or is not a flat state_dict; if the files are neither ranks
        nor disjoint parts (naming the files and keys that differ); if a key differs across
        ranks and no rule of `META_MODEL_PARALLEL` names its axis; if the ranks' pieces of a key
        do not fit together, or merge to shapes ``params.json`` contradicts.
    """
    ordered = numbered_files(folder, files, role)
    states = [load_flat(p, role) for p in ordered]
    names = [p.name for p in ordered]
    span = f"{names[0]} ... {names[-1]}"
    keysets = [set(s) for s in states]
    if all(k == keysets[0] for k in keysets):
        merges = {key: _merge_of(key, states, names, role) for key in states[0]}
        tensors = TensorParallelTensors(states, merges, ordered)
        _check_params(folder, tensors, role, span)
        headers = {k: (tensors.shape(k), states[0][k].dtype) for k in merges}
        split = sum(m.axis is not None for m in merges.values())
        layers = sorted({m.reason.partition(":")[0] for m in merges.values() if m.axis is not None})
        description = (f"tensor-parallel release {span} ({len(states)} ranks: {split} tensors "
                       f"concatenated as Meta's model-parallel layers split them "
                       f"({', '.join(layers) or 'none'}), {len(merges) - split} replicated)")
        logger.info("read the %s %s", role, description)
        for key, merge in merges.items():
            logger.debug("%s: %s", key, merge.reason)
        return tensors, headers, description
    seen: dict[str, str] = {}
    for name, state in zip(names, states):
        twice = [k for k in state if k in seen]
        if twice:
            raise SourceError(_neither(names, keysets, twice, seen, name, role, folder))
        seen.update(dict.fromkeys(state, name))
    merged: dict[str, torch.Tensor] = {}
    for state in states:
        merged.update(state)
    description = f"release {span} ({len(states)} files of disjoint keys, read as their union)"
    logger.info("read the %s %s", role, description)
    return merged, None, description


def load_flat(path: Path, role: str) -> dict[str, torch.Tensor]:
    """One file of a release (or shard): a flat state_dict, memory-mapped, never unpickling code.

    Raises
    ------
    SourceError
        If ``torch.load(weights_only=True)`` refuses it, or it is not a mapping of str to Tensor.
    """
    try:
        state: Any = torch.load(str(path), map_location="cpu", weights_only=True,
                                mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        raise SourceError(f"cannot read the {role} file {str(path)!r} with "
                          f"torch.load(weights_only=True): {exc}. archalign never unpickles code"
                          ) from exc
    if not isinstance(state, Mapping) or not state:
        raise SourceError(f"the {role} file {str(path)!r} of a release holds a "
                          f"{type(state).__name__}, not a state_dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise SourceError(f"the {role} file {str(path)!r} of a release holds entries that are "
                          f"not tensors ({', '.join(map(repr, bad[:5]))}); a release's files "
                          "each hold a flat state_dict: name the file and an entry instead")
    return dict(state)


def _merge_of(key: str, states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str],
              role: str) -> Merge:
    """How ``key`` merges: by its rule, or replicated when every rank holds the same tensor."""
    pieces = [s[key] for s in states]
    rule = next((r for r in META_MODEL_PARALLEL if re.fullmatch(r.pattern, key)), None)
    if rule is not None and pieces[0].dim() > rule.axis:
        axis, reason = rule.axis, f"{rule.layer}: {rule.why}; concatenated along axis {rule.axis}"
        if rule.layer == "ParallelEmbedding":
            axis, reason = _embedding_axis(key, states, reason)
        shapes = {tuple(p.shape[:axis]) + tuple(p.shape[axis + 1:]) for p in pieces}
        if len(shapes) != 1:
            raise SourceError(f"the {role} release's ranks hold pieces of {key!r} that do not fit "
                              f"together along axis {axis}: "
                              f"{', '.join(f'{n} {tuple(p.shape)}' for n, p in zip(names, pieces))}")
        return Merge(key, axis, reason)
    if all(p.shape == pieces[0].shape and p.dtype == pieces[0].dtype
           and torch.equal(p, pieces[0]) for p in pieces[1:]):
        return Merge(key, None, "replicated: equal on every rank, kept once")
    differ = next(n for n, p in zip(names[1:], pieces[1:])
                  if p.shape != pieces[0].shape or not torch.equal(p, pieces[0]))
    raise SourceError(
        f"the {role} release's tensor {key!r} differs between {names[0]} and {differ} "
        f"({tuple(pieces[0].shape)} vs {tuple(states[names.index(differ)][key].shape)}), and no "
        "known tensor-parallel layout says along which axis it was split (archalign knows "
        "Meta's model-parallel layers: wq/wk/wv/w1/w3/output, wo/w2, tok_embeddings). Merge the "
        "ranks yourself (torch.cat along the layer's split axis) and pass the merged state_dict")


def _embedding_axis(key: str, states: Sequence[Mapping[str, torch.Tensor]],
                    reason: str) -> tuple[int, str]:
    """LLaMA 1/2 split the embedding's columns, LLaMA 3 its rows: the model's width (a replicated
    1-D norm's length) tells which, since only one merge gives the full width."""
    width = next((int(t.shape[0]) for k, t in states[0].items()
                  if k.endswith("norm.weight") and t.dim() == 1), None)
    piece = states[0][key]
    if width is not None and piece.dim() == 2 and int(piece.shape[1]) == width:
        return 0, ("VocabParallelEmbedding (LLaMA 3): each rank holds a slice of the vocabulary "
                   f"(rows), its pieces already {width} wide like the norms; concatenated along "
                   "axis 0")
    return 1, reason


def _check_params(folder: Path, tensors: TensorParallelTensors, role: str, span: str) -> None:
    """The merged query projections must be ``(n_heads * head_dim, dim)`` as ``params.json``
    says: a release missing some ranks (its files renumbered) merges to fewer rows.

    Raises
    ------
    SourceError
        Naming the key, the merged shape and the shape ``params.json`` implies.
    """
    path = folder / "params.json"
    try:
        params = json.loads(path.read_bytes()) if path.is_file() else None
    except (OSError, ValueError):
        return
    if not isinstance(params, dict):
        return
    dim, heads = params.get("dim"), params.get("n_heads")
    if not (isinstance(dim, int) and isinstance(heads, int) and heads > 0):
        return
    given = params.get("head_dim")
    head_dim = given if isinstance(given, int) else dim // heads
    for key in tensors:
        if re.fullmatch(r"(.*\.)?attention\.wq\.weight", key):
            shape, want = tensors.shape(key), (heads * head_dim, dim)
            if shape != want:
                raise SourceError(
                    f"the {role} release {span} merges {key!r} to {shape}, but its params.json "
                    f"(dim {dim}, n_heads {heads}) says {want}: ranks are missing or extra "
                    f"({len(tensors.files)} files found); copy the whole release")
            return


def _neither(names: Sequence[str], keysets: Sequence[set[str]], twice: Sequence[str],
             seen: Mapping[str, str], name: str, role: str, folder: Path) -> str:
    """The error for files that are neither equal-keyed ranks nor disjoint parts."""
    first = keysets[0]
    for other_name, keys in zip(names[1:], keysets[1:]):
        if keys & first and keys != first:
            lacks, extra = sorted(first - keys), sorted(keys - first)
            said = []
            if lacks:
                said.append(f"lacks {len(lacks)} keys that {names[0]} holds "
                            f"({', '.join(lacks[:5])})")
            if extra:
                said.append(f"holds {len(extra)} keys that {names[0]} does not "
                            f"({', '.join(extra[:5])})")
            return (f"the {role} folder {str(folder)!r} is not a whole release: {other_name} "
                    f"{' and '.join(said)}. The ranks of a tensor-parallel release hold the same "
                    "keys, and the files of a split state hold different ones: is a file "
                    "half-saved? Copy the release again")
    return (f"the {role} folder {str(folder)!r} is not a whole release: {name} holds keys "
            f"that {seen[twice[0]]} holds too ({', '.join(twice[:5])}), and other keys that it "
            "does not: copy the release again")
