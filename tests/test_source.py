"""Tests for archalign.source: reading modules, state_dicts and checkpoint files."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from archalign.errors import ArchalignError, SourceError
from archalign.source import TensorSource, TensorSpec, has_nonfinite, read_destination, read_source

# --------------------------------------------------------------------------- tiny models


class Tied(nn.Module):
    """An embedding and an output head sharing one Parameter (GPT-2 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


class Leaf(nn.Module):
    """A custom module without children: its direct tensors form one layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.register_buffer("shift", torch.zeros(3))


class Container(nn.Module):
    """A custom module with a bare Parameter *and* children: not a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 4))
        self.fc = nn.Linear(4, 4)
        self.leaf = Leaf()


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.fc = nn.Linear(3, 2, bias=False)


def small_state_dict() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict()


def spec(key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> TensorSpec:
    return TensorSpec(key=key, shape=shape, dtype=dtype)


# --------------------------------------------------------------------------- modules


def test_read_module_specs_types_and_owners():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4))
    source = read_source(model)
    assert isinstance(source, TensorSource)
    assert source.specs == {
        "0.weight": spec("0.weight", (4, 3)),
        "0.bias": spec("0.bias", (4,)),
        "2.weight": spec("2.weight", (4,)),
        "2.bias": spec("2.bias", (4,)),
        "2.running_mean": spec("2.running_mean", (4,)),
        "2.running_var": spec("2.running_var", (4,)),
        "2.num_batches_tracked": spec("2.num_batches_tracked", (), torch.int64),
    }
    assert list(source.specs) == list(model.state_dict())  # state_dict order
    assert source.aliases == {}
    assert source.module_types == {"": "Sequential", "0": "Linear", "1": "ReLU", "2": "BatchNorm1d"}
    assert source.layer_owners == frozenset({"0", "2"})
    assert source.module is model
    assert source.description == "source module Sequential"
    assert len(source) == 7


def test_read_module_role_in_description():
    source = read_source(nn.Linear(2, 2), role="destination")
    assert source.description == "destination module Linear"
    # the root module itself is a layer
    assert source.layer_owners == frozenset({""})


def test_read_module_get_returns_the_live_parameter():
    model = nn.Linear(2, 3)
    source = read_source(model)
    assert source.get("weight") is model.weight
    assert source.get("bias") is model.bias


def test_non_persistent_buffers_are_not_read():
    source = read_source(WithBuffers())
    assert list(source.specs) == [
        "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
        "fc.weight",
    ]
    assert source.layer_owners == frozenset({"bn", "fc"})


def test_dtype_is_recorded_as_a_torch_dtype():
    model = nn.Linear(2, 2).to(torch.float64)
    source = read_source(model)
    assert source.specs["weight"].dtype == torch.float64


# --------------------------------------------------------------------------- tied weights


def test_tied_module_gives_one_spec_and_an_alias():
    model = Tied()
    source = read_source(model)
    assert source.specs == {"emb.weight": spec("emb.weight", (10, 4))}
    assert source.aliases == {"head.weight": "emb.weight"}
    assert len(source) == 1
    # the alias reads the primary tensor
    assert source.get("head.weight") is source.get("emb.weight")
    assert source.get("head.weight") is model.emb.weight
    # only owners of primary tensors can be layers
    assert source.layer_owners == frozenset({"emb"})
    assert source.module_types["head"] == "Linear"


def test_tied_state_dict_gives_an_alias_by_storage():
    source = read_source(Tied().state_dict())
    assert list(source.specs) == ["emb.weight"]
    assert source.aliases == {"head.weight": "emb.weight"}


def test_equal_but_separate_tensors_are_not_tied():
    t = torch.ones(3)
    source = read_source({"a.weight": t, "b.weight": t.clone()})
    assert list(source.specs) == ["a.weight", "b.weight"]
    assert source.aliases == {}


def test_views_of_one_storage_are_not_tied():
    base = torch.arange(6.0)
    source = read_source({"a.weight": base[:3], "b.weight": base[3:]})
    assert source.aliases == {}
    assert list(source.specs) == ["a.weight", "b.weight"]


# --------------------------------------------------------------------------- layer owners


def test_layer_owners_of_a_container_with_a_bare_parameter():
    source = read_source(Container())
    assert list(source.specs) == ["cls_token", "fc.weight", "fc.bias", "leaf.scale", "leaf.shift"]
    # Linear is a torch.nn layer; Leaf has tensors and no children; the root holds
    # cls_token but also children, so it is not a layer.
    assert source.layer_owners == frozenset({"fc", "leaf"})
    assert "" not in source.layer_owners


