"""Tests for archalign.trace: fx graphs, the hooks and registration fallbacks, harmonising."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archalign import trace as trace_module
from archalign.graph import INPUT, OUTPUT, Unit, build_units, chain_graph
from archalign.source import read_source
from archalign.trace import _runs_of, harmonise_graphs, trace_graph


def edges(g):
    return sorted(g.graph.edges)


def trace(model, example_inputs=None):
    torch.manual_seed(0)
    return trace_graph(read_source(model), example_inputs)


# --------------------------------------------------------------------------- tiny models


class Reversed(nn.Module):
    """Registers ``b`` before ``a`` but runs ``a`` first."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(4, 2)
        self.a = nn.Linear(3, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 4)

    def forward(self, x):
        x = x + self.fc1(x)
        x = x + self.fc2(x)
        return self.fc3(x)


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.left = nn.Linear(4, 4)
        self.right = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.stem(x))
        return self.head(self.left(h) + self.right(h))


class Metadata(nn.Module):
    """fc2 reads only fc1's *size*, which is no data flow."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc1(x)
        y = self.fc2(x * h.size(-1))
        return y + h


class WithToken(nn.Module):
    """A bare Parameter on the root, read with get_attr between two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.pos = nn.Parameter(torch.zeros(4))
        self.proj = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.proj(x) + self.pos)


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.body(x))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.attn(x, x, x)
        return self.fc(h)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.mid(self.emb(x)))


