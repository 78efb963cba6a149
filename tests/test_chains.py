"""Tests for archalign.chains: the orders of a module's children that keep numbered siblings in order."""

from __future__ import annotations

import pytest

from archalign.chains import Chains
from archalign.graph import natural_key


@pytest.mark.parametrize("names", [
    ["norm2", "attn", "norm1", "mlp"],
    ["conv3", "bn1", "conv1", "bn3", "bn2", "conv2"],
    ["2", "10", "1"],
])
def test_arrangements_keep_numbered_siblings_in_order(names):
    seen = [tuple(a) for a in Chains.of(names).arrangements()]
    assert len(seen) == Chains.of(names).count()
    assert len(seen) == len(set(seen))  # each once
    for order in seen:
        assert sorted(order) == sorted(names)
        for stem in ("norm", "conv", "bn", ""):
            numbered = [n for n in order if n.rstrip("0123456789") == stem and n != stem]
            assert numbered == sorted(numbered, key=natural_key)


def test_arrangement_counts():
    assert Chains.of(["norm2", "attn", "norm1", "mlp"]).count() == 12  # 4! / 2!
    assert Chains.of([str(i) for i in range(12)]).count() == 1  # blocks: index order
    assert Chains.of(["q", "k", "v", "proj", "fc1", "fc2", "norm1", "norm2"]).count() == 10080


def test_numbered_layers_chain_only_with_equal_ones():
    """Meta's feed-forward: w1 and w3 (gate, up; equal) chain, w2 (down, another shape) is free."""
    shapes = {"w1": (8, 4), "w2": (4, 8), "w3": (8, 4)}
    chains = Chains.of(["w1", "w2", "w3"], shapes.__getitem__)
    assert chains.count() == 3  # 3! / 2!: w1 before w3, w2 anywhere
    assert all(a.index("w1") < a.index("w3") for a in chains.arrangements())
    assert next(chains.arrangements()) == ["w1", "w2", "w3"]  # the checkpoint's order first
