"""Tests for archalign.features: families, name tokens, rank warping through anchors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archalign import features as features_module
from archalign.features import (
    UnitFeatures,
    _align_rest,
    _warp,
    align_sequences,
    extract_features,
    infer_family,
    is_vector,
    layer_family,
    name_tokens,
    unit_signature,
    without_own_classes,
)
from archalign.graph import INPUT, OUTPUT, Tracer, Unit, chain_graph, ordered_graph


def linear(key: str, out: int, inp: int, type_name: str = "Linear") -> Unit:
    return Unit(key, (f"{key}.weight", f"{key}.bias"), ((out, inp), (out,)), type_name)


def warp_values(src: list[Unit], dst: list[Unit]) -> list[float]:
    warp = _warp(src, dst, {u.key: unit_signature(u) for u in src}, {u.key: unit_signature(u) for u in dst})
    return [warp(i) for i in range(len(src))]


# --------------------------------------------------------------------------- families


@pytest.mark.parametrize(
    ("type_name", "family"),
    [
        ("Linear", "linear"),
        ("NonDynamicallyQuantizableLinear", "linear"),
        ("LazyLinear", "linear"),
        ("Conv1D", "linear"),  # GPT-2's transposed linear layer
        ("MultiheadAttention", "linear"),
        ("QuantLinear", "linear"),
        ("Parameter", "param"),
        ("", "unknown"),
        ("BatchNorm2d", "norm"),
        ("LayerNorm", "norm"),
        ("GroupNorm", "norm"),
        ("LlamaRMSNorm", "norm"),
        ("Conv1d", "conv"),
        ("Conv2d", "conv"),
        ("ConvTranspose2d", "conv"),
        ("Embedding", "embedding"),
        ("EmbeddingBag", "embedding"),
        ("LSTM", "LSTM"),  # anything else is its own family
        ("PReLU", "PReLU"),
    ],
)
def test_layer_family(type_name, family):
    assert layer_family(type_name) == family


@pytest.mark.parametrize(
    ("names", "shapes", "family"),
    [
        (("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
         ((4,), (4,), (4,), (4,), ()), "norm"),
        (("running_mean", "running_var"), ((4,), (4,)), "norm"),
        (("weight", "bias"), ((8, 3, 3, 3), (8,)), "conv"),
        (("weight",), ((8, 3, 3),), "conv"),
        (("weight", "bias"), ((8, 4), (8,)), "linear"),
        (("in_proj_weight", "in_proj_bias"), ((12, 4), (12,)), "linear"),
        (("weight", "bias"), ((4,), (4,)), "norm"),  # 1-d weight: a norm's scale
        (("bias",), ((4,),), "param"),
        (("cls_token",), ((1, 4),), "param"),
    ],
)
def test_infer_family(names, shapes, family):
    unit = Unit("m", tuple(f"m.{n}" for n in names), shapes, "")
    assert infer_family(unit) == family


@pytest.mark.parametrize(
    ("sig", "vector"),
    [
        (("param", ((8,),)), True),  # BERT's cls.predictions.bias, a lone tensor
        (("linear", ((8,),)), True),  # ELECTRA's head, a Linear whose weight is tied elsewhere
        (("conv", ((8,),)), True),
        (("linear", ((8,), (8, 4))), False),  # a whole layer
        (("norm", ((8,),)), False),  # a norm's scale is no lone vector
        (("param", ((1, 8),)), False),  # a matrix, singleton or not
    ],
)
def test_is_vector(sig, vector):
    assert is_vector(sig) is vector


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("key", "tokens"),
    [
        ("layers.0.ln_1", {"layers", "ln"}),
        ("blocks.0.qkv", {"blocks", "qkv"}),
        ("h.0.attn.c_attn", {"h", "attn", "c"}),
        ("conv1", {"conv"}),
        ("layer1.0.downsample.1", {"layer", "downsample"}),
        ("inProj", {"in", "proj"}),
        ("model/encoder-layer_12", {"model", "encoder", "layer"}),
        ("FC", {"fc"}),
        ("0.1", set()),
        ("", set()),
    ],
)
def test_name_tokens(key, tokens):
    assert name_tokens(key) == frozenset(tokens)


# --------------------------------------------------------------------------- sequence alignment


def L(width: int) -> tuple[str, tuple[tuple[int, ...], ...]]:
    return ("linear", ((width,),))


def N(width: int) -> tuple[str, tuple[tuple[int, ...], ...]]:
    return ("norm", ((width,),))


A, B, C, D = L(1), L(2), L(3), L(4)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([], [A], []),
        ([A], [], []),
        ([A, B, C], [A, B, C], [(0, 0), (1, 1), (2, 2)]),
        # a deeper destination: the extra blocks at the end of the run are the ones skipped
        ([A, B, B, C], [A, B, B, B, B, C], [(0, 0), (1, 1), (2, 2), (3, 5)]),
        ([A, B, B, B, B, C], [A, B, B, C], [(0, 0), (1, 1), (2, 2), (5, 3)]),
        ([A, B, B, C, D, D], [A, B, B, B, C, D, D, D],
         [(0, 0), (1, 1), (2, 2), (3, 4), (4, 5), (5, 6)]),
        ([A, C], [A, B, C], [(0, 0), (1, 2)]),
        # crossing: only one of the two can be kept
        ([A, B], [B, A], [(0, 1)]),
        # same family, other shape: aligned (1.5 is cheaper than two skips of 1)
        ([A, B, C], [A, D, C], [(0, 0), (1, 1), (2, 2)]),
        ([A], [B], [(0, 0)]),
        # other family: never aligned
        ([A, N(2), C], [A, B, C], [(0, 0), (2, 2)]),
        ([A], [N(1)], []),
    ],
)
def test_align_sequences(a, b, expected):
    assert align_sequences(a, b) == expected


def test_align_sequences_is_monotone():
    a = [A, B, C, A, B, C, D]
    b = [C, A, B, D, A, B, C]
    pairs = align_sequences(a, b)
    assert [i for i, _ in pairs] == sorted({i for i, _ in pairs})
    assert [j for _, j in pairs] == sorted({j for _, j in pairs})
    # skip a's trailing D and b's leading C; C against D is a same-family substitution
    assert pairs == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]


def test_warp_identity_for_identical_models():
    units = [linear("a", 4, 3), linear("b", 4, 4), linear("c", 4, 4), linear("d", 2, 4)]
    assert warp_values(units, units) == [0.0, 1.0, 2.0, 3.0]


def test_warp_of_a_shallow_model_onto_a_deep_one():
    # two middle blocks against four: they align with the first two, the last block anchors at 5
    src = [linear("s0", 8, 4), linear("s1", 8, 8), linear("s2", 8, 8), linear("s3", 2, 8)]
    dst = [linear("d0", 8, 4), *(linear(f"d{i}", 8, 8) for i in range(1, 5)), linear("d5", 2, 8)]
    assert warp_values(src, dst) == pytest.approx([0.0, 1.0, 2.0, 5.0])


def test_warp_interpolates_between_anchors():
    # s1 has no counterpart (other family): it sits halfway between the anchors 0 -> 0 and 2 -> 4
    src = [linear("s0", 8, 4), Unit("s1", ("s1.weight",), ((8,),), "LayerNorm"), linear("s2", 2, 8)]
    dst = [linear("d0", 8, 4), *(linear(f"d{i}", 8, 8) for i in range(1, 4)), linear("d4", 2, 8)]
    assert warp_values(src, dst) == pytest.approx([0.0, 2.0, 4.0])


def test_warp_without_anchors_scales_linearly():
    # nothing aligns: the map runs from (-1, -1) to (len(src), len(dst))
    src = [Unit(f"s{i}", (f"s{i}.weight",), ((3,),), "LayerNorm") for i in range(3)]
    dst = [linear(f"d{i}", 4, 4) for i in range(5)]
    assert warp_values(src, dst) == pytest.approx([0.5, 2.0, 3.5])


def test_warp_keeps_only_one_of_two_crossing_anchors():
    src = [linear("a", 8, 4), linear("b", 2, 8)]
    dst = [linear("B", 2, 8), linear("A", 8, 4)]
    # a -> A (0 -> 1) is kept; b lies between it and the end point (2, 2)
    assert warp_values(src, dst) == pytest.approx([1.0, 1.5])


def test_warp_family_is_part_of_the_signature():
    # same shapes, different families: a conv never anchors onto a linear
    src = [Unit("c", ("c.weight",), ((4, 4),), "Conv1d"), linear("x", 2, 4)]
    dst = [Unit("l", ("l.weight",), ((4, 4),), "Linear"), linear("y", 2, 4)]
    assert warp_values(src, dst) == pytest.approx([0.0, 1.0])
    assert unit_signature(src[0]) == ("conv", ((4, 4),))
    assert unit_signature(dst[0]) == ("linear", ((4, 4),))


# --------------------------------------------------------------------------- extract_features


def test_extract_features_exact():
    src = [linear("enc.fc1", 8, 4), linear("enc.fc2", 2, 8)]
    dst = [linear("fc_in", 8, 4), linear("fc_mid", 8, 8), linear("fc_out", 2, 8)]
    fs, fd = extract_features(chain_graph(src, Tracer.FX), chain_graph(dst, Tracer.FX))
    assert fs == [
        UnitFeatures(unit=src[0], family="linear", known_type=True, rank=0, position=0.0,
                     preds=(INPUT,), succs=("linear[(2,), (2, 8)]",),
                     tokens=frozenset({"enc", "fc"}), indices=(1,)),
        UnitFeatures(unit=src[1], family="linear", known_type=True, rank=1, position=2.0,
                     preds=("linear[(8,), (8, 4)]",), succs=(OUTPUT,),
                     tokens=frozenset({"enc", "fc"}), indices=(2,)),
    ]
    assert [f.position for f in fd] == [0.0, 1.0, 2.0]
    assert fd[1].preds == ("linear[(8,), (8, 4)]",)
    assert fd[1].succs == ("linear[(2,), (2, 8)]",)
    assert fd[1].tokens == frozenset({"fc", "mid"})
    assert fd[1].signature == ("linear", ((8,), (8, 8)))


def test_extract_features_neighbours_are_sorted_signatures():
    units = [linear("a", 4, 3), linear("b", 4, 4), Unit("p", ("p",), ((4,),), "Parameter"),
             linear("c", 2, 4)]
    g = ordered_graph(units, ["a", "b", "p", "c"],
                      [(INPUT, "a"), ("a", "b"), ("b", "c"), ("p", "c"), (INPUT, "c"),
                       ("c", OUTPUT)], Tracer.FX)
    _, fd = extract_features(g, g)
    c = fd[3]
    assert c.preds == tuple(sorted([INPUT, "linear[(4,), (4, 4)]", "param[(4,)]"]))
    assert c.succs == (OUTPUT,)
    assert fd[2].preds == ()
    assert fd[2].family == "param"


def test_extract_features_of_state_dict_units_guess_the_family():
    units = [Unit("bn", ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"),
                  ((4,), (4,), (4,), (4,)), ""),
             Unit("fc", ("fc.weight",), ((2, 4),), ""),
             Unit("tok", ("tok",), ((1, 4),), "Parameter")]
    fs, _ = extract_features(chain_graph(units, Tracer.STATE_DICT), chain_graph(units, Tracer.STATE_DICT))
    assert [(f.family, f.known_type) for f in fs] == [("norm", False), ("linear", False),
                                                      ("param", True)]
    assert fs[1].preds == ("norm[(4,), (4,), (4,), (4,)]",)


@settings(max_examples=300, deadline=None)
@given(a=st.lists(st.sampled_from([A, B, C, N(1)]), max_size=12),
       b=st.lists(st.sampled_from([A, B, C, N(1)]), max_size=12))
def test_aligning_a_common_prefix_first_changes_nothing(a, b):
    # align_sequences pairs the common prefix without the dynamic program: same pairs, same
    # tie-breaking (gaps as late as they go) as the program on the whole sequences
    assert align_sequences(a, b) == _align_rest(a, b)


def test_identical_sequences_never_reach_the_dynamic_program(monkeypatch):
    calls = []
    real = features_module._align_rest

    def counting(a, b):  # type: ignore[no-untyped-def]
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(features_module, "_align_rest", counting)
    sequence = [A, B, C] * 5000
    assert align_sequences(sequence, list(sequence)) == [(k, k) for k in range(15000)]
    assert calls == [(0, 0)]
    # one renamed layer near the end: the program runs on the tail only
    changed = [*sequence[:-2], D, sequence[-1]]
    pairs = align_sequences(sequence, changed)
    assert pairs == [(k, k) for k in range(15000)]  # C -> D is a same-family substitution
    assert calls[-1] == (2, 2)


def test_skipped_destination_units_leave_the_alignment_not_the_rank_space():
    # one of four identical layers is new: aligned with all four, where the gap goes is a guess
    # (spread); with the new one skipped, the three map onto the others exactly, in full ranks
    src = [linear(f"a.{i}", 8, 8) for i in range(3)]
    dst = [linear(f"b.{i}", 8, 8) for i in range(4)]
    fs, _ = extract_features(chain_graph(src, Tracer.FX), chain_graph(dst, Tracer.FX))
    assert max(f.spread for f in fs) > 0
    fs, fd = extract_features(chain_graph(src, Tracer.FX), chain_graph(dst, Tracer.FX), skip={"b.1"})
    assert [f.position for f in fs] == [0.0, 2.0, 3.0]
    assert [f.spread for f in fs] == [0.0, 0.0, 0.0]
    assert [f.position for f in fd] == [0.0, 1.0, 2.0, 3.0]


def W(rows: int, cols: int) -> tuple[str, tuple[tuple[int, ...], ...]]:
    return ("linear", ((rows,), (rows, cols)))


@pytest.mark.parametrize(("a", "b", "expected"), [
    # a fused qkv against q, k and v, then the output projection: no gap, nothing shifted
    ([N(8), W(24, 8), W(8, 8), N(8)], [N(8), W(8, 8), W(8, 8), W(8, 8), W(8, 8), N(8)],
     [(0, 0), (1, 1), (1, 2), (1, 3), (2, 4), (3, 5)]),
    # the other way: q, k, v against a fused qkv
    ([N(8), W(8, 8), W(8, 8), W(8, 8), W(8, 8), N(8)], [N(8), W(24, 8), W(8, 8), N(8)],
     [(0, 0), (1, 1), (2, 1), (3, 1), (4, 2), (5, 3)]),
    # grouped-query attention: k and v have fewer rows than q, qkv holds all three
    ([N(8), W(12, 8), W(8, 8), N(8)], [N(8), W(8, 8), W(2, 8), W(2, 8), W(8, 8), N(8)],
     [(0, 0), (1, 1), (1, 2), (1, 3), (2, 4), (3, 5)]),
    ([N(8), W(8, 8), W(2, 8), W(2, 8), W(8, 8), N(8)], [N(8), W(12, 8), W(8, 8), N(8)],
     [(0, 0), (1, 1), (2, 1), (3, 1), (4, 2), (5, 3)]),
    # the same, read backwards (the alignment also runs on reversed sequences): v, k, q
    ([N(8), W(2, 8), W(2, 8), W(8, 8), N(8)], [N(8), W(12, 8), N(8)],
     [(0, 0), (1, 1), (2, 1), (3, 1), (4, 2)]),
    # gate and up fused, stored (in, out) as a Conv1D keeps it
    ([("linear", ((8, 32),)), W(8, 16)], [W(16, 8), W(16, 8), W(8, 16)], [(0, 0), (0, 1), (1, 2)]),
])
def test_align_sequences_aligns_fused_units_with_their_parts(a, b, expected):
    assert align_sequences(a, b) == expected


def test_without_own_classes_forgets_only_classes_no_one_shares():
    """Against a checkpoint (no classes), a destination's own class (a layer scale) is guessed
    from its tensors as the checkpoint's are; shared families keep their class."""
    units = [Unit("ls", ("ls.lambda1",), ((8,),), "Dinov2LayerScale"),
             linear("fc", 8, 8),
             Unit("norm", ("norm.weight", "norm.bias"), ((8,), (8,)), "LayerNorm"),
             Unit("cls", ("cls",), ((1, 8),), "Parameter")]
    graph = without_own_classes(chain_graph(units, Tracer.HOOKS))
    assert [u.type_name for u in graph.units.values()] == ["", "Linear", "LayerNorm", "Parameter"]
    assert [unit_signature(u)[0] for u in graph.units.values()] == [
        "param", "linear", "norm", "param"]
    assert graph.tracer is Tracer.HOOKS and list(graph.graph.edges) == list(
        chain_graph(units, Tracer.HOOKS).graph.edges)


def test_an_embedding_neighbour_reads_as_a_matrix():
    """A checkpoint's embedding is one 2-d weight, guessed linear: the destination's embedding
    neighbour is described the same way, so the context term does not hold it against a match."""
    embed = Unit("embed", ("embed.weight",), ((10, 4),), "Embedding")
    src = [Unit("embed", ("embed.weight",), ((10, 4),), ""), linear("fc", 4, 4, type_name="")]
    dst = [embed, linear("fc", 4, 4)]
    fs, fd = extract_features(chain_graph(src, Tracer.STATE_DICT), chain_graph(dst, Tracer.HOOKS))
    assert fs[1].preds == fd[1].preds
    assert all(p.startswith("linear[") for p in fd[1].preds)
