"""`verify`: compare outputs of every form, and find the first diverging matched layer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import archalign
from archalign.verify import compare_outputs, output_leaves


class Chain(nn.Module):
    def __init__(self, out: str = "tensor") -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)
        self.out = out

    def forward(self, x: torch.Tensor) -> Any:
        h = self.a(x)
        y = self.c(torch.relu(self.b(torch.relu(h))))
        if self.out == "tuple":
            return (y, [h])
        if self.out == "dict":
            return {"logits": y, "hidden": h}
        return y


def _pair(out: str = "tensor") -> tuple[Chain, Chain]:
    torch.manual_seed(0)
    src = Chain(out)
    torch.manual_seed(1)
    dst = Chain(out)
    return src, dst


@pytest.mark.parametrize("out", ["tensor", "tuple", "dict"])
def test_outputs_of_every_form_agree_after_a_load(out: str) -> None:
    src, dst = _pair(out)
    x = torch.randn(3, 4)
    assert not archalign.verify(src, dst, x).ok
    report = archalign.align_and_load(src, dst, verify=x)
    assert report.verification is not None and report.verification.ok
    assert report.verification.outputs_compared == (1 if out == "tensor" else 2)
    assert report.verification.max_abs_diff == 0.0


def test_hugging_face_model_output_is_compared_by_field() -> None:
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.CausalLMOutput(logits=torch.ones(2, 3))
    assert [k for k, _ in output_leaves(out)] == ["logits"]
    diff, count, scale, problem = compare_outputs(out, {"logits": torch.ones(2, 3) * 1.5})
    assert (diff, count, scale, problem) == (0.5, 1, 1.0, "")


def test_first_divergence_names_the_layer_with_both_keys() -> None:
    src, dst = _pair()
    x = torch.randn(3, 4)
    plan = archalign.align(src, dst)
    plan.apply(dst)
    with torch.no_grad():
        dst.b.weight.add_(torch.randn_like(dst.b.weight))
    result = archalign.verify(src, dst, x, plan=plan)
    assert not result.ok
    assert result.first_divergence is not None
    assert (result.first_divergence.src, result.first_divergence.dst) == ("b", "b")
    assert "first diverging layer: b <- b" in str(result)


def test_shape_disagreement_is_reported_not_raised() -> None:
    result = archalign.verify(nn.Linear(4, 2), nn.Linear(4, 3), torch.randn(1, 4))
    assert not result.ok and result.max_abs_diff == float("inf")
    assert "output shapes differ: (1, 2) vs (1, 3)" in result.problem


def test_verify_restores_training_mode() -> None:
    src, dst = _pair()
    src.train()
    archalign.verify(src, dst, torch.randn(2, 4))
    assert src.training and dst.training


@pytest.mark.parametrize("bad", [None])
def test_verify_needs_inputs(bad: Any) -> None:
    src, dst = _pair()
    with pytest.raises(archalign.SourceError, match="example_inputs"):
        archalign.verify(src, dst, bad)


def test_verify_needs_modules() -> None:
    src, dst = _pair()
    with pytest.raises(archalign.SourceError, match=r"nn\.Module"):
        archalign.verify(src.state_dict(), dst, torch.randn(1, 4))  # type: ignore[arg-type]
