"""Per-unit features: layer family, execution position (warped onto the other model), context, names.

Positions are compared after *warping*: an optimal monotone alignment of the two models' signature
sequences (a dynamic program, like a sequence alignment with gaps) gives anchors, and the ranks
between anchors are mapped piecewise linearly from one model onto the other. A deeper model's
extra blocks then become gaps instead of shifting every later layer.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from .graph import INPUT, OUTPUT, Unit, UnitGraph, size_order

__all__ = ["UnitFeatures", "extract_features", "is_matrix", "is_pointwise", "is_vector",
           "layer_family", "unit_signature", "without_own_classes"]

Signature = tuple[str, tuple[tuple[int, ...], ...]]


@dataclass(frozen=True)
class UnitFeatures:
    """What the cost model sees of one unit."""

    unit: Unit  # the unit itself (key, tensors, shapes, type name)
    family: str  # coarse layer kind shared across implementations: "linear", "conv", "norm", ...
    known_type: bool  # False when the module class is unknown (a state_dict) and `family` a guess
    rank: int  # position in execution order, 0-based
    position: float  # rank in the *destination's* rank space (warped for source units)
    preds: tuple[str, ...]  # signatures of the nearest producers (sorted; sentinels by name)
    succs: tuple[str, ...]  # signatures of the nearest consumers (sorted; sentinels by name)
    tokens: frozenset[str]  # lower-case name tokens without indices ("blocks.0.qkv" -> blocks, qkv)
    indices: tuple[int, ...]  # the numbers in the key, in order ("layer1.2.conv1" -> 1, 2, 1)
    shift: float = 0.0  # how far `position` moves when the alignment's gaps go first, not last
    reads: int | None = None  # id of the tensor its layer read first (equal: siblings); None
    # when unknown

    @property
    def signature(self) -> Signature:
        return (self.family, self.unit.shape_key)

    @property
    def spread(self) -> float:
        """How uncertain `position` is: the size of `shift`."""
        return abs(self.shift)


# classes that are another class under a different name (subclasses with no new behaviour)
TYPE_ALIASES = {"NonDynamicallyQuantizableLinear": "Linear", "LazyLinear": "Linear"}

_LINEAR_TYPES = frozenset({"Linear", "NonDynamicallyQuantizableLinear", "Conv1D", "LazyLinear",
                           "MultiheadAttention"})


def layer_family(type_name: str) -> str:
    """Map a module class name onto a family that different implementations share.

    >>> layer_family("Conv1D"), layer_family("Conv2d"), layer_family("LlamaRMSNorm")
    ('linear', 'conv', 'norm')
    """
    if type_name in _LINEAR_TYPES or type_name.endswith("Linear"):
        return "linear"
    if type_name == "Parameter":
        return "param"
    if type_name == "":
        return "unknown"
    if "Norm" in type_name:
        return "norm"
    if "Conv" in type_name:
        return "conv"
    if "Embedding" in type_name:
        return "embedding"
    return type_name


def extract_features(
    src: UnitGraph, dst: UnitGraph, anchors: Sequence[tuple[str, str]] = (),
    skip: Collection[str] = (),
) -> tuple[list[UnitFeatures], list[UnitFeatures]]:
    """Compute features of both models' units, source positions warped onto the destination.

    Parameters
    ----------
    anchors : sequence of (source unit key, destination unit key)
        Pairs known to correspond (pinned by a reviewer): the warp passes through them, and
        alignment pairs that cross them are dropped.
    skip : collection of str
        Destination units left out of the alignment (a reviewer dropped them: a layer the
        source has no counterpart for). The source is aligned with the others, so that an added
        block among identical ones is no longer a gap that could lie anywhere in their run;
        positions stay in the destination's full rank space.

    Returns
    -------
    (list of UnitFeatures, list of UnitFeatures)
        Source and destination features, each in execution order.
    """
    src_units, dst_units = list(src.units.values()), list(dst.units.values())
    src_sig = {u.key: unit_signature(u) for u in src_units}
    dst_sig = {u.key: unit_signature(u) for u in dst_units}
    kept = [i for i, u in enumerate(dst_units) if u.key not in skip]
    aligned = [dst_units[i] for i in kept]
    src_rank = {u.key: i for i, u in enumerate(src_units)}
    dst_rank = {u.key: i for i, u in enumerate(aligned)}
    pinned = [(src_rank[a], dst_rank[b]) for a, b in anchors if b in dst_rank]
    ranks = range(len(src_units))

    def positions(gaps_last: bool) -> np.ndarray:
        found = _warp(src_units, aligned, src_sig, dst_sig, pinned, gaps_last=gaps_last)(
            np.arange(len(src_units), dtype=float))
        if len(aligned) == len(dst_units):
            return found
        # ranks among the aligned units -> ranks among all (interpolated between kept units)
        return np.interp(found, np.arange(-1.0, len(kept) + 1.0),
                         np.array([-1.0, *kept, float(len(dst_units))]))

    last = positions(gaps_last=True)
    # the same alignment with the gaps placed first: where the two disagree, structure cannot
    # tell which units were added or removed (a run of identical layers lost one)
    first = positions(gaps_last=False)
    return (
        [_features(u, i, float(last[i]), src, src_sig, shift=float(first[i] - last[i]))
         for i, u in zip(ranks, src_units)],
        [_features(u, i, float(i), dst, dst_sig) for i, u in enumerate(dst_units)],
    )


def unit_signature(unit: Unit) -> Signature:
    """A unit's family (guessed from its tensors when its class is unknown) and shapes: what the
    sequence alignment compares."""
    family = layer_family(unit.type_name)
    if family == "unknown":
        family = infer_family(unit)
    return (family, unit.shape_key)


def is_matrix(sig: Signature) -> bool:
    """A linear layer, an embedding, or a lone parameter that is a matrix but for axes of size 1
    (CLIP's ``proj``; ViT's ``pos_embed`` (1, N, D)): one matrix whichever it is (a checkpoint
    cannot tell them apart)."""
    family, shapes = sig
    return family in ("linear", "embedding") or (
        family == "param" and len(shapes) == 1 and sum(d != 1 for d in shapes[0]) == 2)


def is_vector(sig: Signature) -> bool:
    """One 1-d tensor alone: a lone parameter, or a linear or convolution layer whose weight is
    tied to another layer's (BERT's ``cls.predictions.bias``, registered on the head, against
    ELECTRA's ``generator_lm_head``, a Linear holding only its bias): one vector whichever it is
    (a checkpoint keeps a tie under one name)."""
    family, shapes = sig
    return family in ("param", "linear", "conv") and len(shapes) == 1 and len(shapes[0]) == 1


def is_pointwise(sig: Signature) -> bool:
    """A convolution whose kernel is all ones (1x1): a linear map per position."""
    family, shapes = sig
    weight = max(shapes, key=len) if shapes else ()
    return family == "conv" and len(weight) >= 3 and all(d == 1 for d in weight[2:])


def without_own_classes(graph: UnitGraph) -> UnitGraph:
    """The graph with the class names no other implementation shares (``Dinov2LayerScale``,
    ``LayerScale``) forgotten, so that their families are guessed from their tensors as a
    checkpoint's are (`infer_family`): against a source without classes, a class of the
    destination's own only makes every comparison fail. Shared families (linear, conv, norm,
    embedding) and lone tensors keep their class."""
    units = {key: dataclasses.replace(u, type_name="") if _own_class(u.type_name) else u
             for key, u in graph.units.items()}
    return dataclasses.replace(graph, units=units)


def _own_class(type_name: str) -> bool:
    return type_name not in ("", "Parameter") and layer_family(type_name) == type_name


def infer_family(unit: Unit) -> str:
    """Guess the family of a unit read from a bare state_dict, from its tensors' names and ranks."""
    names = unit.local_names()
    if any(n in ("running_mean", "running_var") for n in names):
        return "norm"
    weight = next((s for n, s in zip(names, unit.shapes) if n.endswith("weight")), None)
    if weight is None:
        return "param"
    if len(weight) >= 3:
        return "conv"
    if len(weight) == 2:
        return "linear"
    return "norm"


