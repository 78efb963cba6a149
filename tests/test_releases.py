"""Tests for archalign.releases: folders of numbered pickles (tensor-parallel ranks, disjoint parts)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import archalign
import corpus
from archalign.checkpoint import read_checkpoint
from archalign.errors import SourceError
from archalign.releases import META_MODEL_PARALLEL, TensorParallelTensors
from archalign.source import read_source

DIM, HIDDEN, VOCAB = 8, 12, 10
# the axis Meta's model-parallel layers split each key on (None: replicated)
AXES = {"tok_embeddings.weight": 1, "layers.0.attention.wq.weight": 0,
        "layers.0.attention.wk.weight": 0, "layers.0.attention.wv.weight": 0,
        "layers.0.attention.wo.weight": 1, "layers.0.feed_forward.w1.weight": 0,
        "layers.0.feed_forward.w2.weight": 1, "layers.0.feed_forward.w3.weight": 0,
        "layers.0.attention_norm.weight": None, "layers.0.ffn_norm.weight": None,
        "norm.weight": None, "output.weight": 0, "rope.freqs": None}


def trained_llama_state() -> dict[str, torch.Tensor]:
    """A tiny LLaMA state in Meta's names, trained-like: no two tensors alike, norms off one."""
    generator = torch.Generator().manual_seed(3)
    shapes = {"tok_embeddings.weight": (VOCAB, DIM), "layers.0.feed_forward.w1.weight": (HIDDEN, DIM),
              "layers.0.feed_forward.w2.weight": (DIM, HIDDEN),
              "layers.0.feed_forward.w3.weight": (HIDDEN, DIM), "output.weight": (VOCAB, DIM),
              "rope.freqs": (DIM // 4,)}
    state = {}
    for key, axis in AXES.items():
        shape = shapes.get(key, (DIM, DIM) if axis is not None else (DIM,))
        state[key] = torch.randn(shape, generator=generator)
        if key.endswith("norm.weight"):
            state[key] = 1 + 0.3 * state[key]
    return state


def write_ranks(folder: Path, state: dict[str, torch.Tensor], ranks: int = 2,
                axes: dict[str, int | None] | None = None, suffix: str = ".pth") -> None:
    axes = AXES if axes is None else axes
    for rank in range(ranks):
        shard = {k: (v.clone() if axes.get(k) is None else v.chunk(ranks, axes[k])[rank].clone())
                 for k, v in state.items()}
        torch.save(shard, folder / f"consolidated.{rank:02d}{suffix}")
    (folder / "params.json").write_text(json.dumps({"dim": DIM, "n_heads": 2, "n_layers": 1}))


@pytest.mark.parametrize("ranks", [2, 4])
def test_tensor_parallel_ranks_merge_along_each_layers_split_axis(tmp_path: Path, ranks: int
                                                                  ) -> None:
    state = trained_llama_state()
    write_ranks(tmp_path, state, ranks)
    source = read_source(tmp_path)
    # the saving model's order, less the rotary frequencies it computes (set aside)
    assert list(source.specs) == [k for k in state if k != "rope.freqs"]
    assert source.set_aside == ("rope.freqs",)
    assert source.ordered
    for key, tensor in ((k, v) for k, v in state.items() if k != "rope.freqs"):
        assert source.specs[key].shape == tuple(tensor.shape)
        # square wq (rows) and wo (columns) merged the other way would differ here
        assert torch.equal(source.get(key), tensor), key
    assert f"{ranks} ranks" in source.description and "RowParallelLinear" in source.description


def test_the_merge_names_its_reason_per_key(tmp_path: Path) -> None:
    write_ranks(tmp_path, trained_llama_state())
    tensors = read_checkpoint(tmp_path, "source").tensors
    assert isinstance(tensors, TensorParallelTensors)
    merges = tensors.merges
    assert merges["layers.0.attention.wo.weight"].axis == 1
    assert merges["layers.0.attention.wo.weight"].reason.startswith("RowParallelLinear")
    assert merges["output.weight"].reason.startswith("ColumnParallelLinear")
    assert merges["norm.weight"].axis is None and "replicated" in merges["norm.weight"].reason
    assert [m.axis for m in merges.values()] == list(AXES.values())
    assert {r.layer for r in META_MODEL_PARALLEL} == {"ColumnParallelLinear", "RowParallelLinear",
                                                      "ParallelEmbedding"}


def test_llama3_splits_the_embedding_rows_told_by_the_models_width(tmp_path: Path) -> None:
    state = trained_llama_state()
    write_ranks(tmp_path, state, axes={**AXES, "tok_embeddings.weight": 0})
    source = read_source(tmp_path)
    assert torch.equal(source.get("tok_embeddings.weight"), state["tok_embeddings.weight"])
    tensors = read_checkpoint(tmp_path, "source").tensors
    assert isinstance(tensors, TensorParallelTensors)
    assert "LLaMA 3" in tensors.merges["tok_embeddings.weight"].reason


def test_an_unknown_key_equal_on_every_rank_is_kept_once(tmp_path: Path) -> None:
    state = {**trained_llama_state(), "extra.scale": torch.tensor([0.5, 2.0])}
    write_ranks(tmp_path, state)
    assert torch.equal(read_source(tmp_path).get("extra.scale"), state["extra.scale"])


def test_an_unknown_key_that_differs_across_ranks_is_refused_not_guessed(tmp_path: Path) -> None:
    state = {**trained_llama_state(), "adapter.proj.weight": torch.randn(8, 8)}
    write_ranks(tmp_path, state, axes={**AXES, "adapter.proj.weight": 0})
    with pytest.raises(SourceError, match=r"'adapter.proj.weight' differs between "
                                          r"consolidated.00.pth and consolidated.01.pth.*no known"):
        read_source(tmp_path)


def test_a_half_saved_rank_is_refused_naming_the_file_and_keys(tmp_path: Path) -> None:
    write_ranks(tmp_path, trained_llama_state())
    rank1 = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    del rank1["output.weight"], rank1["norm.weight"]
    torch.save(rank1, tmp_path / "consolidated.01.pth")
    with pytest.raises(SourceError, match=r"consolidated.01.pth lacks 2 keys that "
                                          r"consolidated.00.pth holds \(norm.weight, output"):
        read_source(tmp_path)


def test_a_gap_in_the_numbering_names_the_missing_file(tmp_path: Path) -> None:
    write_ranks(tmp_path, trained_llama_state(), ranks=4)
    (tmp_path / "consolidated.02.pth").unlink()
    with pytest.raises(SourceError, match=r"not consolidated.02.pth: the release is incomplete"):
        read_source(tmp_path)


def test_ranks_that_merge_to_fewer_rows_than_params_json_says_are_refused(tmp_path: Path) -> None:
    write_ranks(tmp_path, trained_llama_state(), ranks=4)
    (tmp_path / "consolidated.02.pth").unlink()
    (tmp_path / "consolidated.03.pth").unlink()  # two of four ranks: numbered without a gap
    with pytest.raises(SourceError, match=r"merges 'layers.0.attention.wq.weight' to \(4, 8\).*"
                                          r"says \(8, 8\): ranks are missing"):
        read_source(tmp_path)


def test_disjoint_parts_are_read_as_their_union(tmp_path: Path) -> None:
    state = trained_llama_state()
    keys = list(state)
    for n, part in enumerate((keys[:5], keys[5:9], keys[9:])):
        torch.save({k: state[k] for k in part}, tmp_path / f"consolidated.{n:02d}.pt")
    source = read_source(tmp_path)
    assert list(source.specs) == [k for k in keys if k != "rope.freqs"]
    assert all(torch.equal(source.get(k), v) for k, v in state.items() if k != "rope.freqs")
    assert "3 files of disjoint keys" in source.description


def test_parts_that_overlap_in_some_keys_are_refused(tmp_path: Path) -> None:
    state = trained_llama_state()
    keys = list(state)
    torch.save({k: state[k] for k in keys[:6]}, tmp_path / "consolidated.00.pt")
    torch.save({k: state[k] for k in keys[5:]}, tmp_path / "consolidated.01.pt")
    with pytest.raises(SourceError, match=r"not a whole release: consolidated.01.pt"):
        read_source(tmp_path)


def test_pickles_that_are_not_one_numbered_set_are_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "best.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "last.pt")
    with pytest.raises(SourceError, match=r"not one numbered set.*name the file"):
        read_source(tmp_path)


def test_a_folder_holding_one_pickle_reads_it(tmp_path: Path) -> None:
    state = trained_llama_state()
    torch.save(state, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text("{}")
    assert list(read_source(tmp_path).specs) == [k for k in state if k != "rope.freqs"]


def test_a_release_file_holding_code_is_refused(tmp_path: Path) -> None:
    write_ranks(tmp_path, trained_llama_state())
    torch.save({"w": logging.getLogger("x")}, tmp_path / "consolidated.01.pth")
    with pytest.raises(SourceError, match=r"(?s)weights_only=True.*never unpickles code"):
        read_source(tmp_path)


def test_an_entry_is_refused_for_a_release_folder(tmp_path: Path) -> None:
    write_ranks(tmp_path, trained_llama_state())
    with pytest.raises(SourceError, match="release of 2 files"):
        read_source(tmp_path, entry="model")


def test_a_meta_tp_release_aligns_as_its_merged_state_dict(tmp_path: Path) -> None:
    pair = corpus.get_pair("meta_llama_tp2_release->hf_llama")
    folder, merged = corpus.read_release(pair, tmp_path)
    dst = pair.make_dst()
    from_release = archalign.align(folder, dst)
    from_state = archalign.align(merged, dst)
    assert [(m.src, m.dst, m.ops) for m in from_release.matches] == [
        (m.src, m.dst, m.ops) for m in from_state.matches]
    report = from_release.apply(dst)
    loaded = {m.dst[0]: m.src for m in from_release.matches if m.dst[0] in report.loaded}
    state = dst.state_dict()
    for key, src_keys in loaded.items():
        if len(src_keys) == 1 and not any(m.ops for m in from_release.matches if m.dst[0] == key):
            assert torch.equal(state[key], merged[src_keys[0]])
