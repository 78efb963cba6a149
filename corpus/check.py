"""Checking a pair: run its models, find tied tensors, validate its truth, prove it by its converter."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._run import run_model

if TYPE_CHECKING:
    from ._pair import Pair

__all__ = ["norm_eps_profile", "read_release", "run_model", "tied_aliases", "validate_truth",
           "verify_truth"]


def tied_aliases(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``alias -> primary`` for state_dict keys that share storage with an earlier key (of a
    module, or of a state dict such as a loaded checkpoint, where ``torch.save`` kept the ties)."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    state = model.state_dict(keep_vars=True) if isinstance(model, nn.Module) else model
    for key, tensor in state.items():
        if tensor.numel() == 0:
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def read_release(pair: Pair, folder: Path, src: nn.Module | None = None
                 ) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write ``pair``'s release of ``src`` (``pair.make_src()`` when None) into ``folder``.

    Returns the path a user passes (file or folder) and the checkpoint state the truth names.

    Raises
    ------
    ValueError
        If the pair has no release.
    """
    if pair.release is None:
        raise ValueError(f"{pair.name} has no release: its source is a module")
    src = src if src is not None else pair.make_src()
    path = pair.release.write(src, folder)
    return path, pair.release.read(path)


def validate_truth(pair: Pair, src: nn.Module | Mapping[str, torch.Tensor] | None = None,
                   dst: nn.Module | None = None) -> list[str]:
    """Consistency problems of ``pair.truth`` (an empty list when there are none).

    Checks that truth keys exist on their side, that tied aliases are neither truth keys nor truth
    sources, that `Pair.tied_dst` matches the destination's actual aliases, and, for exact pairs,
    that the truth covers every destination key but the aliases. For a pair with a release, the
    source side is the checkpoint's state: pass it as ``src``, or pass the module (or nothing) and
    the release is written to a temporary folder and read back.
    """
    src = src if src is not None else pair.make_src()
    dst = dst if dst is not None else pair.make_dst()
    if pair.release is not None and isinstance(src, nn.Module):
        with tempfile.TemporaryDirectory() as folder:
            src = read_release(pair, Path(folder), src)[1]
    src_state = src.state_dict() if isinstance(src, nn.Module) else src
    src_keys, dst_keys = set(src_state), set(dst.state_dict())
    src_aliases, dst_aliases = tied_aliases(src), tied_aliases(dst)
    truth = pair.truth(src, dst)
    problems: list[str] = []
    if dict(pair.tied_dst) != dst_aliases:
        problems.append(f"tied_dst {dict(pair.tied_dst)} != actual destination aliases {dst_aliases}")
    for key, sources in truth.items():
        if key not in dst_keys:
            problems.append(f"truth key {key!r} is not a destination key")
        if key in dst_aliases:
            problems.append(f"truth key {key!r} is a tied alias of {dst_aliases[key]!r}")
        if not sources:
            problems.append(f"truth key {key!r} has no source keys")
        if len(set(sources)) != len(sources):
            problems.append(f"truth key {key!r} repeats a source key: {sources}")
        for source in sources:
            if source not in src_keys:
                problems.append(f"{key!r} <- {source!r}: not a source key")
            elif source in src_aliases:
                problems.append(f"{key!r} <- {source!r}: a tied alias of {src_aliases[source]!r}")
    if pair.exact:
        uncovered = sorted(dst_keys - set(truth) - set(dst_aliases))
        if uncovered:
            problems.append(f"exact pair, but the truth misses {len(uncovered)} destination keys: "
                            f"{uncovered[:5]}")
    return problems


def verify_truth(pair: Pair) -> float:
    """Build both models, convert with ``pair.convert``, load strictly, return max |output diff|.

    For a pair with a release, the source module's release is written to a temporary folder and
    the converter reads the checkpoint's state (``pair.release.read``), not the module.

    Raises
    ------
    ValueError
        If the pair is not exact (it has no converter), or the converter's keys are not exactly
        the truth's keys plus the tied aliases.
    RuntimeError
        From ``load_state_dict(strict=True)`` if the converted state_dict does not fit.
    """
    if not pair.exact or pair.convert is None:
        raise ValueError(f"{pair.name} is a partial pair: it has no exact converter to verify")
    src, dst = pair.make_src(), pair.make_dst()
    state: Mapping[str, torch.Tensor] = src.state_dict()
    if pair.release is not None:
        with tempfile.TemporaryDirectory() as folder:
            state = read_release(pair, Path(folder), src)[1]
    converted = pair.convert(state, dst)
    expected = set(pair.truth(state, dst)) | {alias for alias, _ in pair.tied_dst}
    if set(converted) != expected:
        raise ValueError(f"{pair.name}: converter keys differ from truth keys + aliases: "
                         f"{sorted(set(converted) ^ expected)[:5]}")
    dst.load_state_dict(converted, strict=True)
    inputs = pair.make_inputs()
    return float((run_model(src, inputs) - run_model(dst, inputs)).abs().max())


def norm_eps_profile(model: nn.Module) -> list[float]:
    """Sorted epsilons of every normalisation layer (``eps`` or ``variance_epsilon``).

    Differences of eps (1e-5 vs 1e-6) barely move outputs, so exact pairs are also checked to have
    the same profile on both sides.
    """
    values: list[float] = []
    for module in model.modules():
        for attr in ("eps", "variance_epsilon"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and "norm" in type(module).__name__.lower():
                values.append(value)
    return sorted(values)