class DataDependent(nn.Module):
    """``if x.sum() > 0`` defeats torch.fx; registration order (b, a) is not execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(4, 2)
        self.a = nn.Linear(3, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            return self.b(h)
        return self.b(-h)


class DataDependentKwargs(DataDependent):
    def forward(self, x=None):  # type: ignore[override]
        return super().forward(x)


class WithDummy(DataDependent):
    @property
    def dummy_inputs(self):
        return {"x": torch.ones(2, 3)}

    def forward(self, x=None):  # type: ignore[override]
        return super().forward(x)


# --------------------------------------------------------------------------- fx


def test_fx_order_and_edges_of_a_chain():
    g = trace(Reversed())
    assert g.tracer == "fx"
    assert g.order == ["a", "b"]  # execution order, not registration order
    assert edges(g) == sorted([(INPUT, "a"), ("a", "b"), ("b", OUTPUT)])


def test_fx_residual_feeds_only_the_nearest_producer():
    g = trace(Residual())
    assert g.order == ["fc1", "fc2", "fc3"]
    assert g.predecessors("fc1") == [INPUT]
    assert g.predecessors("fc2") == ["fc1"]
    # without the transitive reduction fc3 would read <input>, fc1 and fc2
    assert g.predecessors("fc3") == ["fc2"]
    assert g.successors("fc3") == [OUTPUT]
    assert edges(g) == sorted([(INPUT, "fc1"), ("fc1", "fc2"), ("fc2", "fc3"), ("fc3", OUTPUT)])


def test_fx_branches():
    g = trace(Branches())
    assert g.order == ["stem", "left", "right", "head"]
    assert g.predecessors("stem") == [INPUT]
    assert g.successors("stem") == ["left", "right"]
    assert g.predecessors("left") == ["stem"]
    assert g.predecessors("right") == ["stem"]
    assert g.predecessors("head") == ["left", "right"]
    assert g.successors("head") == [OUTPUT]


def test_fx_metadata_reads_are_not_data_flow():
    g = trace(Metadata())
    assert edges(g) == sorted([(INPUT, "fc1"), (INPUT, "fc2"), ("fc1", OUTPUT), ("fc2", OUTPUT)])
    assert g.predecessors("fc2") == [INPUT]


def test_fx_bare_parameter_is_ordered_where_it_is_read():
    g = trace(WithToken())
    assert g.order == ["proj", "pos", "head"]
    assert g.predecessors("pos") == []  # a parameter reads nothing
    assert g.predecessors("head") == ["pos", "proj"]
    assert g.predecessors("proj") == [INPUT]


def test_fx_traces_through_containers_and_skips_parameter_free_layers():
    g = trace(Nested())
    assert g.order == ["body.0", "body.2.0", "norm"]
    assert edges(g) == sorted([(INPUT, "body.0"), ("body.0", "body.2.0"), ("body.2.0", "norm"),
                               ("norm", OUTPUT)])


def test_fx_layer_with_a_child_layer_is_one_leaf_chained_inside():
    g = trace(Attention())
    assert g.order == ["attn", "attn.out_proj", "fc"]
    assert edges(g) == sorted([(INPUT, "attn"), ("attn", "attn.out_proj"), ("attn.out_proj", "fc"),
                               ("fc", OUTPUT)])


def test_fx_tied_weight_resolves_to_its_primary_unit():
    g = trace(Tied())
    assert g.order == ["emb", "mid"]
    assert sorted(g.graph.nodes) == sorted([INPUT, "emb", "mid", OUTPUT])
    assert g.predecessors("emb") == [INPUT]
    assert g.predecessors("mid") == ["emb"]
    # the head reads mid's output and emb's tied weight; emb -> <output> is implied by
    # emb -> mid -> <output> and removed by the transitive reduction
    assert edges(g) == sorted([(INPUT, "emb"), ("emb", "mid"), ("mid", OUTPUT)])


def test_fx_units_not_used_by_forward_go_last():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Linear(2, 2)
            self.used = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    g = trace(Unused())
    assert g.order == ["used", "spare"]
    assert g.predecessors("spare") == []
    assert g.successors("spare") == []


# --------------------------------------------------------------------------- fallbacks


def test_state_dict_gives_a_state_dict_chain():
    g = trace_graph(read_source(Reversed().state_dict()))
    assert g.tracer == "state_dict"
    assert g.order == ["b", "a"]
    assert edges(g) == sorted([(INPUT, "b"), ("b", "a"), ("a", OUTPUT)])


def test_data_dependent_model_without_inputs_falls_back_to_registration(caplog):
    with caplog.at_level(logging.WARNING, logger="archalign.trace"):
        g = trace(DataDependent())
    assert g.tracer == "registration"
    assert g.order == ["b", "a"]
    assert "no example_inputs were given" in caplog.text


@pytest.mark.parametrize("positive", [True, False])
def test_data_dependent_model_with_inputs_uses_hooks(positive):
    x = torch.ones(2, 3) if positive else -torch.ones(2, 3)
    g = trace(DataDependent(), x)
    assert g.tracer == "hooks"
    assert g.order == ["a", "b"]  # execution order recovered
    assert edges(g) == sorted([(INPUT, "a"), ("a", "b"), ("b", OUTPUT)])


@pytest.mark.parametrize(
    "inputs", [(torch.ones(2, 3),), [torch.ones(2, 3)]], ids=["tuple", "list"])
def test_hooks_accept_positional_sequences(inputs):
    assert trace(DataDependent(), inputs).order == ["a", "b"]


def test_hooks_pass_a_dict_as_keyword_arguments():
    g = trace(DataDependentKwargs(), {"x": torch.ones(2, 3)})
    assert (g.tracer, g.order) == ("hooks", ["a", "b"])


def test_hooks_use_dummy_inputs_when_none_are_given():
    g = trace(WithDummy())
    assert (g.tracer, g.order) == ("hooks", ["a", "b"])


def test_failing_example_inputs_fall_back_to_registration(caplog):
    with caplog.at_level(logging.WARNING, logger="archalign.trace"):
        g = trace(DataDependent(), torch.ones(2, 7))  # wrong width: the forward raises
    assert g.tracer == "registration"
    assert g.order == ["b", "a"]
    assert "failed" in caplog.text


def test_hooks_restore_training_flags_and_remove_hooks():
    model = DataDependent()
    model.train()
    model.a.eval()
    x = torch.ones(2, 3)
    before = model(x).detach()
    trace_graph(read_source(model), x)
    assert model.training is True
    assert model.b.training is True
    assert model.a.training is False
    for m in model.modules():
        assert len(m._forward_pre_hooks) == 0
    assert torch.equal(model(x), before)


def test_hooks_put_parameters_of_the_root_first():
    class TokenFirst(WithToken):
        def forward(self, x):
            h = self.proj(x)
            if h.sum() > 0:
                h = h + self.pos
            return self.head(h)

    g = trace(TokenFirst(), torch.ones(2, 3))
    assert g.tracer == "hooks"
    # a root parameter is recorded when the root starts, before any layer
    assert g.order == ["pos", "proj", "head"]


# --------------------------------------------------------------------------- harmonise


def _units(*keys):
    return [Unit(k, (f"{k}.weight",), ((2, 2),), "Linear") for k in keys]


REG = _units("b", "a", "c")  # registration order
RUN = [REG[1], REG[0], REG[2]]  # execution order: a, b, c


def _graph(tracer, units):
    return chain_graph(units, tracer)


@pytest.mark.parametrize(
    ("src_tracer", "dst_tracer", "expected"),
    [
        # same kind of evidence: kept as they are (execution order for fx/hooks)
        ("fx", "fx", (("fx", "abc"), ("fx", "abc"))),
        ("hooks", "hooks", (("hooks", "abc"), ("hooks", "abc"))),
        ("registration", "registration", (("registration", "bac"), ("registration", "bac"))),
        ("registration", "state_dict", (("registration", "bac"), ("state_dict", "bac"))),
        ("state_dict", "registration", (("state_dict", "bac"), ("registration", "bac"))),
        # one side knows only registration order: both sides fall back to registration order
        ("fx", "registration", (("registration", "bac"), ("registration", "bac"))),
        ("registration", "hooks", (("registration", "bac"), ("registration", "bac"))),
        ("state_dict", "fx", (("state_dict", "bac"), ("registration", "bac"))),
        ("fx", "state_dict", (("registration", "bac"), ("state_dict", "bac"))),
        # fx against hooks: both keep their execution order, as chains
        ("fx", "hooks", (("fx", "abc"), ("hooks", "abc"))),
        ("hooks", "fx", (("hooks", "abc"), ("fx", "abc"))),
        # a sorted file: both sides in natural key order
        ("sorted", "fx", (("sorted", "abc"), ("sorted", "abc"))),
    ],
)
def test_harmonise_graphs(src_tracer, dst_tracer, expected):
    def start(tracer):
        return _graph(tracer, REG if tracer in ("registration", "state_dict", "sorted") else RUN)

    src, dst = harmonise_graphs(start(src_tracer), start(dst_tracer), REG, REG)
    got = ((src.tracer, "".join(src.order)), (dst.tracer, "".join(dst.order)))
    assert got == expected


def test_harmonise_fx_with_hooks_drops_the_fx_data_flow():
    fx_graph = trace(Branches())
    hooks_graph = _graph("hooks", build_units(read_source(Branches())))
    units = build_units(read_source(Branches()))
    src, dst = harmonise_graphs(fx_graph, hooks_graph, units, units)
    assert src.tracer == "fx"
    assert src.order == ["stem", "left", "right", "head"]
    # the branch structure is gone: a plain chain
    assert edges(src) == sorted([(INPUT, "stem"), ("stem", "left"), ("left", "right"),
                                 ("right", "head"), ("head", OUTPUT)])
    assert (dst.tracer, dst.order) == ("hooks", ["stem", "left", "right", "head"])


def test_harmonise_same_tracer_returns_the_same_graphs():
    a, b = trace(Branches()), trace(Residual())
    units_a, units_b = build_units(read_source(Branches())), build_units(read_source(Residual()))
    assert harmonise_graphs(a, b, units_a, units_b) == (a, b)


def test_harmonise_sorted_uses_natural_key_order():
    units = [Unit(k, (f"{k}.weight",), ((2, 2),), "Linear")
             for k in ["blocks.10", "blocks.2", "blocks.1", "head"]]
    src, dst = harmonise_graphs(_graph("sorted", units), _graph("fx", units), units, units)
    assert src.order == ["blocks.1", "blocks.2", "blocks.10", "head"]
    assert dst.order == ["blocks.1", "blocks.2", "blocks.10", "head"]
    assert (src.tracer, dst.tracer) == ("sorted", "sorted")


# --------------------------------------------------------------------------- weight layouts


class Conv1D(nn.Module):
    """Hugging Face GPT-2 style: weight stored (in, out), y = x @ W + b."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class MyLinear(nn.Module):
    """A custom layer stored (out, in), like nn.Linear."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i))

    def forward(self, x):
        return F.linear(x, self.weight)


class Layouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(4, 8)  # (4, 8) stored (in, out)
        self.c_sq = Conv1D(8, 8)  # square: only the values tell
        self.mine = MyLinear(8, 3)  # (3, 8) stored (out, in)
        self.mine_sq = MyLinear(3, 3)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(self.mine_sq(self.mine(self.c_sq(self.c_fc(x)))))


def test_probe_layouts_marks_weights_stored_in_out():
    torch.manual_seed(0)
    g = trace(Layouts())
    units = g.units
    assert units["c_fc"].transposed == (True, False)
    assert units["c_fc"].canonical_shapes == ((8, 4), (8,))
    assert units["c_fc"].shape_key == ((8,), (8, 4))
    assert units["c_sq"].transposed == (True, False)
    assert units["mine"].transposed == ()
    assert units["mine_sq"].transposed == ()
    assert units["lin"].transposed == ()  # torch.nn layers are never probed
    assert g.order == ["c_fc", "c_sq", "mine", "mine_sq", "lin"]


def test_probe_layouts_of_square_weights_on_the_meta_device():
    class Square(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_sq = Conv1D(8, 8)
            self.mine_sq = MyLinear(8, 8)

        def forward(self, x):
            return self.mine_sq(self.c_sq(x))

    model = Square().to("meta")
    g = trace_graph(read_source(model))
    # no values to compare and a square shape: the class name decides
    assert g.units["c_sq"].transposed == (True, False)
    assert g.units["mine_sq"].transposed == ()


def test_state_dict_units_are_not_probed():
    g = trace_graph(read_source(Layouts().state_dict()))
    assert all(u.transposed == () for u in g.units.values())


class CountingLinear(nn.Module):
    """A custom layer that updates a buffer on every training-mode call (like running stats)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.seen += 1
        return F.linear(x, self.weight)


