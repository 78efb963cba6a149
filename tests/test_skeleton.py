"""Tests for archalign.skeleton: a checkpoint's key tree put in the destination's execution order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archalign.graph import Tracer
from archalign.skeleton import fit_order
from archalign.source import read_source
from archalign.trace import trace_graph


class Block(nn.Module):
    """A pre-norm transformer block whose children are registered out of execution order (as
    Hugging Face blocks often are): norms last."""

    def __init__(self, dim: int, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.fused:
            q, k, v = self.qkv(h).chunk(3, dim=-1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        x = x + self.proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class Tower(nn.Module):
    """Embedding, a run of blocks, a final norm registered before the blocks, a head."""

    def __init__(self, depth: int = 3, dim: int = 8, fused: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)
        self.stem = nn.Conv1d(3, dim, 1)
        self.blocks = nn.ModuleList(Block(dim, fused) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def fitted(state: dict[str, torch.Tensor], dst: nn.Module) -> list[str]:
    graph = trace_graph(read_source(state))
    return fit_order(graph, trace_graph(read_source(dst))).order


def sorted_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as a safetensors file keeps it: keys sorted."""
    state = model.state_dict()
    return {k: state[k] for k in sorted(state)}


def execution_order(model: nn.Module) -> list[str]:
    return trace_graph(read_source(model)).order


@pytest.mark.parametrize("make", [
    lambda: Tower(),
    lambda: Tower(fused=True),
    lambda: Tower(depth=5, dim=4),
    lambda: Tower(depth=12, dim=4),  # sorted keys put blocks.10 before blocks.2
], ids=["split", "fused", "deep", "twelve"])
@pytest.mark.parametrize("saved", [lambda m: m.state_dict(), sorted_state],
                         ids=["registration", "sorted"])
def test_a_checkpoint_fitted_to_its_own_model_is_in_execution_order(make, saved):
    model = make()
    assert trace_graph(read_source(model)).tracer is Tracer.FX
    assert fitted(saved(model), model) == execution_order(model)


def test_a_fused_checkpoint_fitted_to_split_projections():
    src, dst = Tower(fused=True), Tower(fused=False)
    order = fitted(sorted_state(src), dst)
    assert order[:4] == ["stem", "blocks.0.norm1", "blocks.0.qkv", "blocks.0.proj"]
    assert order[-2:] == ["norm", "head"]


@pytest.mark.parametrize("saved", [lambda m: m.state_dict(), sorted_state],
                         ids=["registration", "sorted"])
def test_torchvision_resnet_checkpoint_fitted_to_timm(saved):
    tv = pytest.importorskip("torchvision.models")
    timm = pytest.importorskip("timm")
    src = tv.resnet18(num_classes=10)
    dst = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert fitted(saved(src), dst) == execution_order(src)


@pytest.mark.parametrize("saved", [lambda m: m.state_dict(), sorted_state],
                         ids=["registration", "sorted"])
def test_a_deeper_resnet_checkpoint_fitted_to_a_shallower_one(saved):
    """ResNet-34's stages hold 3, 4, 6, 3 blocks, ResNet-18's 2 each: no stage pairs block by
    block, yet every block is put in the order of a destination block holding the same units
    (where the head goes among blocks the destination lacks is open: left out)."""
    tv = pytest.importorskip("torchvision.models")
    src = tv.resnet34(num_classes=10)
    order = fitted(saved(src), tv.resnet18(num_classes=10))
    assert [k for k in order if k != "fc"] == [k for k in execution_order(src) if k != "fc"]


def test_the_result_is_a_fitted_chain_over_the_same_units():
    model = Tower()
    graph = trace_graph(read_source(sorted_state(model)))
    assert graph.tracer is Tracer.SORTED  # sorted keys: an order that means nothing
    result = fit_order(graph, trace_graph(read_source(model)))
    assert result.tracer is Tracer.FITTED
    assert sorted(result.units) == sorted(graph.units)
    assert result.units["blocks.0.q"] is graph.units["blocks.0.q"]


