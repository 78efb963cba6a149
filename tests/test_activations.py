"""Tests for archalign.activations: recording what layers saw, and comparing across layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archalign.activations import first_tensor, informative, record_activations, same


def test_same_across_the_layouts_implementations_differ_by() -> None:
    torch.manual_seed(0)
    nchw = torch.randn(2, 8, 3, 3)
    tokens = nchw.flatten(2).transpose(1, 2)  # (N, HW, C), as timm's patch embedding gives
    assert same(nchw, tokens) is True
    seq_first = torch.randn(5, 2, 8)  # (L, N, D) as nn.MultiheadAttention without batch_first
    assert same(seq_first, seq_first.transpose(0, 1)) is True
    assert same(torch.randn(4, 1, 1), torch.randn(4)) is False
    x = torch.randn(4, 1, 1)
    assert same(x, x.reshape(4)) is True


def test_same_is_not_fooled_by_permuted_values() -> None:
    torch.manual_seed(0)
    a = torch.randn(2, 6)
    assert same(a, a[:, torch.tensor([1, 0, 2, 3, 4, 5])]) is False  # features permuted
    assert same(a, a + 1e-2 * a.abs().max()) is False
    assert same(a, a * (1 + 1e-5)) is True


@pytest.mark.parametrize(("a", "b"), [
    (None, torch.ones(2)), (torch.ones(0), torch.ones(0)),
    (torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))])
def test_same_is_none_when_nothing_can_be_compared(a, b) -> None:
    assert same(a, b) is None


def test_activations_of_other_sizes_are_different() -> None:
    assert same(torch.ones(2), torch.ones(3)) is False  # a wrong counterpart, not "unknown"


def test_informative() -> None:
    torch.manual_seed(0)
    assert informative(torch.randn(2, 5), batch=2)
    assert not informative(torch.zeros(2, 5), batch=2)
    assert not informative(torch.full((2, 5), 3.0))
    ignores_input = torch.randn(1, 5).expand(2, 5)  # a zero head's output plus its bias
    assert informative(ignores_input) and not informative(ignores_input, batch=2)
    assert not informative(None)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        h = self.fc(x)
        h += 1  # in place: a recording must not follow it
        return self.fc(self.norm(h))


def test_record_keeps_the_first_call_cloned_and_cleans_up() -> None:
    torch.manual_seed(0)
    model = Twice().train()
    x = torch.randn(2, 3)
    got = record_activations(model, x, ["fc", "norm", "missing"])
    assert got.order == ("fc", "norm")
    assert got.layers["fc"].calls == 2
    assert torch.equal(got.layers["fc"].input, x)
    assert torch.equal(got.layers["fc"].output, model.fc(x).detach())  # before the += 1
    assert model.training and not model.fc._forward_hooks


def test_first_tensor() -> None:
    t = torch.ones(1)
    assert first_tensor(({"a": "x", "b": [t]}, 3)) is t
    assert first_tensor("x") is None