class WithCounting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = CountingLinear()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.layer(x))


def test_tracing_changes_no_tensor():
    torch.manual_seed(0)
    model = WithCounting()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_graph(read_source(model))
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


# --------------------------------------------------------------------------- repeated blocks


def both_orders(model, blocks, inputs=None):
    """Trace ``model`` with repeated blocks collapsed, then with every block run.

    Returns the two graphs and how many times ``blocks`` were called in each trace (a counting
    pre-hook goes on every one of them, so they stay alike).
    """
    calls: list[nn.Module] = []
    handles = [b.register_forward_pre_hook(lambda m, _args: calls.append(m)) for b in blocks]
    try:
        collapsed = trace(model, inputs)
        collapsed_calls = len(calls)
        calls.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trace_module, "_COLLAPSE_REPEATS", False)
            full = trace(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return collapsed, full, collapsed_calls, len(calls)


def assert_same_order(collapsed, full):
    assert collapsed.tracer == full.tracer
    assert collapsed.order == full.order  # key for key
    assert list(collapsed.units.values()) == list(full.units.values())
    assert edges(collapsed) == edges(full)


TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}


def _hf_model(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=6, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
            eos_token_id=1))
    config, model = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                     "mistral": ("MistralConfig", "MistralForCausalLM"),
                     "phi3": ("Phi3Config", "Phi3ForCausalLM"),
                     "mixtral": ("MixtralConfig", "MixtralForCausalLM")}[name]
    extra = {"num_local_experts": 4} if name == "mixtral" else {}
    return getattr(transformers, model)(getattr(transformers, config)(
        **TINY, **extra, bos_token_id=0, eos_token_id=1, pad_token_id=0))


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2", "phi3", "mixtral"])
def test_hugging_face_decoders_collapse_to_the_full_order(name, device):
    with torch.device(device):
        model = _hf_model(name)
    layers = model.transformer.h if name == "gpt2" else model.model.layers
    collapsed, full, collapsed_calls, full_calls = both_orders(model, layers)
    assert_same_order(collapsed, full)
    if name == "mixtral" and device == "meta":
        # its fused experts cannot run on meta: registration order either way
        assert collapsed.tracer == "registration"
        return
    assert collapsed.tracer == "hooks"
    assert (collapsed_calls, full_calls) == (2, 6)  # 4 of the 6 layers never ran
    assert collapsed.order[:3] == full.order[:3]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("style", ["a", "b"], ids=["mixtral-names", "deepseek-names"])
