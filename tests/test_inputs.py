"""Tests for archalign.inputs: one input as each model takes it, or made from the models."""

from __future__ import annotations

import pytest
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


def _tiny(config_class, model_class, **config):
    torch.manual_seed(0)
    return model_class(config_class(**config))


_SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _hf_cases():
    transformers = pytest.importorskip("transformers")
    return {
        "CLIPModel": (lambda: _tiny(
            transformers.CLIPConfig, transformers.CLIPModel, projection_dim=16,
            text_config=dict(_SMALL, vocab_size=100, max_position_embeddings=16),
            vision_config=dict(_SMALL, image_size=32, patch_size=8)),
            {"input_ids", "pixel_values"}),
        "WhisperModel": (lambda: _tiny(
            transformers.WhisperConfig, transformers.WhisperModel, d_model=32, encoder_layers=1,
            decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
            max_target_positions=16, vocab_size=100, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=1),
            {"input_features", "decoder_input_ids"}),
        "Wav2Vec2Model": (lambda: _tiny(
            transformers.Wav2Vec2Config, transformers.Wav2Vec2Model, **_SMALL, conv_dim=(8, 8),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
            {"input_values"}),
    }


@pytest.mark.parametrize("name", ["CLIPModel", "WhisperModel", "Wav2Vec2Model"])
def test_hugging_face_inputs_are_made_from_the_config(name: str) -> None:
    build, expected = _hf_cases()[name]
    src, dst = build(), build()
    made, how = make_inputs(src, dst)
    assert made is not None, how
    assert set(made.src) == expected and set(made.dst) == expected, how
    with torch.no_grad():
        src.eval()(**made.src)  # the made input runs the model
    if "input_ids" in expected:
        assert int(made.src["input_ids"].max()) < 100
