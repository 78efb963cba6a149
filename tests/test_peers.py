"""The benchmark's peer adapters (benchmarks/peers.py) on tiny models: semantics, no raising, no mutation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import peers


class _Src(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class _Dst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stem(x)).mean((2, 3)))


def _trained(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(4, generator=gen))
                m.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    return model.eval()


def _state(model: nn.Module) -> tuple[bool, dict[str, torch.Tensor]]:
    return model.training, {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: tuple[bool, dict[str, torch.Tensor]]) -> bool:
    training, sd = _state(model)
    return training == before[0] and all(torch.equal(sd[k], before[1][k]) for k in sd)


X = torch.randn(2, 3, 8, 8)


def test_by_name_takes_equal_keys_with_equal_shapes_only() -> None:
    src = _trained(_Src(), 0)
    dst = _Src()
    dst.fc = nn.Linear(4, 7)  # same names, other shape
    result = peers.PEERS["by_name"](src, dst, X)
    assert result.error is None and result.state_dict is None
    assert set(result.mapping) == set(src.state_dict()) - {"fc.weight", "fc.bias"}
    assert all(v == (k,) for k, v in result.mapping.items())
    assert result.notes["shape_mismatch"] == ["fc.bias", "fc.weight"]
    assert peers.apply_peer(result, dst) == len(result.mapping)
    torch.testing.assert_close(dst.conv.weight, src.conv.weight)


def test_by_order_walks_positions_reshapes_and_skips_numel_mismatches() -> None:
    src = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    dst = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    with torch.no_grad():
        src[0].weight.copy_(torch.arange(24.0).reshape(6, 4))
    dst_before = _state(dst)
    result = peers.PEERS["by_order"](src, dst, None)
    assert result.error is None
    assert result.mapping == {"0.weight": ("0.weight",), "0.bias": ("0.bias",)}
    assert [k for k, _ in result.notes["skipped"]] == ["1.weight", "1.bias"]
    assert "Remap failed" in result.notes["timm_would_raise"]
    assert _same(dst, dst_before)
    assert peers.apply_peer(result, dst) == 2
    torch.testing.assert_close(dst[0].weight, src[0].weight)

    flat = nn.ParameterDict({"w": nn.Parameter(torch.arange(24.0))})  # same numel, other shape
    reshaped = peers.PEERS["by_order"](flat, nn.Linear(4, 6, bias=False), None)
    assert reshaped.notes["reshaped"] == ["weight"]
    torch.testing.assert_close(reshaped.state_dict["weight"], torch.arange(24.0).reshape(6, 4))


def test_by_order_agrees_with_timm_when_timm_succeeds() -> None:
    helpers = pytest.importorskip("timm.models._helpers")
    src, dst = _trained(_Src(), 0), _Dst()
    result = peers.PEERS["by_order"](src, dst, None)
    expected = helpers.remap_state_dict(src.state_dict(), dst)
    assert result.notes["timm_would_raise"] is None
    assert result.state_dict.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(result.state_dict[k], v)


@pytest.mark.parametrize("name", sorted(peers.PEERS) + sorted(peers.EXTRA_PEERS))
def test_every_peer_reports_instead_of_raising(name: str) -> None:
    fn = {**peers.PEERS, **peers.EXTRA_PEERS}[name]
    result = fn(None, _Dst(), X)  # not a model at all
    assert result.error and result.mapping == {} and result.seconds >= 0
    assert peers.apply_peer(result, _Dst()) == 0


def test_weightbridge_adapts_renamed_model_and_reports_its_pairing() -> None:
    pytest.importorskip("weightbridge")
    src, dst = _trained(_Src(), 0), _Dst().eval()
    src_before, dst_before = _state(src), _state(dst)
    result = peers.PEERS["weightbridge"](src, dst, X)
    assert result.error is None, result.notes.get("log")
    assert _same(src, src_before) and _same(dst, dst_before)
    assert result.mapping["head.weight"] == ("fc.weight",)
    assert result.mapping["norm.running_var"] == ("bn.running_var",)
    assert set(result.state_dict) == set(dst.state_dict())
    assert peers.apply_peer(result, dst) == len(dst.state_dict())
    torch.testing.assert_close(dst(X), src(X))


def test_weightbridge_failure_to_pair_becomes_an_error() -> None:
    pytest.importorskip("weightbridge")
    src = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    dst = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    result = peers.PEERS["weightbridge"](src, dst, None)
    assert result.error is not None and result.mapping == {} and result.state_dict is None


def test_lit_wsl_maps_parameters_with_scores_but_not_buffers() -> None:
    pytest.importorskip("lit_wsl.mapper.weight_mapper")
    src, dst = _trained(_Src(), 0), _Dst()
    dst.train()
    src_before, dst_before = _state(src), _state(dst)
    result = peers.PEERS["lit-wsl"](src, dst, X)
    assert result.error is None, result.notes.get("log")
    assert _same(src, src_before) and _same(dst, dst_before)  # it calls .eval() on what it is given
    assert result.notes["strategy"] == "greedy" and result.notes["buffer_matching_mode"] == "exclude"
    assert result.mapping["head.weight"] == ("fc.weight",)
    assert not any("running" in k for k in result.mapping)
    assert set(result.scores) == set(result.mapping)
    assert all(0.0 <= s <= 1.0 for s in result.scores.values())
    assert result.state_dict is None
    assert peers.apply_peer(result, dst) == len(result.mapping) == 6
    torch.testing.assert_close(dst.head.weight, src.fc.weight)