def test_moe_collapses_layers_and_experts_inside_out(style, device, caplog):
    from corpus.scale import MoeShape, make_moe

    with torch.device(device):
        model = make_moe(MoeShape(layers=6, experts=8), style)
    experts = [m for name, m in model.named_modules() if name.rpartition(".")[0].endswith("experts")]
    assert len(experts) == 48
    with caplog.at_level(logging.DEBUG, logger="archalign.trace"):
        collapsed, full, collapsed_calls, full_calls = both_orders(model, experts)
    assert_same_order(collapsed, full)
    assert collapsed.tracer == "hooks"
    assert (collapsed_calls, full_calls) == (4, 48)  # 2 experts of 2 layers
    layers = "model.layers" if style == "a" else "transformer.h"
    moe = "block_sparse_moe" if style == "a" else "mlp"
    assert f"expanded {layers}[0:6], {layers}.0.{moe}.experts[0:8]" in caplog.text


class Block(nn.Module):
    """A pre-norm residual block; ``swap`` runs fc before norm. ``index`` follows the block's place,
    and ``groups`` equals it in block 1 only: neither makes blocks differ."""

    def __init__(self, index: int, swap: bool = False, parity: bool = False) -> None:
        super().__init__()
        self.index = index
        self.groups = 1
        self.swap = swap
        self.parity = parity  # odd blocks swap, decided in forward from the index
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if self.swap or (self.parity and self.index % 2):
            return x + self.norm(self.fc(x))
        return x + self.fc(self.norm(x))


