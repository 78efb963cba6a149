"""Small models built from a spec, shared by the pipeline tests.

`SpecNet` runs a list of layers in a fixed execution order, but registers them under any names,
nested in any containers, in any registration order: exactly what differs between two
implementations of one architecture.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def make_layers(kind: str, widths: Sequence[int], norm: Sequence[bool]) -> list[nn.Module]:
    """Layers of an MLP ("mlp") or a CNN ("cnn") with the given widths, optionally normalised."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if kind == "mlp":
            layers.append(nn.Linear(a, b))
            if norm[i]:
                layers.append(nn.LayerNorm(b))
        else:
            layers.append(nn.Conv2d(a, b, 3, padding=1))
            if norm[i]:
                layers.append(nn.BatchNorm2d(b))
    return layers


class SpecNet(nn.Module):
    """Run ``layers`` in order (ReLU between), registered at ``paths`` in ``registration`` order."""

    def __init__(self, layers: Sequence[nn.Module], paths: Sequence[str],
                 registration: Sequence[int] | None = None) -> None:
        super().__init__()
        self.paths = list(paths)
        for i in registration if registration is not None else range(len(layers)):
            _register(self, paths[i], layers[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, path in enumerate(self.paths):
            x = self.get_submodule(path)(x)
            if i < len(self.paths) - 1:
                x = torch.relu(x)
        return x


def _register(root: nn.Module, path: str, layer: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        if not hasattr(node, name):
            node.add_module(name, nn.ModuleDict() if len(name) % 2 else nn.Module())
        node = getattr(node, name)
    node.add_module(leaf, layer)


def randomise_buffers(model: nn.Module, seed: int) -> None:
    """Give BatchNorm statistics values that a wrong load would reveal."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


def write_sharded(model: nn.Module, folder: Path, per_shard: int) -> Path:
    """Save ``model``'s state_dict as a sharded Hugging Face checkpoint (``per_shard`` tensors per
    safetensors file, plus ``model.safetensors.index.json``); returns the index."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = list(state)
    weight_map = {}
    for n, start in enumerate(range(0, len(keys), per_shard)):
        name = f"model-{n:05d}.safetensors"
        save_file({k: state[k] for k in keys[start:start + per_shard]}, str(folder / name))
        weight_map.update(dict.fromkeys(keys[start:start + per_shard], name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


# --------------------------------------------------------------------------- tiny traced models
# (tracer tests: fx order and data flow, hooks and registration fallbacks)


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
