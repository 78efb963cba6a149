"""Inputs for running two models: bound to each one's calling convention, or made from the models.

Running both models is the strongest evidence there is, so `align(src, dst)` with two arguments
makes an input when none is given, from what the models say about themselves: timm's
``pretrained_cfg["input_size"]`` and ``patch_embed.img_size``, a Hugging Face model's
``main_input_name`` and config (``image_size``, ``num_channels``, ``vocab_size``), torchvision's
``image_size``, and otherwise the first layer's channels, features or vocabulary. Each candidate
is small, seeded, and kept only when both models run on it. Making an input never raises: when
nothing works, `make_inputs` says why.

The same input may have to be passed differently: a Hugging Face model takes ``pixel_values=``,
a timm or torchvision model a positional tensor. `bind` adapts a user's input to each model.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .running import ExampleInputs, dummy_inputs, first_line, run_in_eval

__all__ = ["BATCH", "BoundInputs", "bind", "make_inputs"]

logger = logging.getLogger(__name__)

BATCH = 2  # samples per made input: two, so that an output that ignores its input shows it
_SEQUENCE = 16  # tokens per made sequence
_SMALL_SIDES = (32,)  # image sides tried first: a convolutional model takes any, cheaply
_IMAGE_SIDES = (32, 64, 224)  # image sides tried when a model does not say its own
_MAX_ELEMENTS = 2_000_000  # a made input larger than this is not tried (a cheap check, not a load)


class BoundInputs(NamedTuple):
    """One input, as each model takes it."""

    src: ExampleInputs  # what the source model is called with
    dst: ExampleInputs  # what the destination model is called with
    how: str  # where it came from: "given", or what it was made from ("made: ...")


def bind(src: nn.Module, dst: nn.Module, inputs: ExampleInputs, how: str = "given"
         ) -> BoundInputs:
    """The user's (or a made) input as each model takes it.

    A one-tensor dict goes positionally to a model whose ``forward`` has no parameter of that
    name (timm, torchvision); a tensor goes by keyword to a Hugging Face model whose first
    ``forward`` parameter is not its ``main_input_name``. Anything else is passed as it is.
    """
    return BoundInputs(src=_bound(src, inputs), dst=_bound(dst, inputs), how=how)


def _bound(model: nn.Module, inputs: ExampleInputs) -> ExampleInputs:
    names = _forward_parameters(model)
    if isinstance(inputs, Mapping) and len(inputs) == 1 and names is not None:
        (key, value), = inputs.items()
        if key not in names and isinstance(value, torch.Tensor) and not _takes_kwargs(model):
            return value
    if isinstance(inputs, torch.Tensor):
        main = getattr(model, "main_input_name", None)
        if isinstance(main, str) and names and names[0] != main and main in names:
            return {main: inputs}
    return inputs


def _forward_parameters(model: nn.Module) -> list[str] | None:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in parameters
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _takes_kwargs(model: nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD for p in parameters)


# --------------------------------------------------------------------------- making inputs


class _Candidate(NamedTuple):
    """An input to try, and what it was made from."""

    make: Callable[[], Any]  # builds it (seeded)
    how: str  # what it was made from


def make_inputs(src: nn.Module, dst: nn.Module) -> tuple[BoundInputs | None, str]:
    """An input both models run on, made from what they say about themselves.

    Returns
    -------
    (BoundInputs or None, str)
        The input (None when nothing worked) and what was made or tried, for the plan.
    """
    tried: list[str] = []
    seen: set[str] = set()
    for candidate in _candidates(src, dst):
        if candidate.how in seen:
            continue
        seen.add(candidate.how)
        try:
            value = candidate.make()
        except Exception as exc:  # a hint that does not make a tensor
            logger.debug("cannot make %s: %s", candidate.how, first_line(exc))
            continue
        bound = bind(src, dst, value, how=f"made: {candidate.how}")
        problem = _runs_on_both(src, dst, bound)
        if problem is None:
            logger.info("made an input for both models: %s", candidate.how)
            return bound, bound.how
        tried.append(f"{candidate.how} ({problem})")
    why = "; ".join(tried[:4]) or "neither model says what it takes"
    return None, f"no input could be made for both models: {why}"


def _runs_on_both(src: nn.Module, dst: nn.Module, bound: BoundInputs) -> str | None:
    for role, model, inputs in (("source", src, bound.src), ("destination", dst, bound.dst)):
        try:
            run_in_eval(model, inputs)
        except Exception as exc:  # the model rejects it: try the next candidate
            return f"the {role} raised {type(exc).__name__}: {first_line(exc)[:80]}"
    return None


def _candidates(src: nn.Module, dst: nn.Module) -> Iterator[_Candidate]:
    """Inputs to try, most specific first: a model's own ``dummy_inputs`` (Hugging Face), what
    either model declares, then its first layer."""
    for role, model in (("source", src), ("destination", dst)):
        dummy = dummy_inputs(model)
        if dummy is not None:
            yield _Candidate(_constant(dummy), f"the {role}'s dummy_inputs")
    for model in (src, dst):
        config_made = _from_config(model)
        if config_made is not None:
            yield config_made
    vocab = _common_vocabulary(src, dst)
    for model in (dst, src):
        main = getattr(model, "main_input_name", None)
        if main == "input_ids" and vocab:
            yield _tokens(vocab, f"token ids below the vocabulary {vocab}")
    channels = _first(_channels(m) for m in (dst, src))
    sides = [*_SMALL_SIDES, *(s for s in _declared_sides(dst, src) if s not in _SMALL_SIDES)]
    if channels or sides[len(_SMALL_SIDES):]:  # a model that takes images: the cheapest first
        for side in sides:
            yield _image(channels or 3, side, "small images" if side in _SMALL_SIDES else
                         "the models' declared image size")
    if vocab:
        yield _tokens(vocab, f"token ids below the vocabulary {vocab}")
    for model in (dst, src):
        yield from _from_first_layer(model)
    for side in _IMAGE_SIDES:
        yield _image(channels or 3, side, "a default image size")


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


def _from_config(model: nn.Module) -> _Candidate | None:
    """What a Hugging Face model's ``forward`` takes, made from its config: token ids below its
    vocabulary, images of its size and channels, log-mel features of its length, raw audio, and
    decoder ids for an encoder-decoder (a text+vision model gets both ids and images)."""
    config = getattr(model, "config", None)
    names = _forward_parameters(model) or []
    if config is None or not names:
        return None
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None) or config
    parts: dict[str, tuple[str, tuple[int, ...], int]] = {}  # name -> (kind, shape, vocabulary)
    vocab = getattr(text, "vocab_size", None)
    if "input_ids" in names and isinstance(vocab, int):
        parts["input_ids"] = ("ids", (BATCH, _SEQUENCE), vocab)
    side, channels = getattr(vision, "image_size", None), getattr(vision, "num_channels", 3)
    if "pixel_values" in names and _side(side) and isinstance(channels, int):
        parts["pixel_values"] = ("x", (BATCH, channels, _side(side) or 0, _side(side) or 0), 0)
    mels, positions = getattr(config, "num_mel_bins", None), getattr(
        config, "max_source_positions", None)
    if "input_features" in names and isinstance(mels, int) and isinstance(positions, int):
        parts["input_features"] = ("x", (BATCH, mels, 2 * positions), 0)
    if "input_values" in names and not parts:
        parts["input_values"] = ("x", (BATCH, 16_000), 0)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in names and vocab:
        parts["decoder_input_ids"] = ("ids", (BATCH, 4), int(vocab))
    if not parts:
        return None

    def make() -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return {name: (torch.randint(0, vocab_size, shape, generator=generator) if kind == "ids"
                       else torch.randn(shape, generator=generator))
                for name, (kind, shape, vocab_size) in parts.items()}

    return _Candidate(make, f"{type(model).__name__}'s config: {', '.join(parts)}")


def _tokens(vocab: int, how: str) -> _Candidate:
    def make() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (BATCH, _SEQUENCE), generator=generator)

    return _Candidate(make, how)


def _image(channels: int, side: int, how: str) -> _Candidate:
    return _random((BATCH, channels, side, side), f"{how} {(BATCH, channels, side, side)}")


def _random(shape: tuple[int, ...], how: str) -> _Candidate:
    def make() -> torch.Tensor:
        if math.prod(shape) > _MAX_ELEMENTS:
            raise ValueError(f"{shape} is larger than a cheap check")
        return torch.randn(shape, generator=torch.Generator().manual_seed(0))

    return _Candidate(make, how)


def _declared_sides(*models: nn.Module) -> list[int]:
    """Image sides the models declare, in the order found: a fixed patch grid first."""
    sides: list[int] = []
    for model in models:
        patch_embed = getattr(model, "patch_embed", None)
        for value in (getattr(patch_embed, "img_size", None), getattr(model, "image_size", None),
                      getattr(getattr(model, "config", None), "image_size", None),
                      _pretrained_side(model)):
            side = _side(value)
            if side and side not in sides:
                sides.append(side)
    return sides


def _pretrained_side(model: nn.Module) -> int | None:
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    return size[-1] if isinstance(size, (tuple, list)) and len(size) == 3 else None


def _side(value: Any) -> int | None:
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        return int(value[-1]) if len(set(value)) == 1 else None
    return None


def _channels(model: nn.Module) -> int | None:
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if isinstance(size, (tuple, list)) and len(size) == 3:
        return int(size[0])
    channels = getattr(getattr(model, "config", None), "num_channels", None)
    if isinstance(channels, int):
        return channels
    first = _first_layer(model)
    return first.in_channels if isinstance(first, nn.Conv2d) else None


def _common_vocabulary(*models: nn.Module) -> int | None:
    sizes = []
    for model in models:
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(size, int):
            first = _first_layer(model)
            size = first.num_embeddings if isinstance(first, nn.Embedding) else None
        if isinstance(size, int) and size > 0:
            sizes.append(size)
    return min(sizes) if sizes else None


def _from_first_layer(model: nn.Module) -> Iterator[_Candidate]:
    first = _first_layer(model)
    if isinstance(first, nn.Embedding):
        yield _tokens(first.num_embeddings, f"token ids below the first embedding's "
                                            f"{first.num_embeddings}")
    elif isinstance(first, nn.Linear):
        yield _random((BATCH, first.in_features), f"vectors of the first Linear's "
                                                  f"{first.in_features} features")
        yield _random((BATCH, _SEQUENCE, first.in_features),
                      f"sequences of the first Linear's {first.in_features} features")
    elif isinstance(first, nn.Conv1d):
        yield _random((BATCH, first.in_channels, 64), f"signals of the first Conv1d's "
                                                      f"{first.in_channels} channels")
    elif isinstance(first, nn.Conv3d):
        yield _random((BATCH, first.in_channels, 8, 32, 32),
                      f"volumes of the first Conv3d's {first.in_channels} channels")


def _first_layer(model: nn.Module) -> nn.Module | None:
    """The first module (in registration order) that reads a model's input in the usual ways."""
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return module
    return None


def _first(values: Iterator[int | None]) -> int | None:
    return next((v for v in values if v is not None), None)
