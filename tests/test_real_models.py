"""Real architectures written by others, judged by outputs after `align_and_load`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import archalign

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def _resnet18() -> tuple[nn.Module, nn.Module, Any]:
    torch.manual_seed(0)
    src = _randomise_bn(torchvision.models.resnet18(num_classes=10), 0)
    torch.manual_seed(1)
    dst = timm.create_model("resnet18", num_classes=10).eval()
    return src, dst, torch.randn(2, 3, 64, 64)


def _vit() -> tuple[nn.Module, nn.Module, Any]:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    src = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=4,
                            hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    nn.init.normal_(src.heads.head.weight, std=0.2)  # torchvision zero-initialises the head
    nn.init.normal_(src.heads.head.bias, std=0.2)
    torch.manual_seed(1)
    dst = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
        num_classes=10, global_pool="token").eval()
    return src, dst, torch.randn(2, 3, 32, 32)


def _llama_mistral() -> tuple[nn.Module, nn.Module, Any]:
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    src = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    torch.manual_seed(1)
    dst = transformers.MistralForCausalLM(
        transformers.MistralConfig(**kw, sliding_window=None)).eval()
    return src, dst, {"input_ids": torch.randint(0, 128, (2, 7))}


def _outputs(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


PAIRS: dict[str, Callable[[], tuple[nn.Module, nn.Module, Any]]] = {
    "tv_resnet18->timm_resnet18": _resnet18,
    "tv_vit->timm_vit": _vit,
    "hf_llama->hf_mistral": _llama_mistral,
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_real_pair_reproduces_source_outputs(name: str) -> None:
    src, dst, inputs = PAIRS[name]()
    assert not torch.allclose(_outputs(src, inputs), _outputs(dst, inputs))
    report = archalign.align_and_load(src, dst, strict=True)
    assert report.complete and not report.unexpected
    torch.testing.assert_close(_outputs(dst, inputs), _outputs(src, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_real_pair_confidences_are_high_when_the_port_is_exact(name: str) -> None:
    src, dst, _ = PAIRS[name]()
    plan = archalign.align(src, dst)
    assert min(m.confidence for m in plan.matches) >= 0.75, str(plan)


def test_vit_names_differ_everywhere_yet_every_tensor_is_placed() -> None:
    src, dst, _ = _vit()
    plan = archalign.align(src, dst)
    mapping = plan.mapping()
    assert mapping["cls_token"] == "class_token"
    assert mapping["pos_embed"] == "encoder.pos_embedding"
    assert mapping["patch_embed.proj.weight"] == "conv_proj.weight"
    assert mapping["blocks.2.attn.qkv.weight"] == (
        "encoder.layers.encoder_layer_2.self_attention.in_proj_weight")
    assert mapping["blocks.3.mlp.fc2.bias"] == "encoder.layers.encoder_layer_3.mlp.3.bias"
    assert plan.src_tracer == plan.dst_tracer == "fx"


def test_untraceable_hf_models_fall_back_to_hooks() -> None:
    src, dst, _ = _llama_mistral()
    plan = archalign.align(src, dst)
    assert plan.src_tracer == plan.dst_tracer == "hooks"


def test_checkpoint_file_source_is_recovered(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    src, dst, inputs = _resnet18()
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    report = archalign.align_and_load(path, dst, strict=True)
    assert report.complete
    torch.testing.assert_close(_outputs(dst, inputs), _outputs(src, inputs), rtol=1e-4, atol=1e-5)
