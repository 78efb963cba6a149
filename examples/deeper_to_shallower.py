"""Seed scenario 3: a 3-layer MLP (10->8->5->2) into a 2-layer one (10->5->2).

A hand-written ``load_state_dict`` crashes with "size mismatch". archalign loads the last layer,
which fits exactly, and reports the first layer as a shape mismatch it did not load.
"""

import itertools

import torch
from torch import nn

import archalign


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def main() -> None:
    torch.manual_seed(0)
    src, dst = mlp(10, 8, 5, 2), mlp(10, 5, 2)
    try:
        dst.load_state_dict(src.state_dict())
    except RuntimeError as exc:
        print("load_state_dict:", str(exc).splitlines()[0], "...\n")
    plan = archalign.align(src, dst)
    print(plan, "\n")
    print(plan.apply(dst))


if __name__ == "__main__":
    main()
