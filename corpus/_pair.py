"""What a pair of the corpus is, and how one is built: seeded models, inputs, truth rules.

See the package docstring (`corpus`) for the conventions every pair follows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ._run import run_model

__all__ = ["BN_CALIBRATION", "CALIBRATION_SEED", "DST_SEED", "INPUT_SEED", "SRC_SEED", "KeyTruth",
           "Pair", "Release", "Rule", "Transform", "Truth", "build_model", "concat_rows", "copy_tensor",
           "identity_truth", "image_input", "make_converter", "make_pair", "map_keys",
           "on_modules", "token_input", "token_tensor"]

SRC_SEED = 0  # torch seed used to build every source model
CALIBRATION_SEED = 3  # seed of the batch that sets the sources' BatchNorm statistics
DST_SEED = 1  # torch seed used to build every destination model
INPUT_SEED = 2  # seed of the example inputs

Truth = dict[str, tuple[str, ...]]
StateDict = dict[str, torch.Tensor]
KeyTruth = Callable[[Sequence[str], Sequence[str]], Truth]
Transform = Callable[[str, Sequence[torch.Tensor]], torch.Tensor]
Rule = tuple[str, str | Callable[[re.Match[str]], str | tuple[str, ...]]]


class Release(NamedTuple):
    """How a pair's source is released as a checkpoint, and how its hand-written converter reads it.

    The truth and the converter of a pair with a release name the *checkpoint's* keys: the keys of
    the state dict that `read` returns (shards merged, the chosen entry picked, prefixes kept).
    """

    format: str  # short name of the release format, e.g. "meta-consolidated-tp2"
    write: Callable[[nn.Module, Path], Path]  # writes the source module's weights into an empty
    # folder the way the release does; returns the path a user passes (a file or a folder)
    read: Callable[[Path], dict[str, torch.Tensor]]  # the hand-written reader: the checkpoint's
    # tensors under the keys the truth names
    entry: str = ""  # where the truth's state dict sits inside the file ("state_dict", "model_ema");
    # "" when the file (or every shard) is the state dict itself


@dataclass(frozen=True)
class Pair:
    """A source/destination model pair and its ground-truth parameter mapping.

    Attributes
    ----------
    name : str
        ``"<source>-><destination>"``, unique in `PAIRS`.
    make_src, make_dst : callable
        Build the (seeded, eval-mode, randomly initialised) source / destination model.
    make_inputs : callable
        An input both models accept: a Tensor, or a dict of keyword arguments (Hugging Face).
    exact : bool
        True when an exact port exists: the destination can compute the source's function.
    truth : callable
        ``truth(src, dst)`` -> ``{dst state_dict key: source key(s) feeding it}``; several source keys
        (in concatenation order) for fused tensors. ``src`` is the source module or a state dict.
    convert : callable or None
        ``convert(src_state_dict, dst)`` -> a destination state_dict implementing `truth`; None for
        partial pairs.
    note : str
        What is special about the pair.
    tied_dst : tuple of (alias, primary)
        Destination keys that are the same tensor as another destination key. Aliases are left out
        of the truth; converters fill them.
    release : Release or None
        How the source is released as a checkpoint. When set, ``truth`` and ``convert`` take the
        checkpoint's state (``release.read(path)``) in place of the source module's state_dict, and
        name its keys; `make_src` still builds the module that writes the release and gives the
        reference outputs.
    source_module : bool
        Whether a user porting this pair has the source module. False for checkpoint-only pairs:
        the release's file or folder is all there is.
    """

    name: str
    make_src: Callable[[], nn.Module]
    make_dst: Callable[[], nn.Module]
    make_inputs: Callable[[], Any]
    exact: bool
    truth: Callable[[nn.Module | Mapping[str, torch.Tensor], nn.Module], Truth]
    convert: Callable[[Mapping[str, torch.Tensor], nn.Module], StateDict] | None
    note: str
    tied_dst: tuple[tuple[str, str], ...] = ()
    release: Release | None = None
    source_module: bool = True


def build_model(factory: Callable[[], nn.Module], seed: int, *, decorrelate: bool,
           calibration: Callable[[], Any] | None = None) -> nn.Module:
    """Build ``factory()`` under ``seed`` without touching the global RNG; return it in eval mode.

    With ``decorrelate``, constant tensors are redrawn (`_redraw_constant_tensors`); with a
    ``calibration`` input, BatchNorm statistics are then set from one forward pass on it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
        if decorrelate:
            _redraw_constant_tensors(model, seed)
        if calibration is not None:
            _calibrate_batch_norm(model, calibration())
    return model.eval()


