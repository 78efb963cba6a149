"""A corpus of real model pairs with a hand-written, verified ground-truth mapping.

Each `Pair` names a source model and a destination model written by different people (torchvision,
timm, Hugging Face transformers, or small modules defined here), an input both accept, and the
ground truth: for every destination ``state_dict`` key, the source key(s) that feed it. The truth is
written by hand as rename rules per pair, never derived from archalign, and for *exact* pairs it is
proved by a hand-written converter (renames plus any transpose, reshape, concatenation or row
permutation): `verify_truth` loads the converted weights with ``strict=True`` and measures how far
the two models' outputs are apart. An accuracy benchmark can then score ``archalign.align(src, dst)``
against ``pair.truth(src, dst)``.

Conventions
-----------
* No weights are ever downloaded: every model is randomly initialised (``pretrained=False``, Hugging
  Face configs), seeded (`SRC_SEED` for sources, `DST_SEED` for destinations) and in eval mode.
* Sources are *decorrelated*: after the seeded initialisation, every floating-point tensor whose
  elements are all equal (norm weights and biases, BatchNorm statistics, zero-initialised biases,
  layer scales, class tokens) is redrawn, so no two source tensors of one shape hold the same values
  and any wrong mapping changes the output. Sources with BatchNorm then get their running statistics
  from one forward pass on a seeded calibration batch, so activations stay normalised and the output
  depends on every tensor (at raw init MobileNetV2 saturates its ReLU6 and ignores its weights).
  Destinations keep their library initialisation.
* The truth covers ``state_dict`` keys, so BatchNorm buffers (``running_mean``, ``running_var``,
  ``num_batches_tracked``) are part of it.
* Tied weights: truth names only the primary key (``transformer.wte.weight``). Destination aliases
  (``lm_head.weight`` when it is the embedding) are listed in `Pair.tied_dst` and are *not* truth keys;
  source aliases never appear among truth values. Converters fill the aliases so that strict loading
  succeeds.
* For partial pairs (``exact=False``) the truth is a documented convention, some destination keys
  may have no source at all (absent from the truth), and ``convert`` is None.
* Checkpoint-only pairs (`Pair.release` set, ``source_module=False``): the source is a release
  written by ``pair.release.write(pair.make_src(), folder)`` (a file or a folder, as real releases
  are); truth and converter name the keys of ``pair.release.read(path)``. `read_release` writes and
  reads one; `validate_truth` and `verify_truth` go through the release for such pairs.

`PAIRS` is what archalign's benchmark and tests hold it to today; `PORTS` holds real ports of the
kinds it does not handle yet (original reference codebases -> Hugging Face, MoE expert stacking,
rotary permutations, release formats): a measuring stick, not a regression test.

`VISION_PORTS` holds exact vision ports of the kinds real conversions deal with (original reference
codebases -> Hugging Face / timm, timm <-> Hugging Face): fused vs split attention projections,
nn.MultiheadAttention, transposed projections, 1x1 convolutions vs Linear, singleton axes, state_dict
orders that are not execution orders. They are kept out of `PAIRS` (which the benchmark and the
real-model tests iterate) until archalign handles them; `get_pair` finds them.

Run ``python -m corpus`` to rebuild and verify every exact pair.
"""

from __future__ import annotations

from . import hf_vision, language, lm_ports, reference_vision, releases, scale, seeds, vision
from ._pair import CALIBRATION_SEED, DST_SEED, INPUT_SEED, SRC_SEED, Pair, Release
from .check import (
    norm_eps_profile,
    read_release,
    run_model,
    tied_aliases,
    validate_truth,
    verify_truth,
)
from .seeds import MLP, RenamedMLP

__all__ = [
    "CALIBRATION_SEED",
    "DST_SEED",
    "INPUT_SEED",
    "MLP",
    "PAIRS",
    "PORTS",
    "SRC_SEED",
    "VISION_PORTS",
    "Pair",
    "Release",
    "RenamedMLP",
    "get_pair",
    "norm_eps_profile",
    "read_release",
    "run_model",
    "scale",
    "tied_aliases",
    "validate_truth",
    "verify_truth",
]

PAIRS: list[Pair] = [*vision.EXACT, *language.PAIRS, *vision.PARTIAL, *seeds.PAIRS]
VISION_PORTS: list[Pair] = [*reference_vision.PAIRS, *hf_vision.PAIRS]
PORTS: list[Pair] = [*lm_ports.PAIRS, *releases.PAIRS]


def get_pair(name: str) -> Pair:
    """The pair called ``name``, in `PAIRS` or `PORTS`.

    Raises
    ------
    KeyError
        If no pair has that name; the message lists the known names.
    """
    known = [*PAIRS, *PORTS, *VISION_PORTS]
    for pair in known:
        if pair.name == name:
            return pair
    raise KeyError(f"no pair {name!r}; known pairs: {', '.join(p.name for p in known)}")
