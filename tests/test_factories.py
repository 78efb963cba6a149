"""Tests for archalign.factories: models, sources and inputs built from command-line arguments,
and the one-line errors that say what each one needs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from archalign.errors import SourceError
from archalign.factories import build_model, import_paths, load_source, parse_input
from archalign.source import TensorSource


def test_a_factory_with_literal_arguments() -> None:
    model = build_model("torch.nn:Linear(3, 2, bias=False)")
    assert isinstance(model, torch.nn.Linear) and model.bias is None and not model.training


@pytest.mark.parametrize(("spec", "says"), [
    ("torch.nn", "not 'module:callable'"),
    ("torch.nn:Linear(x)", "must be Python literals"),
    ("torch.nn:Lineer", "'torch.nn' has no 'Lineer'; did you mean Linear"),
    ("torch.nn:Linear", "missing 2 required positional arguments"),
    ("torch:tensor(1)", "built a Tensor, not an nn.Module"),
    ("torch.nn.modules:__name__", "is not callable"),
    ("no_such_pkg.mod:f", "cannot import 'no_such_pkg.mod'"),
    ("weights/model.safetensors", "no such file or folder"),
])
def test_what_a_bad_factory_says(spec: str, says: str) -> None:
    with pytest.raises(SourceError) as exc:
        build_model(spec)
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_a_typo_in_a_timm_name_lists_the_close_names() -> None:
    pytest.importorskip("timm")
    with pytest.raises(SourceError, match="similar name: resnet18"):
        build_model("timm:create_model('resnet1888')")


def test_a_checkpoint_is_not_a_destination(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(SourceError, match="is a checkpoint, not a model"):
        build_model(str(path))


def test_a_source_checkpoint_is_read_at_once_and_entries_are_picked(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.ones(2)}, "optimizer": {"step": 3}}, path)
    with pytest.raises(SourceError, match=r"training checkpoint.*--entry model"):
        load_source(str(path))
    source = load_source(str(path), entry="model")
    assert isinstance(source, TensorSource) and list(source.specs) == ["w"]
    with pytest.raises(SourceError, match="has no entry 'ema'; its entries: 'model' "
                                          r"\(1 tensors\), 'optimizer' \(no tensors\)"):
        load_source(str(path), entry="ema")
    with pytest.raises(SourceError, match=r"the source 'torch\.nn:Linear\(2, 2\)' is a factory"):
        load_source("torch.nn:Linear(2, 2)", entry="model")


def test_modules_in_the_working_directory_need_import_path(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "localnet_for_test.py").write_text(
        "import torch\nNet = lambda: torch.nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(SourceError, match=r"localnet_for_test.py is in the current directory.*"
                                          "pass --import-path . to allow it"):
        build_model("localnet_for_test:Net")
    before = list(sys.path)
    with import_paths(["."]):
        assert isinstance(build_model("localnet_for_test:Net"), torch.nn.Linear)
    assert sys.path == before
    with pytest.raises(SourceError, match="is not a folder"), import_paths(["nowhere"]):
        pass
    sys.modules.pop("localnet_for_test", None)


def test_parse_input() -> None:
    assert parse_input("randn:2,3", torch.nn.Linear(3, 3)).shape == (2, 3)
    ids = parse_input("ids:2,5", torch.nn.Linear(3, 3))
    assert ids["input_ids"].shape == (2, 5) and int(ids["input_ids"].max()) < 100
    for bad, says in (("zeros:2", "use 'randn:SHAPE'"), ("randn:a,b", "must be integers"),
                      ("randn:", "positive sizes"), ("randn:0,3", "positive sizes")):
        with pytest.raises(SourceError, match=says):
            parse_input(bad, torch.nn.Linear(3, 3))


# --------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    pytest.importorskip("transformers")
    from corpus import get_pair

    model = get_pair("hf_llama->hf_mistral").make_src()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder / "with_weights")
    model.config.save_pretrained(folder / "config_only")
    return model, folder


def test_a_hugging_face_folder_with_weights_is_loaded(llama) -> None:  # type: ignore[no-untyped-def]
    model, folder = llama
    for spec in (str(folder / "with_weights"),
                 f"transformers:LlamaForCausalLM('{folder / 'with_weights'}')"):
        built = load_source(spec)
        assert type(built).__name__ == "LlamaForCausalLM"
        for key, value in model.state_dict().items():
            assert torch.equal(built.state_dict()[key], value), key


def test_a_config_gives_the_structure_and_a_class_can_be_named(llama) -> None:  # type: ignore[no-untyped-def]
    model, folder = llama
    for spec in (str(folder / "config_only"), str(folder / "config_only" / "config.json"),
                 f"transformers:LlamaModel('{folder / 'config_only'}')"):
        built = build_model(spec)
        expected = "LlamaModel" if spec.startswith("transformers:") else "LlamaForCausalLM"
        assert type(built).__name__ == expected
        shapes = {k: v.shape for k, v in built.state_dict().items()}
        reference = model.state_dict() if expected != "LlamaModel" else model.model.state_dict()
        assert shapes == {k: v.shape for k, v in reference.items()}
    with pytest.raises(SourceError, match="is neither a Hugging Face model's folder"):
        build_model(f"transformers:LlamaModel('{folder}')")


def test_a_config_without_architectures_lists_the_classes(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(SourceError, match=r"name the class with it: \"transformers:GPT2LMHeadModel"
                                          r".*the classes of gpt2: .*GPT2Model"):
        build_model(str(tmp_path))


def test_a_hugging_face_class_without_config_says_what_it_needs() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(SourceError, match=r"A Hugging Face model is built from its config: give the "
                                          r"model's folder or its config\.json"):
        build_model("transformers:LlamaForCausalLM")