def test_torch_nn_module_with_children_is_still_a_layer():
    model = nn.Sequential(nn.MultiheadAttention(4, 2))
    source = read_source(model)
    assert source.layer_owners == frozenset({"0", "0.out_proj"})


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["fc.weight", "fc.bias"], {"fc"}),
        (["fc.weight"], {"fc"}),
        (["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"],
         {"bn"}),
        (["attn.in_proj_weight", "attn.in_proj_bias"], {"attn"}),
        (["x.bias"], set()),  # a bias without a weight is no layer
        (["blk.scale", "blk.weight"], set()),  # "scale" is neither weight, bias nor a statistic
        (["cls_token", "weight"], set()),  # root owner with a free tensor
        (["weight", "bias"], {""}),  # a bare layer's own state_dict
        (["a.b.weight", "a.c"], {"a.b"}),
    ],
)
def test_state_dict_layer_owners_are_guessed_from_names(keys, expected):
    state = {k: torch.zeros(2, 2) if k.endswith("weight") else torch.zeros(2) for k in keys}
    source = read_source(state)
    assert source.layer_owners == frozenset(expected)
    assert source.module_types == {}
    assert source.module is None


# --------------------------------------------------------------------------- state dicts & files


def test_read_state_dict():
    state = small_state_dict()
    source = read_source(state)
    assert source.specs == {
        "0.weight": spec("0.weight", (4, 3)),
        "0.bias": spec("0.bias", (4,)),
        "2.weight": spec("2.weight", (2, 4)),
        "2.bias": spec("2.bias", (2,)),
    }
    assert source.description == "source state_dict"
    assert source.layer_owners == frozenset({"0", "2"})
    assert torch.equal(source.get("2.bias"), state["2.bias"])


@pytest.mark.parametrize(
    ("keys", "ordered"),
    [
        (["b.weight", "a.weight", "c.weight", "d.weight", "e.weight"], True),
        (["a.weight", "b.weight", "c.weight", "d.weight", "e.weight"], False),  # sorted: no structure
        (["a.weight", "b.weight", "c.weight", "d.weight"], True),  # too few keys to tell
        (["fc.weight", "fc.bias"], True),
    ],
)
def test_state_dict_ordered_flag(keys, ordered):
    source = read_source({k: torch.zeros(2, 2) for k in keys})
    assert source.ordered is ordered
    assert list(source.specs) == keys


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (42, "the source is a int"),
        ([torch.zeros(2)], "the source is a list"),
        (torch.zeros(2), "the source is a Tensor"),
        (nn.ReLU(), "has no parameters or buffers"),
        (nn.Sequential(), "has no parameters or buffers"),
        ({}, "is empty"),
        ({"a": 1, "b.weight": torch.zeros(1)}, "'a' (int)"),
        ({"a": torch.zeros(1), 1: torch.zeros(1)}, "keys that are not strings"),
        ({"model": {"w": torch.zeros(1)}}, "ckpt['state_dict']"),
    ],
)
def test_unreadable_objects_raise_source_error(obj, message):
    with pytest.raises(SourceError) as info:
        read_source(obj)
    assert message in str(info.value)


def test_source_error_role_and_hierarchy():
    with pytest.raises(SourceError, match="the destination is a bytes"):
        read_source(b"w.pt", role="destination")  # bytes are not a path
    assert issubclass(SourceError, ArchalignError)
    assert issubclass(SourceError, TypeError)


def test_get_unknown_key_raises_key_error():
    source = read_source(nn.Linear(2, 2))
    with pytest.raises(KeyError, match="source module Linear holds no tensor 'nope'"):
        source.get("nope")


# --------------------------------------------------------------------------- lazy and sharded files


def test_shards_merged_in_shard_order_count_as_unordered() -> None:
    keys = [f"layers.{i}.{n}" for i in range(12) for n in ("weight", "bias")]
    merged = [k for chunk in (keys[:12], keys[12:]) for k in sorted(chunk)]
    source = read_source({k: torch.zeros(1) for k in merged})
    assert source.ordered is False
    assert read_source({k: torch.zeros(1) for k in keys}).ordered is True  # registration order


