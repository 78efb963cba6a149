"""Tests for archalign.checkpoint: safetensors files, sharded indexes, folders and pickle files."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from archalign.errors import SourceError
from archalign.source import TensorSpec, read_source
from tests.models import write_sharded


class Tied(nn.Module):
    """An embedding and an output head sharing one Parameter (GPT-2 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def small_state_dict() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict()


def test_tied_pt_file_keeps_the_alias(tmp_path):
    path = tmp_path / "tied.pt"
    torch.save(Tied().state_dict(), path)
    source = read_source(path)
    assert list(source.specs) == ["emb.weight"]
    assert source.aliases == {"head.weight": "emb.weight"}


def test_read_safetensors_file(tmp_path):
    state = small_state_dict()
    path = tmp_path / "w.safetensors"
    save_file(dict(state), str(path))
    source = read_source(path)
    assert source.description == "source file w.safetensors"
    # a .safetensors file stores its keys sorted: the order says nothing about the structure
    assert sorted(source.specs) == sorted(state)
    assert source.ordered is False
    assert {k: s.shape for k, s in source.specs.items()} == {k: tuple(v.shape) for k, v in state.items()}
    for key, tensor in state.items():
        assert torch.equal(source.get(key), tensor)
    assert source.module is None


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_read_pickle_file(tmp_path, suffix):
    state = small_state_dict()
    path = tmp_path / f"w{suffix}"
    torch.save(state, path)
    source = read_source(str(path), role="destination")
    assert source.description == f"destination file w{suffix}"
    assert list(source.specs) == list(state)
    for key, tensor in state.items():
        assert torch.equal(source.get(key), tensor)


def test_modules_and_pickle_files_are_ordered(tmp_path):
    assert read_source(nn.Linear(2, 2)).ordered is True
    path = tmp_path / "w.pt"
    torch.save(small_state_dict(), path)
    assert read_source(path).ordered is True


def test_read_training_checkpoint_unwraps_state_dict(tmp_path):
    state = small_state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    source = read_source(path)
    assert list(source.specs) == list(state)


def _write_garbage(path):
    path.write_bytes(b"this is not a checkpoint")
    return path


def _write_tensor(path):
    torch.save(torch.zeros(3), path)
    return path


def _write_module(path):
    torch.save(nn.Linear(2, 2), path)  # a pickled module: weights_only refuses it
    return path


def _write_npz(path):
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("name", "writer", "message"),
    [
        ("missing.pt", None, "does not exist"),
        ("w\0.pt", None, "holds a NUL character"),
        ("w.npz", _write_npz, "unknown suffix '.npz'"),
        ("w.safetensors", _write_garbage, "cannot read the source file"),
        ("w.pt", _write_garbage, "torch.load(weights_only=True)"),
        ("w.pt", _write_module, "never unpickles code"),
        ("w.pt", _write_tensor, "holds a Tensor, not a state_dict"),
    ],
)
def test_bad_files_raise_source_error(tmp_path, name, writer, message):
    path = tmp_path / name
    if writer is not None:
        writer(path)
    with pytest.raises(SourceError) as info:
        read_source(path)
    assert message in str(info.value)


def test_sharded_checkpoint_reads_headers_and_loads_lazily(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    index = write_sharded(model, tmp_path, per_shard=3)
    for where in (index, tmp_path):  # the index, or the folder holding it
        source = read_source(where)
        assert set(source.specs) == set(model.state_dict())
        assert source.specs["1.running_var"] == TensorSpec("1.running_var", (8,), torch.float32)
        assert source.ordered is False
        assert torch.equal(source.get("2.weight"), model[2].weight)


def test_a_broken_index_names_the_missing_shard(tmp_path: Path) -> None:
    index = write_sharded(nn.Linear(2, 2), tmp_path, per_shard=1)
    (tmp_path / "model-00001.safetensors").unlink()
    with pytest.raises(SourceError, match="missing shards"):
        read_source(index)
    index.write_text("{not json")
    with pytest.raises(SourceError, match="cannot read"):
        read_source(index)


def test_reading_keeps_one_file_open_between_reads(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import safetensors

    import archalign.checkpoint as checkpoint_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    index = write_sharded(model, tmp_path, per_shard=3)  # 3 files
    opened: list[str] = []
    real = safetensors.safe_open

    def counting(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    source = read_source(index)
    opened.clear()
    keys = list(model.state_dict())
    for key in keys:
        source.get(key)
    assert len(opened) == len(keys)  # outside `reading`: a file opened per tensor
    opened.clear()
    with source.reading():
        for key in keys:
            assert torch.equal(source.get(key), model.state_dict()[key])
    assert opened == ["model-00000.safetensors", "model-00001.safetensors",
                      "model-00002.safetensors"]
    assert source._tensors._handle is None  # closed at the end of the block
    opened.clear()
    monkeypatch.setattr(checkpoint_module, "_REOPEN_BYTES", 1)  # reopened after every read
    with source.reading():
        for key in keys:
            source.get(key)
    assert len(opened) == len(keys)
    with read_source(model).reading():  # an in-memory source: nothing to open
        pass


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors",
                                  "sub/../../outside.safetensors", "C:\\outside.safetensors",
                                  "..\\outside.safetensors", ""])
def test_an_index_naming_a_file_outside_its_folder_is_refused(tmp_path: Path, name: str) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(SourceError, match=r"outside|not the name of a \.safetensors"):
        read_source(folder)


def test_a_shard_that_links_outside_the_folder_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "secret.safetensors"))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model-1.safetensors").symlink_to(tmp_path / "secret.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(SourceError, match=r"a link to .*secret\.safetensors.* outside the folder"):
        read_source(folder)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(SourceError, match="outside the folder"):  # the folder's single file too
        read_source(folder)
    assert read_source(folder / "model-1.safetensors").specs  # named itself: the user chose it