@functools.lru_cache(maxsize=4096)
def _sig_text(sig: Signature) -> str:
    """A neighbour as the context term compares it: an embedding's matrix as a linear layer's
    (a checkpoint cannot tell them apart: both are one 2-d ``weight``), and a layer holding only
    a bias as a lone vector (`is_vector`)."""
    family = "linear" if sig[0] == "embedding" else "param" if is_vector(sig) else sig[0]
    return f"{family}{list(sig[1])}"


def _features(unit: Unit, rank: int, position: float, graph: UnitGraph,
              sigs: dict[str, Signature], shift: float = 0.0) -> UnitFeatures:
    def describe(keys: Sequence[str]) -> tuple[str, ...]:
        return tuple(sorted(k if k in (INPUT, OUTPUT) else _sig_text(sigs[k]) for k in keys))

    return UnitFeatures(
        unit=unit,
        family=sigs[unit.key][0],
        known_type=bool(unit.type_name),
        rank=rank,
        position=position,
        shift=shift,
        preds=describe(graph.predecessors(unit.key)),
        succs=describe(graph.successors(unit.key)),
        tokens=name_tokens(unit.key),
        reads=graph.reads.get(unit.key),
        indices=tuple(int(n) for n in re.findall(r"\d+", unit.key)),
    )