class Stack(nn.Module):
    """Blocks in a ModuleList, behind a data-dependent branch (torch.fx cannot trace it);
    ``extra`` runs after block ``extra_at`` only."""

    def __init__(self, blocks, extra_at: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(blocks)
        self.extra = nn.Linear(8, 8)
        self.extra_at = extra_at
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        if h.sum() > 0:
            h = -h
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.extra_at:
                h = self.extra(h)
        if self.extra_at is None:
            h = self.extra(h)
        return self.head(h)


X = torch.ones(3, 4)


def test_identical_blocks_run_two(caplog):
    model = Stack([Block(i) for i in range(10)])
    with caplog.at_level(logging.DEBUG, logger="archalign.trace"):
        collapsed, full, collapsed_calls, full_calls = both_orders(model, model.blocks, X)
    assert_same_order(collapsed, full)
    assert (collapsed_calls, full_calls) == (2, 10)
    assert "expanded blocks[0:10]" in caplog.text
    assert full.order == ["embed", *(f"blocks.{i}.{p}" for i in range(10) for p in ("norm", "fc")),
                          "extra", "head"]


def test_a_different_block_splits_the_run():
    model = Stack([Block(i, swap=i == 4) for i in range(10)])
    collapsed, full, collapsed_calls, _ = both_orders(model, model.blocks, X)
    assert_same_order(collapsed, full)
    assert full.order.index("blocks.4.fc") < full.order.index("blocks.4.norm")
    assert collapsed_calls == 5  # blocks 0, 1, 4, 5, 6: runs [0:4] and [5:10] ran two each


def test_alternating_blocks_are_not_collapsed():
    model = Stack([Block(i, swap=i % 2 == 1) for i in range(8)])
    collapsed, full, collapsed_calls, full_calls = both_orders(model, model.blocks, X)
    assert_same_order(collapsed, full)
    assert collapsed_calls == full_calls == 8  # no run: one full run, no second attempt


def test_blocks_that_branch_on_their_index_fall_back(caplog):
    model = Stack([Block(i, parity=True) for i in range(6)])
    with caplog.at_level(logging.DEBUG, logger="archalign.trace"):
        collapsed, full, collapsed_calls, _ = both_orders(model, model.blocks, X)
    assert_same_order(collapsed, full)
    assert collapsed_calls == 2 + 6  # the cut run, then the full one
    assert "blocks.0 and blocks.1 ran differently" in caplog.text


def test_a_layer_called_at_one_index_falls_back(caplog):
    model = Stack([Block(i) for i in range(6)], extra_at=4)
    with caplog.at_level(logging.DEBUG, logger="archalign.trace"):
        collapsed, full, collapsed_calls, _ = both_orders(model, model.blocks, X)
    assert_same_order(collapsed, full)
    assert full.order.index("extra") == full.order.index("blocks.4.fc") + 1
    assert collapsed_calls == 2 + 6
    assert "units outside the blocks did not run (extra" in caplog.text


def test_a_cut_block_reached_another_way_falls_back(caplog):
    class Peek(Stack):
        """Runs block 4 once before the loop, through a plain list the cut does not touch."""

        def __init__(self) -> None:
            super().__init__([Block(i) for i in range(6)])
            self.listed = list(self.blocks)

        def forward(self, x):
            peeked = self.listed[4](torch.zeros(x.shape[0], 8))
            return super().forward(x) + peeked.sum()

    model = Peek()
    with caplog.at_level(logging.DEBUG, logger="archalign.trace"):
        collapsed, full, collapsed_calls, _ = both_orders(model, model.blocks, X)
    assert_same_order(collapsed, full)
    assert full.order[:2] == ["blocks.4.norm", "blocks.4.fc"]
    assert collapsed_calls == 3 + 7
    assert "a block cut from its container ran" in caplog.text


class RoutedMoe(nn.Module):
    """Experts called as ``self.experts[idx]`` for every index up to a config value (Hugging Face
    style); a cut list raises IndexError."""

    def __init__(self, experts: int = 6) -> None:
        super().__init__()
        self.num_experts = experts
        self.embed = nn.Linear(4, 8)
        self.router = nn.Linear(8, experts)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(experts))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        top = self.router(h).topk(2, dim=-1).indices
        out = torch.zeros_like(h)
        for idx in range(self.num_experts):
            hit = (top == idx).any(-1)
            if hit.any():
                out[hit] = out[hit] + self.experts[idx](h[hit])
        return self.head(out)


