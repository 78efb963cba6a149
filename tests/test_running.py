"""Tests for archalign.running: how example inputs become arguments, and models run in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archalign.errors import RunError
from archalign.running import device_of, dummy_inputs, first_line, run_in_eval, split_inputs


class Probe(nn.Module):
    """Records the training flag and grad mode it ran with."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled()))
        return self.fc(x) * scale


def test_run_in_eval_runs_without_gradients_and_restores_every_flag() -> None:
    model = Probe().train()
    model.fc.eval()
    out = run_in_eval(model, torch.ones(1, 3))
    assert model.seen == [(False, False)]
    assert not out.requires_grad
    assert model.training and not model.fc.training


def test_run_in_eval_restores_flags_when_the_model_raises() -> None:
    model = Probe().train()
    with pytest.raises(RunError) as exc:  # also a RuntimeError, as the forward's error was
        run_in_eval(model, torch.ones(1, 7))
    assert isinstance(exc.value, RuntimeError) and isinstance(exc.value.__cause__, RuntimeError)
    assert str(exc.value).startswith("running Probe on the example inputs failed: RuntimeError: "
                                     "mat1 and mat2 shapes cannot be multiplied")
    assert model.training and model.fc.training


@pytest.mark.parametrize(("inputs", "args", "kwargs"), [
    (torch.ones(2), 1, set()),
    ((torch.ones(2), 3.0), 2, set()),
    ([torch.ones(2)], 1, set()),
    ({"x": torch.ones(2), "scale": 2.0}, 0, {"x", "scale"}),
    (7, 1, set()),
])
def test_split_inputs(inputs, args, kwargs) -> None:
    got_args, got_kwargs = split_inputs(inputs, torch.device("cpu"))
    assert len(got_args) == args and set(got_kwargs) == kwargs


def test_split_inputs_moves_only_tensors() -> None:
    args, kwargs = split_inputs({"x": torch.ones(2), "n": 3}, torch.device("meta"))
    assert kwargs["x"].device.type == "meta" and kwargs["n"] == 3 and args == ()


def test_dummy_inputs_are_a_mapping_of_tensors_or_nothing() -> None:
    model = Probe()
    assert dummy_inputs(model) is None
    model.dummy_inputs = {"x": torch.ones(1, 3)}  # type: ignore[assignment]
    assert set(dummy_inputs(model)) == {"x"}
    model.dummy_inputs = {"x": "text"}  # type: ignore[assignment]
    assert dummy_inputs(model) is None


def test_device_of_a_module_without_tensors_is_the_cpu() -> None:
    assert device_of(nn.ReLU()) == torch.device("cpu")
    with torch.device("meta"):
        assert device_of(nn.Linear(2, 2)).type == "meta"


def test_first_line_of_an_exception() -> None:
    assert first_line(ValueError("one\ntwo")) == "one"
    assert first_line(ValueError("")) == ""
    assert len(first_line(ValueError("x" * 500))) == 200


class AdaptsToItsInput(nn.Module):
    """Resizes itself to the last input it saw, as Hugging Face's Swin does with its windows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.window = 4

    def forward(self, x):
        if x.shape[-1] < self.window:
            self.window = x.shape[-1]
            self.fc = nn.Linear(self.window, self.window)
        return self.fc(x)


def test_running_a_model_leaves_its_attributes_as_they_were() -> None:
    model = AdaptsToItsInput()
    fc = model.fc
    run_in_eval(model, torch.ones(1, 2))
    assert model.window == 4 and model.fc is fc
    run_in_eval(model, torch.ones(1, 4))  # still takes what it took before
