"""Published peers and hand-written baselines for archalign's accuracy benchmark.

Every entry of :data:`PEERS` is a function ``fn(src_model, dst_model, example_inputs) -> PeerResult``
that runs one competing approach on one model pair, in this process, and never raises: an exception
raised by the peer is caught into :attr:`PeerResult.error`. None of them modifies the models passed
in (they read ``state_dict()`` tensors, clone what they hand on, and give deep copies to any peer
that wants the modules themselves). :func:`apply_peer` then writes a result into a destination model.

Entries
-------
``by_name``
    The idiom people write around ``load_state_dict(strict=False)``: every dst key takes the src
    tensor of the *same key* when the shapes agree. (Plain ``load_state_dict(strict=False)`` would
    raise on the first size mismatch, so the usual hand-written version filters on shape first;
    that filtered version is what is implemented.)
``by_order``
    ``timm.models._helpers.remap_state_dict`` made tolerant. timm zips ``model.state_dict()`` with
    the checkpoint in registration order (``zip`` stops at the shorter one), asserts that each pair
    has the same ``numel`` and reshapes the src tensor to the dst shape when the shapes differ.
    Here the walk is the same positional ``zip``; a position whose ``numel`` agrees is paired
    (reshaped when the shapes differ, as timm's default ``allow_reshape=True`` does), and a position
    whose ``numel`` differs is skipped instead of aborting the whole remap. Positions never
    re-synchronise: after an insertion in one model, every later pair is still offset.
    ``notes["timm_would_raise"]`` holds the message timm itself would have raised (or ``None``).
``weightbridge``
    ``weightbridge.adapt(src_state_dict, dst_state_dict, cache=<tmp>.json)`` with every other
    argument at its default (no ``in_format``/``out_format`` so no axis permutation, no hints,
    ``ignore_unmatched_inputs=ignore_unmatched_outputs=False``). ``adapt`` returns the converted
    dst state dict (reshapes included); the pairing itself is not returned, so it is read back
    from the JSON cache file that ``adapt`` writes on success (``[[out_name, in_name], ...]``).
    On failure it prints a "Failed to pair the following nodes" listing and raises
    ``ValueError``; the listing is kept in ``notes["log"]``.
``lit-wsl``
    ``lit_wsl.mapper.weight_mapper.WeightMapper(src_copy, dst_copy)`` then ``suggest_mapping()``
    with every default: strategy ``"greedy"``, threshold 0.0, weights shape 0.4 / name 0.1 /
    hierarchy 0.5, ``buffer_matching_mode="exclude"`` (BatchNorm running statistics and every other
    buffer are never mapped), no ``dummy_input`` (so no execution-order term) and
    ``validate_outputs=True`` (its own forward-pass check at an input it infers from the first
    layer; its verdict is kept in ``notes["output_validation"]``). It only maps: its suggested
    transposes are code strings, listed in ``notes["transformations"]``, so ``state_dict`` is None.
    Scores are each match's ``final_score`` (the composite score ``get_mapping_with_scores``
    returns); its gap-based ``confidence_score`` is in ``notes["confidence"]``.
    Its fallback (per-parameter) matcher walks a ``set`` of target names and keeps the first of
    equally scored candidates, so on exact ties its answer depends on ``PYTHONHASHSEED`` (seen on
    the ViT pair: the qkv weights or biases of the two blocks swap for some seeds, and its
    ``confidence_score`` stays 1.0 on them because it only compares same-leaf-name candidates).
    ``notes["match_type"]`` tells which dst keys came from that fallback (``"individual"``) rather
    than from module-level matching (``"group"``). A benchmark should fix ``PYTHONHASHSEED`` before
    starting Python (recorded in ``notes["pythonhashseed"]``) or report lit-wsl over several seeds.

:data:`EXTRA_PEERS` holds non-default lit-wsl variants (``strategy="optimal"``, and
``dummy_input=example_inputs``) for anyone who wants to see how much those knobs move it.

``seconds`` is the wall time of the peer's own work, reading the state dicts included; importing the
peer's package (lit-wsl imports lightning) and deep copies made only to protect the caller's models
are excluded. The first call of anything in a fresh process still pays torch's own warm-up, so a
benchmark should run each peer once untimed first.

Run ``python benchmarks/peers.py`` for the smoke test on torchvision -> timm ResNet-18 and ViT.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

__all__ = ["EXTRA_PEERS", "PEERS", "PeerFn", "PeerResult", "apply_peer", "smoke_test"]

_LOG_LIMIT = 20_000


@dataclass
class PeerResult:
    """What one peer produced for one (src, dst) pair.

    Attributes:
        mapping: dst state_dict key -> the source key(s) the peer chose for it.
        state_dict: tensors the peer itself produced for dst keys (with its own reshapes or
            transposes), or None when the peer only maps names.
        scores: dst key -> the peer's own score for that choice (empty when it gives none).
        error: ``"ExceptionType: message"`` when the peer raised; mapping is then empty.
        seconds: wall time of the peer's work.
        notes: peer-specific diagnostics (version, captured log, unmatched keys, ...).
        source_tensors: clones of the src tensors named in ``mapping``, so that
            :func:`apply_peer` can write a mapping-only result without the source model.
    """

    mapping: dict[str, tuple[str, ...]]
    state_dict: dict[str, torch.Tensor] | None
    scores: dict[str, float]
    error: str | None
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)
    source_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


PeerFn = Callable[[nn.Module, nn.Module, Any], PeerResult]


# --------------------------------------------------------------------------------------------
# shared plumbing
# --------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    """Installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as detached tensors (still sharing storage with the module)."""
    return {k: v.detach() for k, v in module.state_dict().items()}


def _clone_used(src_sd: dict[str, torch.Tensor],
                mapping: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """Clones of the src tensors that ``mapping`` refers to."""
    used = {k for keys in mapping.values() for k in keys}
    return {k: src_sd[k].clone() for k in used if k in src_sd}


@contextlib.contextmanager
def _captured(notes: dict[str, Any]) -> Iterator[None]:
    """Capture stdout, stderr and warnings of a peer into ``notes["log"]`` (truncated)."""
    buf = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield
        finally:
            text = buf.getvalue()
            text += "".join(f"warning: {w.category.__name__}: {w.message}\n" for w in caught)
            if text:
                notes["log"] = text if len(text) <= _LOG_LIMIT else "...\n" + text[-_LOG_LIMIT:]


def _failed(exc: BaseException, seconds: float, notes: dict[str, Any]) -> PeerResult:
    """A PeerResult for a peer that raised."""
    return PeerResult(mapping={}, state_dict=None, scores={}, error=f"{type(exc).__name__}: {exc}",
                      seconds=seconds, notes=notes)


def _guarded(fn: Callable[[nn.Module, nn.Module, Any, dict[str, Any]], PeerResult]) -> PeerFn:
    """Wrap a peer body so that it never raises and its output is captured."""

    def run(src: nn.Module, dst: nn.Module, example_inputs: Any = None) -> PeerResult:
        notes: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            with _captured(notes):
                return fn(src, dst, example_inputs, notes)
        except Exception as exc:
            return _failed(exc, time.perf_counter() - start, notes)

    run.__name__ = getattr(fn, "__name__", "peer").lstrip("_")
    run.__doc__ = fn.__doc__
    return run


# --------------------------------------------------------------------------------------------
# naive baselines
# --------------------------------------------------------------------------------------------


def _by_name(src: nn.Module, dst: nn.Module, example_inputs: Any, notes: dict[str, Any]) -> PeerResult:
    """dst key <- the same key in src, when both exist and the shapes agree."""
    start = time.perf_counter()
    src_sd, dst_sd = _snapshot(src), _snapshot(dst)
    mapping: dict[str, tuple[str, ...]] = {
        k: (k,) for k, v in dst_sd.items() if k in src_sd and src_sd[k].shape == v.shape}
    notes["shape_mismatch"] = sorted(k for k, v in dst_sd.items()
                                     if k in src_sd and src_sd[k].shape != v.shape)
    notes["missing_in_src"] = sorted(k for k in dst_sd if k not in src_sd)
    seconds = time.perf_counter() - start
    return PeerResult(mapping=mapping, state_dict=None, scores={}, error=None, seconds=seconds,
                      notes=notes, source_tensors=_clone_used(src_sd, mapping))


def _by_order(src: nn.Module, dst: nn.Module, example_inputs: Any, notes: dict[str, Any]) -> PeerResult:
    """Positional zip of the two state dicts, pairing equal-numel entries (timm remap_state_dict)."""
    start = time.perf_counter()
    src_sd, dst_sd = _snapshot(src), _snapshot(dst)
    mapping: dict[str, tuple[str, ...]] = {}
    out: dict[str, torch.Tensor] = {}
    reshaped: list[str] = []
    skipped: list[tuple[str, str]] = []
    timm_error: str | None = None
    for (kd, vd), (ks, vs) in zip(dst_sd.items(), src_sd.items()):
        if vd.numel() != vs.numel():
            skipped.append((kd, ks))
            if timm_error is None:
                timm_error = f"Tensor size mismatch {kd}: {vd.shape} vs {ks}: {vs.shape}. Remap failed."
            continue
        mapping[kd] = (ks,)
        if vs.shape != vd.shape:
            reshaped.append(kd)
            out[kd] = vs.reshape(vd.shape).clone()
        else:
            out[kd] = vs.clone()
    notes.update(n_src=len(src_sd), n_dst=len(dst_sd), reshaped=reshaped, skipped=skipped,
                 timm_would_raise=timm_error)
    seconds = time.perf_counter() - start
    return PeerResult(mapping=mapping, state_dict=out, scores={}, error=None, seconds=seconds, notes=notes)


# --------------------------------------------------------------------------------------------
# published peers
# --------------------------------------------------------------------------------------------


def _weightbridge(src: nn.Module, dst: nn.Module, example_inputs: Any, notes: dict[str, Any]) -> PeerResult:
    """weightbridge.adapt(src_sd, dst_sd) with its defaults; pairing read back from its cache file."""
    notes["version"] = _version("weightbridge")
    try:  # imported outside the timed region
        import weightbridge
        from weightbridge.matcher import LOAD_PREFIX
    except Exception as exc:
        return _failed(exc, 0.0, notes)
    start = time.perf_counter()
    try:
        # Clones: adapt() hands back numpy views of its inputs, so outputs would alias src weights.
        src_sd = {k: v.detach().cpu().clone() for k, v in src.state_dict().items()}
        dst_sd = {k: v.detach().cpu() for k, v in dst.state_dict().items()}
        with tempfile.TemporaryDirectory(prefix="weightbridge-") as tmp:
            cache = os.path.join(tmp, "mapping.json")
            adapted = weightbridge.adapt(src_sd, dst_sd, cache=cache)
            with open(cache) as f:
                pairs = json.load(f)["mapping"]
    except Exception as exc:
        return _failed(exc, time.perf_counter() - start, notes)
    seconds = time.perf_counter() - start

    cut = len(LOAD_PREFIX) + 1  # names in the cache carry "load_prefix" + separator
    mapping: dict[str, tuple[str, ...]] = {out[cut:]: (inp[cut:],) for out, inp in pairs}
    state_dict = {k: torch.as_tensor(v) for k, v in adapted.items()}
    notes["outputs_without_cached_pair"] = sorted(set(state_dict) - set(mapping))
    return PeerResult(mapping=mapping, state_dict=state_dict, scores={}, error=None, seconds=seconds,
                      notes=notes)


def _lit_wsl(src: nn.Module, dst: nn.Module, example_inputs: Any, notes: dict[str, Any], *,
             strategy: str | None = None, use_example_inputs: bool = False) -> PeerResult:
    """lit-wsl WeightMapper(src, dst).suggest_mapping() with its defaults unless told otherwise."""
    notes["version"] = _version("lit-wsl")
    # WeightMapper calls .eval() and forward() on the modules it is given: hand it copies.
    src_copy, dst_copy = copy.deepcopy(src), copy.deepcopy(dst)
    dummy: torch.Tensor | None = None
    if use_example_inputs:
        if isinstance(example_inputs, torch.Tensor):
            dummy = example_inputs
        else:
            notes["dummy_input_skipped"] = "WeightMapper only accepts a single tensor as dummy_input"
    notes["dummy_input"] = dummy is not None
    try:  # imported outside the timed region (it pulls in lightning: seconds on first import)
        from lit_wsl.mapper.weight_mapper import WeightMapper
    except Exception as exc:
        return _failed(exc, 0.0, notes)
    start = time.perf_counter()
    try:
        mapper = WeightMapper(src_copy, dst_copy, dummy_input=dummy)
        result = mapper.suggest_mapping() if strategy is None else mapper.suggest_mapping(strategy=strategy)
    except Exception as exc:
        return _failed(exc, time.perf_counter() - start, notes)
    seconds = time.perf_counter() - start

    mapping: dict[str, tuple[str, ...]] = {}
    scores: dict[str, float] = {}
    confidence: dict[str, float] = {}
    transformations: dict[str, tuple[str, str | None]] = {}
    duplicates: list[tuple[str, str]] = []
    match_type: dict[str, str] = {}
    for src_name, (dst_name, score) in result.get_mapping_with_scores().items():
        if dst_name in mapping:
            duplicates.append((dst_name, src_name))
            continue
        mapping[dst_name] = (src_name,)
        scores[dst_name] = float(score)
        match = result.parameter_matches[src_name]
        confidence[dst_name] = float(match.confidence_score)
        if match.transformation is not None:
            transformations[dst_name] = (match.transformation.type, match.transformation_code)
        match_type[dst_name] = match.match_type
    validation = result.output_validation
    notes.update(
        strategy=result.strategy,
        buffer_matching_mode=mapper.buffer_matching_mode,
        coverage=result.coverage,
        confidence=confidence,
        transformations=transformations,
        duplicate_targets=duplicates,
        match_type=match_type,
        pythonhashseed=os.environ.get("PYTHONHASHSEED"),
        unmatched_source=result.get_unmatched(),
        unmatched_targets=list(result.unmatched_targets),
        output_validation=None if validation is None else {
            "passed": validation.validation_passed, "cosine": validation.output_cosine_sim,
            "max_diff": validation.output_max_diff, "error": validation.error_message},
    )
    return PeerResult(mapping=mapping, state_dict=None, scores=scores, error=None, seconds=seconds,
                      notes=notes, source_tensors=_clone_used(_snapshot(src), mapping))


by_name: PeerFn = _guarded(_by_name)
by_order: PeerFn = _guarded(_by_order)
weightbridge_peer: PeerFn = _guarded(_weightbridge)
lit_wsl_peer: PeerFn = _guarded(_lit_wsl)

PEERS: dict[str, PeerFn] = {
    "by_name": by_name,
    "by_order": by_order,
    "weightbridge": weightbridge_peer,
    "lit-wsl": lit_wsl_peer,
}
"""The comparison set: name -> fn(src_model, dst_model, example_inputs) -> PeerResult."""

EXTRA_PEERS: dict[str, PeerFn] = {
    "lit-wsl[optimal]": _guarded(partial(_lit_wsl, strategy="optimal")),
    "lit-wsl[dummy_input]": _guarded(partial(_lit_wsl, use_example_inputs=True)),
}
"""Non-default lit-wsl settings, kept out of :data:`PEERS` on purpose."""
for _name, _fn in EXTRA_PEERS.items():
    _fn.__name__ = _name


# --------------------------------------------------------------------------------------------
# applying a result
# --------------------------------------------------------------------------------------------


def apply_peer(result: PeerResult, dst_model: nn.Module) -> int:
    """Load a peer's output into ``dst_model`` and return how many tensors were written.

    The peer's own ``state_dict`` is used when it produced one; otherwise each mapped dst key takes
    the (single) source tensor it was mapped to. Either way a tensor is written only when its shape
    equals the dst tensor's shape (values are cast to the dst dtype and device); everything else in
    ``dst_model`` is left as it was. A failed result writes nothing.
    """
    if result.error is not None:
        return 0
    if result.state_dict is not None:
        tensors = dict(result.state_dict)
    else:
        tensors = {dst_key: result.source_tensors[keys[0]] for dst_key, keys in result.mapping.items()
                   if len(keys) == 1 and keys[0] in result.source_tensors}
    dst_sd = dst_model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        target = dst_sd.get(key)
        value = torch.as_tensor(value)
        if target is None or tuple(value.shape) != tuple(target.shape):
            continue
        to_load[key] = value.to(device=target.device, dtype=target.dtype)
    if to_load:
        dst_model.load_state_dict(to_load, strict=False)
    return len(to_load)


# --------------------------------------------------------------------------------------------
# smoke test
# --------------------------------------------------------------------------------------------


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Make a freshly built model look trained: jitter every parameter, random BN statistics.

    torchvision's ViT zero-initialises its head, which would make every output zero and hide
    any mistake upstream of it; untouched LayerNorm/BatchNorm affines would hide swapped norms.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                assert m.running_var is not None
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def _smoke_pairs() -> dict[str, tuple[nn.Module, nn.Module, torch.Tensor]]:
    """The two smoke-test pairs: torchvision -> timm ResNet-18 and a small ViT."""
    import timm
    import torchvision
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from torchvision.models.vision_transformer import VisionTransformer as TvViT

    torch.manual_seed(0)
    rn_src = _randomise(torchvision.models.resnet18(), 0)
    torch.manual_seed(1)
    rn_dst = timm.create_model("resnet18", pretrained=False).eval()
    torch.manual_seed(2)
    vit_src = _randomise(TvViT(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                               mlp_dim=128, num_classes=10), 2)
    torch.manual_seed(3)
    vit_dst = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
                      num_classes=10, global_pool="token").eval()
    gen = torch.Generator().manual_seed(4)
    return {
        "tv_resnet18->timm_resnet18": (rn_src, rn_dst, torch.randn(2, 3, 64, 64, generator=gen)),
        "tv_vit->timm_vit": (vit_src, vit_dst, torch.randn(2, 3, 32, 32, generator=gen)),
    }


def _fingerprint(model: nn.Module) -> tuple[bool, dict[str, torch.Tensor]]:
    """Training flag and a cloned state dict, to check that a peer left a model alone."""
    return model.training, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: tuple[bool, dict[str, torch.Tensor]]) -> bool:
    """Whether ``model`` still matches the fingerprint ``before``."""
    training, sd = _fingerprint(model)
    return training == before[0] and sd.keys() == before[1].keys() and all(
        torch.equal(sd[k], before[1][k]) for k in sd)


def smoke_test(peers: dict[str, PeerFn] | None = None) -> list[dict[str, Any]]:
    """Run ``peers`` (default: PEERS and EXTRA_PEERS) on the smoke pairs; one row per (pair, peer).

    Each row holds the tensor counts, the error, the seconds, whether the input models were left
    untouched, and the max abs difference between src and dst outputs (eval mode) after
    :func:`apply_peer` into a copy of the dst model.
    """
    peers = peers if peers is not None else {**PEERS, **EXTRA_PEERS}
    rows: list[dict[str, Any]] = []
    for pair_name, (src, dst, x) in _smoke_pairs().items():
        with torch.no_grad():
            ref = src(x)
            before_diff = float((dst(x) - ref).abs().max())
            ref_scale = float(ref.abs().max())
        n_dst = len(dst.state_dict())
        for peer_name, fn in peers.items():
            src_before, dst_before = _fingerprint(src), _fingerprint(dst)
            result = fn(src, dst, x)
            untouched = _unchanged(src, src_before) and _unchanged(dst, dst_before)
            target = copy.deepcopy(dst).eval()
            written = apply_peer(result, target)
            with torch.no_grad():
                diff = float((target(x) - ref).abs().max())
            rows.append({
                "pair": pair_name, "peer": peer_name, "n_dst": n_dst, "mapped": len(result.mapping),
                "written": written, "error": result.error, "seconds": result.seconds,
                "untouched": untouched, "diff_before": before_diff, "diff_after": diff,
                "ref_scale": ref_scale, "scored": len(result.scores),
            })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render :func:`smoke_test` rows as a Markdown table."""
    lines = ["| pair | peer | mapped/dst | written | max abs diff before -> after (max abs src out) "
             "| seconds | models untouched | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = r["error"].splitlines()[0][:80] if r["error"] else ""
        lines.append(f"| {r['pair']} | {r['peer']} | {r['mapped']}/{r['n_dst']} | {r['written']} | "
                     f"{r['diff_before']:.3g} -> {r['diff_after']:.3g} ({r['ref_scale']:.3g}) | "
                     f"{r['seconds']:.3f} | {r['untouched']} | {err} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"PYTHONHASHSEED={os.environ.get('PYTHONHASHSEED', 'random')}")
    print(format_table(smoke_test()))
