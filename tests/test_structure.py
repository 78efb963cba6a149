"""Tests for archalign.structure: a checkpoint file attached to its source module's structure."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import archalign
from archalign.errors import SourceError
from archalign.source import read_source
from archalign.structure import fit_keys


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norms and BatchNorm statistics away from identity: every norm differs from every other."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape,
                                                            generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape,
                                                          generator=generator))
    return model.eval()


def rows(plan: archalign.Plan) -> list[tuple[object, ...]]:
    return [(m.src, m.dst, m.ops, m.confidence) for m in plan.matches]


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_resnet18_file_on_its_meta_structure_plans_as_the_module(tmp_path: Path, prefix: str
                                                                   ) -> None:
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    src = trained_like(torchvision.models.resnet18(num_classes=10))
    torch.save({prefix + k: v for k, v in src.state_dict().items()}, tmp_path / "r18.pt")
    dst = timm.create_model("resnet18", num_classes=10)
    expected = archalign.align(src, dst)
    with torch.device("meta"):
        structure = torchvision.models.resnet18(num_classes=10)
    source = read_source(tmp_path / "r18.pt", structure=structure)
    assert source.module is structure and source.wrapper == prefix
    plan = archalign.align(source, dst)
    assert rows(plan) == rows(expected)
    assert plan.verification.startswith("outputs agree")  # the trial ran on the file's weights
    report = plan.apply(dst)
    assert not report.missing
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(src(x), dst.eval()(x))


def test_hugging_face_folder_on_its_meta_structure_reproduces_the_source(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=64,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    src = trained_like(transformers.BertForMaskedLM(config))
    src.save_pretrained(tmp_path)  # safetensors; the tied decoder weight left out
    dst = transformers.ElectraForMaskedLM(transformers.ElectraConfig(
        num_hidden_layers=2, hidden_size=32, embedding_size=32, num_attention_heads=4,
        intermediate_size=64, vocab_size=64, max_position_embeddings=32))
    expected = archalign.align(src, dst)
    with torch.device("meta"):
        structure = transformers.BertForMaskedLM(config)
    source = read_source(tmp_path, structure=structure)
    # the tie is kept, and BERT's non-persistent position_ids computed again off the meta device
    assert source.aliases["cls.predictions.decoder.weight"] == "bert.embeddings.word_embeddings.weight"
    assert torch.equal(structure.bert.embeddings.position_ids[0], torch.arange(32))
    plan = archalign.align(source, dst)
    assert rows(plan) == rows(expected)
    report = archalign.align_and_load(source, dst, verify={"input_ids": torch.arange(16)[None]})
    assert report.verification is not None and report.verification.ok


def test_keys_that_differ_beyond_a_prefix_are_refused_naming_both_sides(tmp_path: Path) -> None:
    torch.save({"enc.weight": torch.ones(3, 2), "enc.bias": torch.ones(3)}, tmp_path / "m.pt")
    with pytest.raises(SourceError, match=r"2 of the file's keys name no tensor of the module "
                                          r"\(enc.weight, enc.bias\) and 2 of the module's "
                                          r"tensors are not in the file \(weight, bias\)"):
        read_source(tmp_path / "m.pt", structure=nn.Linear(2, 3))


def test_a_shape_that_differs_is_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 4).state_dict(), tmp_path / "m.pt")
    with pytest.raises(SourceError, match=r"'weight' is \(4, 2\), the module's 'weight' is \(3, 2\)"):
        read_source(tmp_path / "m.pt", structure=nn.Linear(2, 3))


def test_the_module_side_may_carry_the_prefix() -> None:
    ties = {"model.weight": "model.weight", "model.bias": "model.bias"}
    fit = fit_keys(["weight", "bias"], ["model.weight", "model.bias"], ties, "here")
    assert fit.add == "model." and fit.renamed == {"model.weight": "weight", "model.bias": "bias"}


def test_an_averaged_model_copy_sets_its_count_aside(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    ema = torch.optim.swa_utils.AveragedModel(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    source = read_source(tmp_path / "ema.pt")
    assert source.set_aside == ("n_averaged",) and "n_averaged" not in source.specs
    assert source.wrapper == "module."
    with torch.device("meta"):
        structure = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    attached = read_source(tmp_path / "ema.pt", structure=structure)
    assert torch.equal(structure[0].weight, model[0].weight)
    assert attached.set_aside == ("n_averaged",)


def test_structure_needs_a_file_or_state_dict_and_a_module() -> None:
    with pytest.raises(SourceError, match="pass it alone"):
        read_source(nn.Linear(2, 2), structure=nn.Linear(2, 2))
    with pytest.raises(SourceError, match="got a str"):
        read_source({"weight": torch.ones(2, 2)}, structure="nn.Linear")  # type: ignore[arg-type]


def test_a_meta_buffer_no_one_computes_is_named(caplog: pytest.LogCaptureFixture) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("scale", torch.full((2,), 3.0), persistent=False)

    with torch.device("meta"):
        structure = Scaled()
    with caplog.at_level(logging.WARNING, logger="archalign"):
        read_source({"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}, structure=structure)
    assert "non-persistent buffers scale are on the meta device" in caplog.text
    assert structure.fc.weight.device.type == "cpu"


def test_a_leftover_no_module_loads_is_left_unused(tmp_path: Path) -> None:
    torch.manual_seed(2)
    src = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    torch.save({**src.state_dict(), "rope.freqs": torch.rand(2)}, tmp_path / "c.pt")
    with torch.device("meta"):
        structure = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    source = read_source(tmp_path / "c.pt", structure=structure)
    assert "rope.freqs" not in source.specs
    assert torch.equal(structure[1].bias, src[1].bias)
    torch.save({**src.state_dict(), "rope.scale": torch.rand(2)}, tmp_path / "d.pt")
    with pytest.raises(SourceError, match=r"name no tensor of the module \(rope.scale\)"):
        read_source(tmp_path / "d.pt", structure=structure)


def test_a_bfloat16_release_is_widened_exactly_to_the_structures_dtype(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    torch.save(src.state_dict(), tmp_path / "bf16.pt")
    with torch.device("meta"):
        structure = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    read_source(tmp_path / "bf16.pt", structure=structure)
    assert structure[0].weight.dtype == torch.float32
    assert torch.equal(structure[0].weight.to(torch.bfloat16), src[0].weight)
    with torch.device("meta"):
        narrow = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).to(torch.float16)
    torch.save(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).state_dict(), tmp_path / "f32.pt")
    read_source(tmp_path / "f32.pt", structure=narrow)
    assert narrow[0].weight.dtype == torch.float32  # never narrowed: the file's values as they are
