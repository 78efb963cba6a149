"""Seed scenario 1: identical architectures give the identity mapping, every confidence high."""

import torch
from torch import nn

import archalign


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 8)
        self.fc2 = nn.Linear(8, 5)
        self.fc3 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def main() -> None:
    torch.manual_seed(0)
    src, dst = MLP(), MLP()
    plan = archalign.align(src, dst)
    print(plan)
    assert all(m.src == m.dst for m in plan.matches), "expected the identity mapping"
    print(plan.apply(dst))
    x = torch.randn(4, 10)
    print("outputs identical:", torch.equal(src(x), dst(x)))


if __name__ == "__main__":
    main()
