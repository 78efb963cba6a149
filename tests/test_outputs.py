"""Tests for archalign.outputs: a loaded destination saved in the form its library loads back,
and loaded back with that library's own loader (from_pretrained, timm's pretrained weights,
load_state_dict)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from archalign.errors import SourceError
from archalign.outputs import OutputKind, check_output, copy_config, output_kind, save_model
from archalign.source import read_source


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-like: every saved tensor moved away from its initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


def same_weights(a: nn.Module, b: nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for key, value in left.items():
        assert torch.equal(value, right[key]), key


# --------------------------------------------------------------------------- Hugging Face


def hf_model(name: str) -> nn.Module:
    pytest.importorskip("transformers")
    from corpus import get_pair

    if name == "mixtral":  # its class converts experts on load: saving must convert them back
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                               num_local_experts=3, num_experts_per_tok=2,
                               max_position_embeddings=32)
        return perturbed(MixtralForCausalLM(config))
    pair = get_pair({"gpt2": "hf_gpt2->hf_gpt_bigcode", "llama": "hf_llama->hf_phi3"}[name])
    return perturbed(pair.make_src())


@pytest.mark.parametrize(("name", "shard"), [("gpt2", None), ("llama", 40_000), ("mixtral", None)])
def test_a_hugging_face_folder_is_what_save_pretrained_writes(tmp_path: Path, name: str,
                                                              shard: int | None) -> None:
    model = hf_model(name)
    saved = save_model(model, tmp_path / "ours", **({"max_shard_bytes": shard} if shard else {}))
    assert saved.kind is OutputKind.HUGGING_FACE
    assert saved.load_with == f"{type(model).__name__}.from_pretrained({str(tmp_path / 'ours')!r})"
    model.save_pretrained(tmp_path / "theirs")
    ours = read_source(tmp_path / "ours")
    theirs = read_source(tmp_path / "theirs")
    assert sorted(ours.specs) == sorted(theirs.specs)  # ties left out, experts converted back
    for key in theirs.specs:
        assert torch.equal(ours.get(key), theirs.get(key)), key
    if shard:
        assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    loaded = type(model).from_pretrained(tmp_path / "ours").eval()
    same_weights(loaded, model)


def test_ties_are_left_out_and_restored_as_the_config_says(tmp_path: Path) -> None:
    gpt2 = hf_model("gpt2")  # tie_word_embeddings=True
    save_model(gpt2, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    loaded = type(gpt2).from_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    llama = hf_model("llama")  # tie_word_embeddings=False: both are weights of their own
    save_model(llama, tmp_path / "untied", max_shard_bytes=1 << 30)
    tensors = load_file(str(tmp_path / "untied" / "model.safetensors"))
    assert torch.equal(tensors["lm_head.weight"], llama.lm_head.weight.detach())
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_saving_leaves_the_model_and_its_config_as_they_were(tmp_path: Path) -> None:
    model = hf_model("llama")
    before = model.config.to_dict()
    save_model(model, tmp_path / "out")
    assert model.config.to_dict() == before
    assert (tmp_path / "out" / "generation_config.json").is_file()


# --------------------------------------------------------------------------- timm and plain


def test_a_timm_file_loads_as_its_pretrained_weights(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    kwargs = {"depths": (1, 1, 2, 1), "dims": (8, 16, 24, 32), "num_classes": 10}
    model = perturbed(timm.create_model("convnext_tiny", **kwargs))
    out = tmp_path / "convnext.safetensors"
    saved = save_model(model, out)
    assert saved.kind is OutputKind.FILE and saved.files == (out,)
    assert saved.load_with.startswith(
        f"timm.create_model('convnext_tiny', pretrained=True, pretrained_cfg_overlay=dict("
        f"file={str(out)!r}, num_classes=10))")
    loaded = timm.create_model("convnext_tiny", pretrained=True, **kwargs,
                               pretrained_cfg_overlay={"file": str(out), "num_classes": 10}).eval()
    same_weights(loaded, model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def test_a_file_holds_every_key_and_loads_strictly(tmp_path: Path) -> None:
    model = perturbed(Tied())
    saved = save_model(model, tmp_path / "tied.safetensors")
    assert saved.tensors == 2
    state = load_file(str(tmp_path / "tied.safetensors"))
    assert sorted(state) == ["embed.weight", "head.weight"]
    again = Tied()
    again.load_state_dict(state, strict=True)
    assert torch.equal(again.head.weight, model.head.weight) and again.head.weight is again.embed.weight
    assert saved.load_with == ("model.load_state_dict(safetensors.torch.load_file("
                               f"{str(tmp_path / 'tied.safetensors')!r}))")


def test_a_folder_of_any_model_reads_back_sharded(tmp_path: Path) -> None:
    model = perturbed(nn.Sequential(nn.Linear(30, 30), nn.Linear(30, 30), nn.Linear(30, 4)))
    seen: list[tuple[int, int]] = []
    saved = save_model(model, tmp_path / "out", max_shard_bytes=4000,
                       progress=lambda done, total: seen.append((done, total)))
    assert saved.kind is OutputKind.FOLDER and saved.files[-1].name == "model.safetensors.index.json"
    assert seen == [(n, 6) for n in range(1, 7)]
    back = read_source(tmp_path / "out")
    for key, value in model.state_dict().items():
        assert torch.equal(back.get(key), value)


def test_what_cannot_be_saved_is_refused(tmp_path: Path) -> None:
    with torch.device("meta"):
        ghost = nn.Linear(2, 2)
    with pytest.raises(SourceError, match="2 tensors of Linear are on the meta device"):
        save_model(ghost, tmp_path / "x.safetensors")
    with pytest.raises(SourceError, match=r"saves an nn\.Module"):
        save_model({"w": torch.zeros(1)}, tmp_path / "x.safetensors")  # type: ignore[arg-type]
    assert output_kind(nn.Linear(1, 1), tmp_path / "a.safetensors") is OutputKind.FILE


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.safetensors").mkdir()
    for path, code, says in ((tmp_path / "no" / "out", errno.ENOENT, "folder does not exist"),
                             (tmp_path / "file", errno.ENOTDIR, "a folder is needed"),
                             (tmp_path / "folder.safetensors", errno.EISDIR, "is a folder")):
        with pytest.raises(OSError) as exc:
            check_output(path)
        assert exc.value.errno == code and says in str(exc.value)
    check_output(tmp_path / "new")  # a folder to be created
    check_output(tmp_path / "new.safetensors")


def test_a_config_is_copied_only_if_it_is_one(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    (tmp_path / "generation_config.json").write_text("{}")
    (tmp_path / "out").mkdir()
    assert copy_config(tmp_path / "config.json", tmp_path / "out") == tmp_path / "out" / "config.json"
    assert (tmp_path / "out" / "generation_config.json").is_file()
    (tmp_path / "plan.json").write_text('{"archalign_plan": 1}')
    with pytest.raises(SourceError, match="not a Hugging Face config"):
        copy_config(tmp_path / "plan.json", tmp_path / "out")