# --------------------------------------------------------------------------- NaN/Inf scan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_has_nonfinite_finds_nan_and_inf_in_every_floating_dtype(dtype, bad) -> None:
    t = torch.ones(64, 8).to(dtype)
    assert not has_nonfinite(t)
    t[5, 3] = bad
    assert has_nonfinite(t)
    assert has_nonfinite(t.T)  # any layout


def test_has_nonfinite_is_exact_when_a_finite_half_tensor_overflows_its_sum() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        big = torch.full((300, 300), 60000.0 if dtype == torch.float16 else 3e38, dtype=dtype)
        assert not has_nonfinite(big)
    assert not has_nonfinite(torch.tensor([6e4, -6e4, 6e4], dtype=torch.float16))


def test_has_nonfinite_complex_integer_empty_meta() -> None:
    c = torch.zeros(3, dtype=torch.complex64)
    assert not has_nonfinite(c)
    c[1] = complex(0.0, float("inf"))
    assert has_nonfinite(c)
    assert not has_nonfinite(torch.arange(5))
    assert not has_nonfinite(torch.zeros(0))
    assert not has_nonfinite(torch.empty(3, device="meta"))
    p = nn.Parameter(torch.tensor([1.0, float("nan")]))
    assert has_nonfinite(p) and p.grad is None


def test_in_memory_tensors_are_scanned_once_per_state(monkeypatch) -> None:
    import archalign.source as source_module

    scanned: list[str] = []
    real = source_module.has_nonfinite
    monkeypatch.setattr(source_module, "has_nonfinite",
                        lambda t: scanned.append(str(tuple(t.shape))) or real(t))
    model = Tied()
    source = read_source(model)
    assert source.lazy is False
    assert source.scan_nonfinite() == () and scanned == ["(10, 4)"]
    assert source.nonfinite("head.weight") is False and len(scanned) == 1  # an alias: memoised
    with torch.no_grad():
        model.emb.weight[2, 2] = float("nan")  # bumps the version counter
    assert source.scan_nonfinite() == ("emb.weight",) and len(scanned) == 2
    assert source.nonfinite("emb.weight") is True and len(scanned) == 2
    model.emb.weight.data = torch.ones(10, 4)  # a new data pointer
    assert source.nonfinite("emb.weight") is False and len(scanned) == 3
    state = model.state_dict()  # detached tensors share the version counter of the parameters
    from_state = read_source(state)
    assert from_state.scan_nonfinite() == ()
    with torch.no_grad():
        model.emb.weight[0, 0] = float("inf")
    assert from_state.scan_nonfinite() == ("emb.weight",)


def test_a_lazy_source_is_scanned_when_read_and_never_by_scan_nonfinite(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan")]), "b": torch.ones(2)}, str(path))
    source = read_source(path)
    assert source.lazy is True
    assert source.scan_nonfinite() == ()  # nothing read while aligning
    assert source.nonfinite("w") is True and source.nonfinite("b") is False
    assert source.nonfinite("w", torch.ones(2)) is False  # the tensor the caller read


def test_read_destination_keeps_what_writing_needs():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].weight = model[0].bias  # a tie
    light, full = read_destination(model), read_source(model, role="destination")
    assert light.specs == full.specs and light.aliases == full.aliases
    assert light.get("0.weight") is full.get("0.weight")
    assert light.module_types == {} and light.layer_owners == frozenset()


def test_read_destination_refuses_what_is_not_a_module():
    with pytest.raises(SourceError, match=r"must be an nn\.Module, got dict"):
        read_destination({"w": torch.zeros(1)})


def test_a_nested_tensor_is_refused_when_read_by_name() -> None:
    import archalign

    torch.manual_seed(0)
    state = dict(nn.Linear(3, 4).state_dict())
    state["ragged"] = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(SourceError, match="nested tensors, which have no single shape: 'ragged'"):
        read_source(state)
    with pytest.raises(SourceError, match="'ragged'"):
        archalign.align(state, nn.Linear(3, 4))  # was a bare RuntimeError from torch


def test_a_tensor_source_is_accepted_as_it_is_and_entry_needs_a_file() -> None:
    import archalign

    model = nn.Linear(3, 2)
    source = read_source(model)
    assert read_source(source) is source
    plan = archalign.align(source, nn.Linear(3, 2))  # a source read once, with its options
    assert len(plan.matches) == 2
    with pytest.raises(SourceError, match=r"pass obj\['model'\] instead"):
        read_source({"model": model.state_dict()}, entry="model")