_TOKEN_SPLIT = re.compile(r"[._\-/]+|(?<=[a-z])(?=[A-Z])")


def name_tokens(key: str) -> frozenset[str]:
    """Lower-case name tokens with the numbers dropped: ``layers.0.ln_1`` -> {layers, ln}."""
    return frozenset().union(*(_segment_tokens(part) for part in key.split(".")))


@functools.lru_cache(maxsize=4096)
def _segment_tokens(segment: str) -> frozenset[str]:
    """`name_tokens` of one dotted segment (segments repeat across a model's keys)."""
    return frozenset(
        t.lower().rstrip("0123456789") for t in _TOKEN_SPLIT.split(segment)
        if t and not t.isdigit() and t.lower().rstrip("0123456789")
    )


def _warp(src_units: list[Unit], dst_units: list[Unit], src_sig: dict[str, Signature],
          dst_sig: dict[str, Signature], pinned: Sequence[tuple[int, int]] = (),
          gaps_last: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """A monotone piecewise-linear map from source ranks to destination ranks.

    Its anchors are the pairs of an optimal monotone alignment of the two signature sequences
    (`align_sequences`) and the ``pinned`` rank pairs; ranks between anchors are interpolated.
    """
    a = [src_sig[u.key] for u in src_units]
    b = [dst_sig[u.key] for u in dst_units]
    if gaps_last:
        pairs = align_sequences(a, b)
    else:  # align the reversed sequences: their last gaps are the originals' first
        n, m = len(a), len(b)
        pairs = [(n - 1 - i, m - 1 - j) for i, j in reversed(align_sequences(a[::-1], b[::-1]))]
    # a fused unit is anchored at its first part (in either direction of the alignment)
    pairs = _first_parts(sorted(pairs))
    if pinned:
        pairs = [(i, j) for i, j in pairs
                 if all((i - a) * (j - b) > 0 for a, b in pinned)]  # drop pairs crossing a pin
        pairs = sorted({*pairs, *pinned})
    xs = np.array([-1.0, *(a for a, _ in pairs), float(len(src_units))])
    ys = np.array([-1.0, *(b for _, b in pairs), float(len(dst_units))])

    def warp(ranks: np.ndarray) -> np.ndarray:
        return np.interp(ranks, xs, ys)

    return warp


def _first_parts(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted pairs with one per source unit and one per destination unit: the first."""
    out: list[tuple[int, int]] = []
    for i, j in pairs:
        if not out or (i > out[-1][0] and j > out[-1][1]):
            out.append((i, j))
    return out


GAP = 1.0  # cost of skipping one unit in the sequence alignment
BAND_MIN = 64  # the alignment is computed in a band of this many units around the diagonal,
BAND_FRACTION = 0.05  # plus this fraction of the longer sequence, plus the length difference
_MOVE_DIAG, _MOVE_UP, _MOVE_LEFT = 0, 1, 2


def align_sequences(a: Sequence[Signature], b: Sequence[Signature]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of an optimal monotone alignment of two signature sequences.

    Equal signatures align for free; signatures of one family whose main tensors have the same
    rank align for ``GAP * (1 + d / 2)``, ``d`` the fraction of differing dimensions (cheaper than
    skipping both, and the closer shape wins); a unit that holds 2 or 3 consecutive units of the
    other side stacked (a fused qkv against q, k, v: equal parts, or grouped-query ones, see
    `_Runs`) aligns with all of them for `FUSED_ALIGN` (a pair is returned with each part);
    anything else never; skipping a unit costs ``GAP``.
    Among equal alignments the skipped units go last, so a deeper model's extra blocks at the end
    of a stage are the ones left out ("first N blocks"). Every aligned pair is returned (equal
    signatures and substitutions: both are positional correspondents). The dynamic program runs
    row by row with numpy inside a band around the diagonal (`BAND_MIN`, `BAND_FRACTION`):
    O(len(a) * band) time and one byte per cell of the band. A common prefix is aligned first, pair
    by pair: an optimal alignment pairs it, and pairing it puts the gaps as late as they can go
    (two models that differ only in names never reach the dynamic program).
    """
    head = 0
    for x, y in zip(a, b):
        if x != y:
            break
        head += 1
    return [(k, k) for k in range(head)] + [
        (head + i, head + j) for i, j in _align_rest(a[head:], b[head:])]


def _align_rest(a: Sequence[Signature], b: Sequence[Signature]) -> list[tuple[int, int]]:
    """`align_sequences` by dynamic programming (in a band around the diagonal)."""
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    ids: dict[Signature, int] = {}
    a_id = np.array([ids.setdefault(s, len(ids)) for s in a])
    b_id = np.array([ids.setdefault(s, len(ids)) for s in b])
    a_fam, b_fam = np.array([s[0] for s in a]), np.array([s[0] for s in b])
    a_main, a_rank = _main_shapes(a)
    b_main, b_rank = _main_shapes(b)
    # runs[k]: the k units ending at j (exclusive) may be the parts of one fused unit, and
    # their rows summed and shared trailing shape (`_Runs`)
    a_runs = {k: _Runs.of(a_fam, a_main, a_rank, k) for k in FUSED_PARTS}
    b_runs = {k: _Runs.of(b_fam, b_main, b_rank, k) for k in FUSED_PARTS}
    cols = np.arange(m + 1, dtype=float)
    prev = GAP * cols
    history = [prev]  # the last rows, full width: a fused move reaches back k rows
    # only a band around the diagonal is computed: an alignment strays from it by at most the
    # difference in length, plus local shifts. Row i's moves are kept for its columns
    # starts[i]..starts[i] + 2 * band only; row 0 is all left moves, column 0 all up moves
    band = BAND_MIN + abs(n - m) + int(BAND_FRACTION * max(n, m))
    moves = np.full((n + 1, 2 * band + 1), _MOVE_DIAG, dtype=np.int8)
    starts = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        centre = (i * m) // n
        lo, hi = max(0, centre - band), min(m, centre + band)
        starts[i] = lo
        first = max(lo, 1)  # columns first..hi can come diagonally from b[first-1..hi-1]
        bs = slice(first - 1, hi)
        differing = (b_main[bs] != a_main[i - 1]).sum(axis=1) / np.maximum(b_rank[bs], 1)
        similar = (b_fam[bs] == a_fam[i - 1]) & (b_rank[bs] == a_rank[i - 1])
        sub = np.where(b_id[bs] == a_id[i - 1], 0.0,
                       np.where(similar, GAP * (1.0 + 0.5 * differing), np.inf))
        width = hi - lo + 1
        diag = np.full(width, np.inf)
        diag[first - lo:] = prev[first - 1:hi] + sub
        up = prev[lo:hi + 1] + GAP
        best = np.minimum(diag, up)
        chosen = np.where(best == up, _MOVE_UP, _MOVE_DIAG).astype(np.int8)
        same_fam = b_fam[bs] == a_fam[i - 1]
        for k in FUSED_PARTS:
            # this source unit holds the k destination units ending at j, stacked
            ok = same_fam & b_runs[k].hold(a_main[i - 1], a_rank[i - 1], first, hi + 1)
            back = np.arange(first, hi + 1) - k
            fused = np.where(ok & (back >= 0), prev[np.maximum(back, 0)] + FUSED_ALIGN, np.inf)
            better = fused < best[first - lo:]
            best[first - lo:] = np.where(better, fused, best[first - lo:])
            chosen[first - lo:] = np.where(better, _MOVE_FUSED_SRC + k, chosen[first - lo:])
            # the k source units ending here are held by destination unit j, stacked
            if i >= k and a_runs[k].ok[i] and len(history) >= k:
                ok = same_fam & a_runs[k].held_by(i, b_main[bs], b_rank[bs])
                fused = np.where(ok, history[-k][first - 1:hi] + FUSED_ALIGN, np.inf)
                better = fused < best[first - lo:]
                best[first - lo:] = np.where(better, fused, best[first - lo:])
                chosen[first - lo:] = np.where(better, _MOVE_FUSED_DST + k, chosen[first - lo:])
        if lo == 0:
            best[0] = GAP * i
            chosen[0] = _MOVE_UP
        # a run of left moves ending at j: left[j] = min_{lo <= k < j} (best[k] + GAP * (j - k))
        window = cols[lo:hi + 1]
        left = np.full(width, np.inf)
        left[1:] = np.minimum.accumulate(best - GAP * window)[:-1] + GAP * window[1:]
        row_band = np.minimum(best, left)
        # ties as before fused moves existed: skip the source unit, then the destination's
        moves[i, :width] = np.where(row_band == up, _MOVE_UP,
                                    np.where(row_band == left, _MOVE_LEFT, chosen))
        row = np.full(m + 1, np.inf)
        row[lo:hi + 1] = row_band
        prev = row
        history = [*history[-(max(FUSED_PARTS) - 1):], row]
    pairs: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 and j > 0:
        at = j - int(starts[i])
        move = int(moves[i, at]) if 0 <= at < moves.shape[1] else _MOVE_DIAG
        if move == _MOVE_DIAG:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif move == _MOVE_UP:
            i -= 1
        elif move == _MOVE_LEFT:
            j -= 1
        elif move > _MOVE_FUSED_DST:  # k source units -> one destination unit: every part
            k = move - _MOVE_FUSED_DST
            pairs.extend((i - d, j - 1) for d in range(1, k + 1))
            i, j = i - k, j - 1
        else:  # one source unit -> k destination units: every part
            k = move - _MOVE_FUSED_SRC
            pairs.extend((i - 1, j - d) for d in range(1, k + 1))
            i, j = i - 1, j - k
    return pairs[::-1]


FUSED_PARTS = (2, 3)  # a fused unit may hold 2 (gate + up) or 3 (q + k + v) units stacked
FUSED_ALIGN = 0.5 * GAP  # aligning a fused unit with the units it holds: cheaper than the
# substitution and skips it replaces, dearer than an equal pair
_MOVE_FUSED_SRC = 10  # + k: one source unit aligned with k destination units
_MOVE_FUSED_DST = 20  # + k: k source units aligned with one destination unit


@dataclass(frozen=True)
class _Runs:
    """For every end j (exclusive): whether the k units before it may be the parts of one fused
    unit (one family, one rank >= 2, one trailing shape, and equal parts, or the grouped-query
    q, k, v: k and v equal, q no smaller; see `archalign.order_alignment.stacks`), their rows
    summed and their trailing shape."""

    ok: np.ndarray  # (n + 1,) bool: False for j < k
    rows: np.ndarray  # (n + 1,) the parts' leading sizes, summed
    trailing: np.ndarray  # (n + 1, _MAX_RANK - 1) the parts' trailing shape (-1 padded)
    rank: np.ndarray  # (n + 1,) the parts' rank

    @staticmethod
    def of(fam: np.ndarray, main: np.ndarray, rank: np.ndarray, k: int) -> _Runs:
        n = len(fam)
        ok = np.zeros(n + 1, dtype=bool)
        rows = np.zeros(n + 1, dtype=np.int64)
        trailing = np.full((n + 1, main.shape[1] - 1), -2, dtype=np.int64)
        ranks = np.zeros(n + 1, dtype=np.int64)
        if n >= k:
            last = slice(k - 1, n)  # the run's last unit, for runs ending at k .. n
            same = rank[last] >= 2
            for d in range(1, k):
                first = slice(k - 1 - d, n - d)
                same &= ((fam[first] == fam[last]) & (rank[first] == rank[last])
                         & (main[first, 1:] == main[last, 1:]).all(axis=1))
            lead = [main[k - 1 - d:n - d, 0] for d in range(k - 1, -1, -1)]  # first .. last
            equal = np.logical_and.reduce([r == lead[0] for r in lead])
            # (either way round: the alignment also runs on the reversed sequences)
            grouped = (((lead[1] == lead[2]) & (lead[0] >= lead[1]))
                       | ((lead[0] == lead[1]) & (lead[2] >= lead[1]))) if k == 3 else equal
            ok[k:] = same & (equal | grouped)
            rows[k:] = sum(lead)
            trailing[k:] = main[last, 1:]
            ranks[k:] = rank[last]
        return _Runs(ok, rows, trailing, ranks)

    def hold(self, whole: np.ndarray, rank: int, lo: int, hi: int) -> np.ndarray:
        """Per end j in lo..hi-1: ``whole`` (one unit's main shape) is the run's parts stacked
        along its first axis (or, 2-d stored (in, out), along its second)."""
        ok, rows, trailing = self.ok[lo:hi], self.rows[lo:hi], self.trailing[lo:hi]
        same_rank = self.rank[lo:hi] == rank
        axis0 = (rows == whole[0]) & (trailing == whole[1:]).all(axis=1)
        axis1 = (rank == 2) & (rows == whole[1]) & (trailing[:, 0] == whole[0])
        return ok & same_rank & (axis0 | axis1)

    def held_by(self, end: int, wholes: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """Per row of ``wholes``: it holds the run ending at ``end`` stacked (see `hold`)."""
        rows, trailing = self.rows[end], self.trailing[end]
        same_rank = ranks == self.rank[end]
        axis0 = (wholes[:, 0] == rows) & (wholes[:, 1:] == trailing).all(axis=1)
        axis1 = (ranks == 2) & (wholes[:, 1] == rows) & (wholes[:, 0] == trailing[0])
        return bool(self.ok[end]) & same_rank & (axis0 | axis1)


_MAX_RANK = 8


def _main_shapes(sigs: Sequence[Signature]) -> tuple[np.ndarray, np.ndarray]:
    """Each signature's largest tensor shape, padded to `_MAX_RANK` with -1, and its rank."""
    main = np.full((len(sigs), _MAX_RANK), -1, dtype=np.int64)
    rank = np.zeros(len(sigs), dtype=np.int64)
    for k, (_, shapes) in enumerate(sigs):
        if not shapes:
            continue
        shape = min(shapes, key=size_order)[:_MAX_RANK]
        main[k, :len(shape)] = shape
        rank[k] = len(shape)
    return main, rank
