"""Tests for archalign.wrappers: wrapper prefixes and the keys set aside."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import archalign
from archalign.source import read_source
from archalign.wrappers import describe, set_aside, wrapper_of


def test_the_prefix_every_key_shares_is_found_nested_too() -> None:
    assert wrapper_of(["module.fc.weight", "module.fc.bias"]) == "module."
    assert wrapper_of(["_orig_mod.a.weight", "_orig_mod.b"]) == "_orig_mod."
    assert wrapper_of(["module._orig_mod.fc.weight"]) == "module._orig_mod."
    assert wrapper_of(["model.fc.weight", "lm_head.weight"]) == ""  # not every key
    assert wrapper_of(["module.", "module.x"]) == ""  # nothing follows it in one key
    assert wrapper_of([]) == ""
    assert "torch.compile" in describe("module._orig_mod.") and "inside" in describe(
        "module._orig_mod.")


def test_only_an_averaged_models_count_is_set_aside() -> None:
    state = {"n_averaged": 1, "module.w": 2}
    assert set_aside(state) == ({"module.w": 2}, ("n_averaged",))
    assert set_aside({"n_averaged": 1, "w": 2}) == ({"n_averaged": 1, "w": 2}, ())


def test_computed_rotary_frequencies_are_set_aside() -> None:
    """Meta's release saves rope.freqs, older Hugging Face files rotary_emb.inv_freq: both are
    computed from the config, not trained."""
    state = {"tok_embeddings.weight": 1, "rope.freqs": 2,
             "layers.0.attention.rotary_emb.inv_freq": 3}
    assert set_aside(state) == ({"tok_embeddings.weight": 1},
                                ("rope.freqs", "layers.0.attention.rotary_emb.inv_freq"))
    assert set_aside({"rope.freqs": 2}) == ({"rope.freqs": 2}, ())  # nothing else: keep it


def test_a_wrapped_file_is_recorded_and_its_keys_kept(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with torch.no_grad():
        src[1].weight.uniform_(0.5, 1.5)
    path = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    source = read_source(path)
    assert source.wrapper == "module." and "'module.'" in source.description
    dst = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    plan = archalign.align(path, dst)
    # the plan names the file's keys as they are, so that it applies to the file itself
    assert {k for m in plan.matches for k in m.src} == set(source.specs)
    plan.apply(dst)
    x = torch.randn(3, 4)
    assert torch.equal(src(x), dst(x))


def test_an_ema_state_dict_matches_without_its_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    ema = torch.optim.swa_utils.AveragedModel(model)
    source = read_source(ema.state_dict())
    assert source.set_aside == ("n_averaged",) and "set aside" in source.description
    plan = archalign.align(source, nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8),
                                                 nn.Linear(8, 2)))
    assert "n_averaged" not in plan.unmatched_src
    assert all(k.startswith("module.") for m in plan.matches for k in m.src)
