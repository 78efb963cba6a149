"""Tests for archalign.repeats: runs of identical blocks run as their first two, order unchanged."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from archalign.repeats import Run, Unsafe, _runs_of, expand_edges, expand_reads
from archalign.source import read_source
from archalign.trace import trace_graph


def edges(g):
    return sorted(g.graph.edges)


def trace(model, example_inputs=None, **options):
    torch.manual_seed(0)
    return trace_graph(read_source(model), example_inputs, **options)


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
        full = trace(model, inputs, collapse_repeats=False)
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
    with caplog.at_level(logging.DEBUG, logger="archalign.repeats"):
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
    with caplog.at_level(logging.DEBUG, logger="archalign.repeats"):
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
    with caplog.at_level(logging.DEBUG, logger="archalign.repeats"):
        collapsed, full, collapsed_calls, _ = both_orders(model, model.blocks, X)
    assert_same_order(collapsed, full)
    assert collapsed_calls == 2 + 6  # the cut run, then the full one
    assert "blocks.0 and blocks.1 ran differently" in caplog.text


def test_a_layer_called_at_one_index_falls_back(caplog):
    model = Stack([Block(i) for i in range(6)], extra_at=4)
    with caplog.at_level(logging.DEBUG, logger="archalign.repeats"):
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
    with caplog.at_level(logging.DEBUG, logger="archalign.repeats"):
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
    with caplog.at_level(logging.DEBUG, logger="archalign.repeats"):
        collapsed, full, collapsed_calls, full_calls = both_orders(
            model, model.experts, torch.randn(32, 4))
    assert_same_order(collapsed, full)
    assert collapsed.tracer == "hooks"
    assert "failed: IndexError: index 2 is out of range); running every block" in caplog.text
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


# --------------------------------------------------------------------------- fx: edges and reads


RUN = Run("b", 0, 4)


def test_a_chain_of_blocks_expands_block_to_block_and_the_last_feeds_what_follows():
    cut = [("<input>", "b.0.x"), ("b.0.x", "b.0.y"), ("b.1.x", "b.1.y"), ("b.0.y", "b.1.x"),
           ("g", "b.1.y"), ("b.1.y", "head")]
    assert sorted(expand_edges(cut, [RUN])) == sorted([
        ("<input>", "b.0.x"), *((f"b.{i}.x", f"b.{i}.y") for i in range(4)),
        *((f"b.{i}.y", f"b.{i + 1}.x") for i in range(3)),
        *(("g", f"b.{i}.y") for i in range(1, 4)), ("b.3.y", "head")])


def test_parallel_blocks_all_feed_what_the_first_two_feed():
    cut = [("norm", "b.0.x"), ("norm", "b.1.x"), ("b.0.x", "sum"), ("b.1.x", "sum")]
    assert sorted(expand_edges(cut, [RUN])) == sorted(
        [*(("norm", f"b.{i}.x") for i in range(4)), *((f"b.{i}.x", "sum") for i in range(4))])


@pytest.mark.parametrize("cut", [
    [("b.0.x", "b.1.x"), ("b.0.x", "head"), ("b.1.x", "head")],  # chain, and a skip from b.0
    [("b.0.x", "head")],  # only the first feeds it
    [("b.1.x", "b.0.x")],  # backwards
    [("b.0.x", "b.0.y"), ("b.1.y", "b.1.x")],  # different blocks
], ids=["skip", "first-only", "backwards", "different"])
def test_edges_that_cannot_be_expanded_are_unsafe(cut):
    with pytest.raises(Unsafe):
        expand_edges(cut, [RUN])


def test_reads_of_later_blocks_are_their_own_unless_every_block_reads_it():
    reads = {"b.0.q": 5, "b.0.k": 5, "b.0.g": 3, "b.1.q": 7, "b.1.k": 7, "b.1.g": 3, "head": 9}
    out = expand_reads(reads, [RUN])
    assert {k: out[k] for k in reads} == reads
    assert out["b.2.q"] == out["b.2.k"] != out["b.3.q"] == out["b.3.k"]
    assert out["b.2.q"] not in reads.values()
    assert out["b.2.g"] == out["b.3.g"] == 3  # a tensor every block reads