def test_a_hugging_face_cache_snapshot_reads_its_blobs(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    index = write_sharded(nn.Linear(2, 2), repo / "blobs", per_shard=1)
    for blob in sorted((repo / "blobs").iterdir()):
        (snapshot / blob.name).symlink_to(Path("../../blobs") / blob.name)
    assert index.exists()
    assert set(read_source(snapshot).specs) == {"weight", "bias"}


def test_a_folder_holding_one_shard_without_its_index_is_not_a_checkpoint(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "model-00002-of-00003.safetensors"))
    with pytest.raises(SourceError, match="one shard of 3, and no index"):
        read_source(tmp_path)
    (tmp_path / "model-00002-of-00003.safetensors").rename(tmp_path / ".archalign-shard.safetensors")
    with pytest.raises(SourceError, match="0 safetensors indexes, 0 safetensors files and 0 pickle"):
        read_source(tmp_path)  # hidden files (leftovers) are not read


@pytest.mark.parametrize("text", ['{"weight_map": ' * 50_000 + "{}" + "}" * 50_000,
                                  b'{"weight_map": {"w": "\xff.safetensors"}}', "[1]",
                                  '{"weight_map": {}}', '{"weight_map": {"w": 1}}',
                                  '{"weight_map": {"w": "config.json"}}'])
def test_a_tampered_index_is_a_source_error(tmp_path: Path, text: str | bytes) -> None:
    index = tmp_path / "model.safetensors.index.json"
    if isinstance(text, bytes):
        index.write_bytes(text)
    else:
        index.write_text(text)
    with pytest.raises(SourceError):
        read_source(index)


def test_an_old_format_pickle_is_read_without_mmap(tmp_path: Path) -> None:
    state = small_state_dict()
    path = tmp_path / "old.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    source = read_source(path)
    assert all(torch.equal(source.get(k), v) for k, v in state.items())


def test_an_entry_of_a_training_checkpoint_is_picked(tmp_path: Path) -> None:
    state = small_state_dict()
    path = tmp_path / "last.ckpt"
    torch.save({"model": state, "model_ema": state, "optimizer": {"state": {}}, "epoch": 4}, path)
    with pytest.raises(SourceError) as exc:
        read_source(path)
    assert str(exc.value) == (
        f"the source file {str(path)!r} is a training checkpoint, not a state_dict: its entries "
        "are 'model' (4 tensors), 'model_ema' (4 tensors), 'optimizer' (no tensors), 'epoch' "
        "(int); pick the entry that holds the weights: entry='model' (command line: --entry "
        "model); 'model_ema' holds weights too (an EMA copy?): pick the one to port")
    picked = read_source(path, entry="model_ema")
    assert list(picked.specs) == list(state) and picked.ordered
    assert torch.equal(picked.get("0.weight"), state["0.weight"])
    with pytest.raises(SourceError, match="has no entry 'ema'"):
        read_source(path, entry="ema")
    torch.save(state, tmp_path / "plain.pt")
    with pytest.raises(SourceError, match=r"no entry 'model'; its entries: '0\.weight' \(Tensor\)"):
        read_source(tmp_path / "plain.pt", entry="model")
    save_file(dict(state), str(tmp_path / "m.safetensors"))
    with pytest.raises(SourceError, match="safetensors files hold tensors only"):
        read_source(tmp_path / "m.safetensors", entry="model")


def _write_pickle_shards(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """A Hugging Face sharded pickle checkpoint: two ``pytorch_model-0000k-of-00002.bin`` and
    ``pytorch_model.bin.index.json`` (its weight_map sorted by key, as transformers writes it)."""
    keys = list(state)
    names = {k: f"pytorch_model-0000{1 + (i >= len(keys) // 2)}-of-00002.bin"
             for i, k in enumerate(keys)}
    for name in sorted(set(names.values())):
        torch.save({k: state[k] for k in keys if names[k] == name}, folder / name)
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(names.items()))}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return names


def test_a_sharded_pickle_checkpoint_is_read_from_its_index(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).state_dict()
    _write_pickle_shards(tmp_path, dict(state))
    source = read_source(tmp_path)  # the folder: its index
    assert list(source.specs) == list(state)  # shard order, each shard's saved order
    assert source.ordered
    assert all(torch.equal(source.get(k), v) for k, v in state.items())
    assert read_source(tmp_path / "pytorch_model.bin.index.json").description == (
        "source checkpoint pytorch_model.bin.index.json")


def test_a_pickle_shard_lacking_its_indexed_keys_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = dict(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).state_dict())
    names = _write_pickle_shards(tmp_path, state)
    second = names["1.weight"]
    torch.save({"1.bias": state["1.bias"]}, tmp_path / second)
    with pytest.raises(SourceError, match=rf"{second}' lacks 1 keys its index "
                                          r"pytorch_model.bin.index.json puts there \(1.weight\)"):
        read_source(tmp_path)


def test_a_training_checkpoint_with_a_tensor_at_its_top_still_names_its_entries(tmp_path: Path
                                                                                ) -> None:
    path = tmp_path / "ckpt.pt"  # nanoGPT's: the model's state, and the best loss as a tensor
    torch.save({"model": small_state_dict(), "best_val_loss": torch.tensor(1.47), "iter_num": 5},
               path)
    with pytest.raises(SourceError, match=r"is a training checkpoint.*entry='model'"):
        read_source(path)
