"""Tests for archalign.fused: one unit against a run of units opposite (concat and split)."""

from __future__ import annotations

import pytest

from archalign.confidence import confidence
from archalign.cost import CostWeights
from archalign.features import extract_features
from archalign.fused import _named_in_order, match_fused
from archalign.graph import Tracer, Unit, chain_graph
from archalign.match import match_units
from archalign.ops import Op

W = CostWeights()


def linear(key: str, out: int, inp: int) -> Unit:
    return Unit(key, (f"{key}.weight", f"{key}.bias"), ((out, inp), (out,)), "Linear")


def solve(src: list[Unit], dst: list[Unit], forbidden=frozenset()):
    fs, fd = extract_features(chain_graph(src, Tracer.FX), chain_graph(dst, Tracer.FX))
    exact = match_units(fs, fd, W, forbidden)
    return match_fused(fs, fd, W, exact, forbidden)


def groups(fused) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    return [(tuple(f.unit.key for f in m.src), tuple(f.unit.key for f in m.dst)) for m in fused]


SEPARATE = [linear("q", 8, 8), linear("k", 4, 8), linear("v", 4, 8), linear("o", 8, 8)]
FUSED = [linear("qkv", 16, 8), linear("proj", 8, 8)]


def test_separate_projections_concatenate_into_a_fused_one() -> None:
    kept, fused = solve(SEPARATE, FUSED)
    assert groups(fused) == [(("q", "k", "v"), ("qkv",))]
    (match,) = fused
    assert [p.ops for p in match.pairs] == [(Op("concat", sizes=(8, 4, 4)),)] * 2
    assert [(m.src[0].unit.key, m.dst[0].unit.key) for m in kept] == [("o", "proj")]
    assert 0.0 < match.confidence < 1.0 and match.terms["fused"] == W.fused


def test_a_fused_projection_splits_into_separate_ones() -> None:
    _, fused = solve(FUSED, SEPARATE)
    assert groups(fused) == [(("qkv",), ("q", "k", "v"))]
    assert [p.ops for p in fused[0].pairs] == [(Op("split", sizes=(8, 4, 4)),)] * 2


def test_a_forbidden_member_keeps_the_group_apart() -> None:
    _, fused = solve(SEPARATE, FUSED, forbidden=frozenset({("k", "qkv")}))
    assert all("qkv" not in dst for _, dst in groups(fused))


def test_pieces_that_do_not_add_up_are_not_fused() -> None:
    _, fused = solve([linear("q", 8, 8), linear("k", 8, 8)], [linear("qk", 12, 8)])
    assert fused == []


def equal_parts(*keys: str) -> list[Unit]:
    return [linear(k, 8, 8) for k in keys]


def test_a_fused_unit_sits_where_its_first_part_does() -> None:
    """The single unit's position is its first part's (the alignment anchors it there): a
    well-placed fused match pays no position cost, whatever the group's length."""
    _, fused = solve([*equal_parts("attn.q_proj", "attn.k_proj", "attn.v_proj"),
                      linear("attn.o", 8, 8)],
                     [linear("attn.qkv", 24, 8), linear("attn.proj", 8, 8)])
    (match,) = fused
    assert match.terms["position"] == 0.0


@pytest.mark.parametrize("single, parts, named", [
    ("attn.qkv", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), True),
    ("attn.qkv", ("attn.query", "attn.key", "attn.value"), True),  # by initials
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), True),
    ("attn.wqkv", ("attn.wq", "attn.wk", "attn.wv"), True),
    ("attn.c_attn", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), False),  # GPT-2: no letters
    ("attn.kqv", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), False),  # another order
    ("attn.in_proj", ("attn.q", "attn.k", "attn.v"), False),
])
def test_named_in_order(single: str, parts: tuple[str, ...], named: bool) -> None:
    fs, _ = extract_features(chain_graph(equal_parts(*parts), Tracer.FX),
                             chain_graph(equal_parts(*parts), Tracer.FX))
    assert _named_in_order(linear(single, 24, 8), fs) is named


def test_equal_parts_named_in_order_keep_their_confidence() -> None:
    """Equal-shaped parts are ordered by execution alone (a factor below 1) unless the fused
    unit's name spells them in that order."""
    src = [*equal_parts("attn.q_proj", "attn.k_proj", "attn.v_proj"), linear("attn.o", 8, 8)]
    (named,) = solve(src, [linear("attn.qkv", 24, 8), linear("attn.proj", 8, 8)])[1]
    (unnamed,) = solve(src, [linear("attn.c_attn", 24, 8), linear("attn.proj", 8, 8)])[1]
    assert unnamed.confidence < named.confidence


def test_a_group_whose_members_trade_places_with_a_gap_keeps_its_confidence() -> None:
    """timm's attention pool (q, a fused kv, proj) against nn.MultiheadAttention (in_proj, then
    out_proj): one of q and kv is a gap of the alignment, which one structure cannot tell, but
    either way the pair sits at in_proj; its position is not uncertain, so the rival (kv with
    proj) costs it nothing but its margin."""
    src = [linear("pool.q", 8, 8), linear("pool.kv", 16, 8), linear("pool.proj", 8, 8)]
    dst = [Unit("head.attention", ("head.attention.in_proj_weight", "head.attention.in_proj_bias"),
                ((24, 8), (24,)), "MultiheadAttention"), linear("head.attention.out_proj", 8, 8)]
    fs, fd = extract_features(chain_graph(src, Tracer.FX), chain_graph(dst, Tracer.FX))
    assert max(f.spread for f in fs) > 0  # the members' own positions are uncertain
    kept, fused = match_fused(fs, fd, W, match_units(fs, fd, W))
    assert groups(fused) == [(("pool.q", "pool.kv"), ("head.attention",))]
    (match,) = fused
    structural = match.terms["position"] + match.terms["fused"]
    assert match.confidence == pytest.approx(confidence(structural, match.terms["regret"]))
    assert [(m.src[0].unit.key, m.dst[0].unit.key) for m in kept] == [
        ("pool.proj", "head.attention.out_proj")]


def conv(key: str, out: int, inp: int) -> Unit:
    return Unit(key, (f"{key}.weight",), ((out, inp, 3, 3),), "Conv2d")


def bn(key: str, width: int) -> Unit:
    return Unit(key, (f"{key}.weight", f"{key}.bias"), ((width,), (width,)), "BatchNorm2d")


@pytest.mark.parametrize("src", [
    # a block's conv1 -> bn1 -> conv2: the second runs on the first's output
    [conv("layer2.3.conv1", 8, 8), bn("layer2.3.bn1", 8), conv("layer2.3.conv2", 8, 8)],
    # adjacent, but in two blocks: no module holds both
    [conv("layer2.2.conv2", 8, 8), conv("layer2.3.conv1", 8, 8)],
], ids=["a layer between", "two parents"])
def test_layers_of_a_chain_are_no_pieces_of_one_tensor(src: list[Unit]) -> None:
    """From a checkpoint (reads unknown) the pieces of a fused tensor are siblings that follow
    one another: a ResNet-34's surplus convolutions never concatenate into ResNet-18's wider
    one (whose own counterpart stays matched)."""
    _, fused = solve(src, [conv("layer3.0.conv1", 16, 8)])
    assert fused == []