def test_indexing_a_cut_container_falls_back_and_restores_it(caplog):
    torch.manual_seed(0)
    model = RoutedMoe()
    names = [name for name, _ in model.named_modules()]
    with caplog.at_level(logging.DEBUG, logger="archalign.trace"):
        collapsed, full, collapsed_calls, full_calls = both_orders(
            model, model.experts, torch.randn(32, 4))
    assert_same_order(collapsed, full)
    assert collapsed.tracer == "hooks"
    assert "failed (IndexError" in caplog.text
    assert 0 < collapsed_calls - full_calls <= 2  # the cut run reached its first two experts
    assert len(model.experts) == 6
    assert [name for name, _ in model.named_modules()] == names
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_sequential_of_identical_linear_layers():
    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*(nn.Linear(4, 4) for _ in range(6)))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = self.body(x)
            return self.head(h if h.sum() > 0 else -h)

    model = Body()
    collapsed, full, collapsed_calls, full_calls = both_orders(model, model.body, torch.ones(2, 4))
    assert_same_order(collapsed, full)
    assert full.order == [*(f"body.{i}" for i in range(6)), "head"]
    assert (collapsed_calls, full_calls) == (2, 6)
    assert len(model.body) == 6


def test_containers_nested_in_containers():
    class Stages(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList(nn.ModuleList(Block(j) for j in range(5)) for _ in range(4))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            if x.sum() > 0:
                x = -x
            for stage in self.stages:
                for block in stage:
                    x = block(x)
            return self.head(x)

    model = Stages()
    blocks = [b for stage in model.stages for b in stage]
    collapsed, full, collapsed_calls, full_calls = both_orders(model, blocks, torch.ones(2, 8))
    assert_same_order(collapsed, full)
    assert (collapsed_calls, full_calls) == (4, 20)  # 2 blocks of 2 stages
    assert full.order[-3:] == ["stages.3.4.norm", "stages.3.4.fc", "head"]


def test_runs_of_integer_attributes_constant_or_following_the_index():
    def runs(*ints):
        return [(r.start, r.stop) for r in _runs_of("c", [("same", i) for i in ints])]

    assert runs((0, 1), (1, 1), (2, 1), (3, 1), (4, 1)) == [(0, 5)]  # index, constant
    assert runs((5,), (5,), (5,), (3,), (3,), (3,), (3,)) == [(3, 7)]
    assert runs((0,), (1,), (2,), (2,), (4,), (5,)) == []  # neither: runs of 3
    assert runs(*[(0,)] * 3) == []  # too short
