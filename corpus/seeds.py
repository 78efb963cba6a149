"""The seed scenarios: small MLPs (identical, renamed plus a new layer, deeper into shallower)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ._pair import (
    Pair,
    Truth,
    identity_truth,
    image_input,
    make_pair,
    map_keys,
)

# --------------------------------------------------------------------------- 10-12. seed MLPs

class MLP(nn.Module):
    """``fc1 -> ReLU -> fc2 -> ... -> fcN`` over the given widths (the seed scenarios' models)."""

    def __init__(self, *widths: int) -> None:
        super().__init__()
        self.depth = len(widths) - 1
        for i, (a, b) in enumerate(itertools.pairwise(widths), start=1):
            self.add_module(f"fc{i}", nn.Linear(a, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.depth:
                x = torch.relu(x)
        return x


class RenamedMLP(nn.Module):
    """Seed scenario 2's destination: ``fc1`` renamed ``first_layer``, a new ``fc3`` (5 -> 3) added."""

    def __init__(self) -> None:
        super().__init__()
        self.first_layer = nn.Linear(10, 8)
        self.fc2 = nn.Linear(8, 5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.first_layer(x)))))


def _rename_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    return map_keys(dst_keys, [(r"first_layer\.(.+)", r"fc1.\1"), (r"fc2\.(.+)", r"fc2.\1"),
                                (r"fc3\..+", lambda m: ())])


def _deeper_mlp_truth(src_keys: Sequence[str], dst_keys: Sequence[str]) -> Truth:
    return map_keys(dst_keys, [(r"fc2\.(.+)", r"fc3.\1"), (r"fc1\.(.+)", r"fc1.\1")])



# --------------------------------------------------------------------------- the pairs

PAIRS: list[Pair] = [
    make_pair("mlp->mlp_identical", lambda: MLP(10, 8, 5, 2), lambda: MLP(10, 8, 5, 2), image_input(4, 10),
          identity_truth, exact=True, note="""
          Seed scenario 1: identical 10->8->5->2 MLPs; the truth is the identity mapping."""),
    make_pair("mlp->mlp_renamed_plus_fc3", lambda: MLP(10, 8, 5), RenamedMLP, image_input(4, 10),
          _rename_truth, exact=False, note="""
          Seed scenario 2: fc1 renamed first_layer and a new fc3 (5->3) appended. Truth:
          first_layer <- fc1, fc2 <- fc2; fc3 has no source and is absent from the truth. Not exact
          (the destination has an extra layer and 3 outputs)."""),
    make_pair("mlp3->mlp2", lambda: MLP(10, 8, 5, 2), lambda: MLP(10, 5, 2), image_input(4, 10),
          _deeper_mlp_truth, exact=False, note="""
          Seed scenario 3: 3-layer 10->8->5->2 into 2-layer 10->5->2. Truth: dst fc2 (5->2) <- src
          fc3 (5->2), which fits; dst fc1 (10->5) <- src fc1 (10->8), its counterpart (it reads the
          input), which does not fit: the issue asks for it to be reported as a shape mismatch
          and left unloaded."""),
]
