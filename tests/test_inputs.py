"""Tests for archalign.inputs: one input as each model takes it, or made from the models."""

from __future__ import annotations

import torch
from torch import nn

from archalign.inputs import BATCH, bind, make_inputs


class Positional(nn.Module):  # timm / torchvision: forward(x)
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class ByKeyword(nn.Module):  # Hugging Face: forward(pixel_values=None, ...) with main_input_name
    main_input_name = "pixel_values"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, output_attentions=None, pixel_values=None):
        return self.conv(pixel_values).mean((2, 3))


def test_bind_passes_one_input_the_way_each_model_takes_it() -> None:
    x = torch.randn(1, 3, 8, 8)
    bound = bind(Positional(), ByKeyword(), {"pixel_values": x})
    assert bound.src is x and bound.dst == {"pixel_values": x}
    bound = bind(ByKeyword(), Positional(), x)
    assert bound.src == {"pixel_values": x} and bound.dst is x
    assert bind(Positional(), Positional(), (x,)).src == (x,)


def test_images_are_made_for_convolutional_models() -> None:
    made, how = make_inputs(Positional(), ByKeyword())
    assert made is not None, how
    assert made.src.shape[:2] == (BATCH, 3)  # positional for one, keyword for the other
    assert set(made.dst) == {"pixel_values"}


def test_tokens_and_vectors_from_the_first_layer() -> None:
    embedding = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 2))
    made, how = make_inputs(embedding, nn.Sequential(nn.Embedding(40, 8), nn.Linear(8, 2)))
    assert made is not None and int(made.src.max()) < 40, how  # below both vocabularies
    mlp = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 2))
    made, how = make_inputs(mlp, mlp)
    assert made is not None and made.src.shape == (BATCH, 10), how


def test_declared_image_size_wins() -> None:
    class FixedGrid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image_size = 24
            self.proj = nn.Conv2d(3, 4, 8, stride=8)

        def forward(self, x):
            assert x.shape[-1] == 24, "this grid needs 24 pixels"
            return self.proj(x).flatten(1)

    made, how = make_inputs(FixedGrid(), FixedGrid())
    assert made is not None and made.src.shape == (BATCH, 3, 24, 24), how


def test_nothing_that_works_is_said_not_raised() -> None:
    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, needed):
            return self.fc(x) * needed

    made, how = make_inputs(Picky(), Picky())
    assert made is None and how.startswith("no input could be made")