def test_needs_a_destination_in_execution_order():
    graph = trace_graph(read_source(Tower().state_dict()))
    with pytest.raises(ValueError, match=r"execution order.*'state_dict'"):
        fit_order(graph, graph)


class NamedAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        return self.o_proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


class NamedBlock(nn.Module):
    """A block named as Hugging Face names them, whose sorted keys put every pair of equal
    layers in the wrong order: k_proj, o_proj, q_proj, v_proj (four equal linears) and
    layernorm_after before layernorm_before."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layernorm_before, self.layernorm_after = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = NamedAttention(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.fc2(torch.relu(self.fc1(self.layernorm_after(x))))


class NamedTower(Tower):
    def __init__(self, depth: int = 2, dim: int = 8) -> None:
        super().__init__(depth, dim)
        self.blocks = nn.ModuleList(NamedBlock(dim) for _ in range(depth))


def test_equal_layers_are_put_in_the_order_their_names_say():
    """Against a fused qkv, the sequence cannot tell q, k, v from o (four equal linears), nor
    the two norms apart: the names' conventions break the tie (q, k, v before o; before/pre
    before after/post), never the sorted order."""
    order = fitted(sorted_state(NamedTower()), Tower(depth=2, fused=True))
    assert order[1:9] == ["blocks.0.layernorm_before", "blocks.0.attention.q_proj",
                          "blocks.0.attention.k_proj", "blocks.0.attention.v_proj",
                          "blocks.0.attention.o_proj", "blocks.0.layernorm_after",
                          "blocks.0.fc1", "blocks.0.fc2"]



class ScaledBlock(nn.Module):
    """A block with a layer scale registered first (its own tensor) and used last."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.dw = nn.Conv1d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(x).transpose(1, 2)
        h = self.fc2(torch.relu(self.fc1(self.norm(h)))) * self.gamma
        return x + h.transpose(1, 2)


class InTurns(nn.Module):
    """The original ConvNeXt's layout: downsampling layers and stages in two ModuleLists,
    used in turns (downsample i, then stage i)."""

    def __init__(self, dims: tuple[int, ...] = (4, 8, 16)) -> None:
        super().__init__()
        ins = (3, *dims[:-1])
        self.downsample_layers = nn.ModuleList(nn.Conv1d(i, o, 1) for i, o in zip(ins, dims))
        self.stages = nn.ModuleList(nn.Sequential(ScaledBlock(d), ScaledBlock(d)) for d in dims)
        self.head = nn.Linear(dims[-1], 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(x.mean(-1))


@pytest.mark.parametrize("saved", [lambda m: m.state_dict(), sorted_state],
                         ids=["registration", "sorted"])
def test_two_module_lists_used_in_turns_and_layer_scales_used_last(saved):
    """Two ModuleLists of one length that run in turns are interleaved, and a block's own
    tensor (registered first) is placed where it runs."""
    model = InTurns()
    assert fitted(saved(model), model) == execution_order(model)


class LanguageModel(nn.Module):
    """An input embedding and an output head of one shape; sorted keys put the head first."""

    def __init__(self, vocab: int = 12, dim: int = 8) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, dim)
        self.model.layers = nn.ModuleList(Block(dim, fused=False) for _ in range(2))
        self.model.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


def test_an_embedding_and_a_head_of_one_shape_are_told_apart_by_their_names():
    model = LanguageModel()
    order = fitted(sorted_state(model), model)
    assert order[0] == "model.embed_tokens" and order[-1] == "lm_head"


class MetaFeedForward(nn.Module):
    """Meta's SwiGLU naming: w2 (down) runs after w1 and w3 (gate and up)."""

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        return self.norm2(x + self.w2(torch.nn.functional.silu(self.w1(h)) * self.w3(h)))


@pytest.mark.parametrize("saved", [lambda m: m.state_dict(), sorted_state],
                         ids=["registration", "sorted"])
def test_numbered_siblings_chain_only_with_equal_ones(saved):
    """w1 and w3 are equal (they chain: w1 first), w2 is not (free, it runs last); the equal
    norms keep their numbers' order."""
    model = MetaFeedForward()
    assert fitted(saved(model), model) == ["norm1", "w1", "w3", "w2", "norm2"]
