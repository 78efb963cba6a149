"""Seed scenario 2: ``fc1`` renamed to ``first_layer`` and a new ``fc3`` added.

``load_state_dict(strict=False)`` would silently skip ``first_layer``; archalign maps it, and
reports ``fc3`` as unmatched and left at its initialisation.
"""

import torch
from torch import nn

import archalign


class Old(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class New(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first_layer = nn.Linear(10, 8)
        self.fc2 = nn.Linear(8, 5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.first_layer(x)))))


def main() -> None:
    torch.manual_seed(0)
    src, dst = Old(), New()
    result = dst.load_state_dict(src.state_dict(), strict=False)
    print(f"load_state_dict(strict=False): missing={result.missing_keys}, "
          f"unexpected={result.unexpected_keys}\n")
    dst = New()
    report = archalign.align_and_load(src, dst)
    print(report)


if __name__ == "__main__":
    main()