def _redraw_constant_tensors(model: nn.Module, seed: int) -> None:
    """Redraw every floating-point state tensor whose elements are all equal.

    Near-zero constants (biases, BatchNorm means, class tokens, ConvNeXt's 1e-6 layer scale) become
    ``0.1 * N(0, 1)``; other constants ``c`` (norm weights, BatchNorm variances) become
    ``c * U(0.8, 1.2)``, which keeps their sign. Tied tensors are redrawn once.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            flat = tensor.detach().reshape(-1)
            if bool(flat[-1] != flat[0]) or not bool((flat == flat[0]).all()):  # cheap test first
                continue
            value = float(flat[0])
            if abs(value) < 1e-3:
                new = 0.1 * torch.randn(tensor.shape, generator=generator)
            else:
                new = value * (0.8 + 0.4 * torch.rand(tensor.shape, generator=generator))
            tensor.copy_(new.to(tensor.dtype))


def _calibrate_batch_norm(model: nn.Module, inputs: Any) -> None:
    """Set every BatchNorm's running statistics from one training-mode pass over ``inputs``.

    At random init the running statistics (mean 0, variance 1) do not match the activations, which
    then grow layer after layer; MobileNetV2's ReLU6 saturates and its output stops depending on the
    weights at all. Calibrated statistics keep every layer's activations normalised, so outputs stay
    sensitive to every tensor (and differ from layer to layer: the statistics are decorrelated too).
    """
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    run_model(model, inputs)
    for module, momentum in zip(norms, momenta):
        module.momentum = momentum
    model.eval()


def image_input(*shape: int, seed: int = INPUT_SEED) -> Callable[[], torch.Tensor]:
    """An input factory for a seeded ``randn`` tensor of ``shape``."""
    def make() -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return make


def token_input(vocab: int, batch: int = 2, length: int = 16) -> Callable[[], dict[str, torch.Tensor]]:
    """An input factory for seeded ``input_ids`` (Hugging Face keyword arguments)."""
    def make() -> dict[str, torch.Tensor]:
        return {"input_ids": token_tensor(vocab, batch, length)()}
    return make


def token_tensor(vocab: int, batch: int = 2, length: int = 16) -> Callable[[], torch.Tensor]:
    """An input factory for seeded token ids as one positional tensor, for reference models whose
    ``forward(tokens)`` takes no keywords (Hugging Face models read it as ``input_ids``)."""
    def make() -> torch.Tensor:
        return torch.randint(0, vocab, (batch, length),
                             generator=torch.Generator().manual_seed(INPUT_SEED))
    return make


def map_keys(dst_keys: Iterable[str], rules: Sequence[Rule], *, skip: Iterable[str] = ()) -> Truth:
    """Apply the first matching rule to each destination key.

    A rule is ``(regex, replacement)``; the regex must match the whole key and the replacement is a
    `re.Match.expand` template or a callable returning one source key or a tuple of them. An empty
    tuple means "no source": the key is left out of the truth.

    Raises
    ------
    KeyError
        If no rule matches a destination key (every key must be accounted for explicitly).
    """
    skipped = set(skip)
    truth: Truth = {}
    for key in dst_keys:
        if key in skipped:
            continue
        for pattern, repl in rules:
            found = re.fullmatch(pattern, key)
            if found is None:
                continue
            out = repl(found) if callable(repl) else found.expand(repl)
            sources = (out,) if isinstance(out, str) else tuple(out)
            if sources:
                truth[key] = sources
            break
        else:
            raise KeyError(f"no rule maps destination key {key!r}")
    return truth


def on_modules(key_truth: KeyTruth
               ) -> Callable[[nn.Module | Mapping[str, torch.Tensor], nn.Module], Truth]:
    """Lift a truth over key lists to the public ``truth(src, dst)`` form; ``src`` is a module or a
    state dict (a release's checkpoint state)."""
    def truth(src: nn.Module | Mapping[str, torch.Tensor], dst: nn.Module) -> Truth:
        src_keys = list(src.state_dict()) if isinstance(src, nn.Module) else list(src)
        return key_truth(src_keys, list(dst.state_dict()))
    return truth


def copy_tensor(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The default transform: one source tensor, copied as is."""
    if len(tensors) != 1:
        raise ValueError(f"{key}: expected one source tensor, got {len(tensors)}")
    return tensors[0]


def make_converter(key_truth: KeyTruth, transform: Transform = copy_tensor,
               tied_dst: Sequence[tuple[str, str]] = ()
               ) -> Callable[[Mapping[str, torch.Tensor], nn.Module], StateDict]:
    """Build ``convert(src_state_dict, dst)`` from a truth and a per-key tensor transform."""
    def convert(src_state: Mapping[str, torch.Tensor], dst: nn.Module) -> StateDict:
        dst_keys = list(dst.state_dict())
        aliases = dict(tied_dst)
        truth = key_truth(list(src_state), dst_keys)
        out: StateDict = {}
        for key in dst_keys:
            if key in aliases:
                continue
            tensors = [src_state[k].detach().clone() for k in truth[key]]
            out[key] = transform(key, tensors).contiguous()
        for alias, primary in tied_dst:
            out[alias] = out[primary]
        return out
    return convert


def identity_truth(src_keys: Sequence[str], dst_keys: Sequence[str],
                    skip: Iterable[str] = ()) -> Truth:
    """Every destination key is fed by the source key of the same name."""
    return map_keys(dst_keys, [(r"(.+)", r"\1")], skip=skip)


def make_pair(name: str, src: Callable[[], nn.Module], dst: Callable[[], nn.Module],
          inputs: Callable[[], Any], key_truth: KeyTruth, note: str, *, exact: bool,
          transform: Transform = copy_tensor, tied_dst: tuple[tuple[str, str], ...] = (),
          calibration: Callable[[], Any] | None = None, release: Release | None = None,
          source_module: bool = True) -> Pair:
    """A `Pair` with seeded, decorrelated models whose truth and converter come from ``key_truth``
    (over the source's keys, or the release's checkpoint keys) and ``transform``."""
    return Pair(
        name=name,
        make_src=lambda: build_model(src, SRC_SEED, decorrelate=True, calibration=calibration),
        make_dst=lambda: build_model(dst, DST_SEED, decorrelate=False),
        make_inputs=inputs,
        exact=exact,
        truth=on_modules(key_truth),
        convert=make_converter(key_truth, transform, tied_dst) if exact else None,
        note=" ".join(note.split()),
        tied_dst=tied_dst,
        release=release,
        source_module=source_module,
    )


def concat_rows(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fused projections are the row-wise concatenation of their parts, in truth order."""
    return torch.cat(list(tensors), dim=0)


BN_CALIBRATION = image_input(8, 3, 64, 64, seed=CALIBRATION_SEED)
