"""A plan applied while two gloo processes load a torch.distributed.checkpoint directory."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

import archalign
from archalign.distributed import load_distributed_checkpoint, read_dcp_metadata
from archalign.errors import PlanError, SourceError

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, folder: str, results: str) -> None:
    sys.path.insert(0, str(ROOT))
    from corpus import get_pair, run_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pair = get_pair("hf_llama->hf_phi3")  # renames and fused concats
        src = pair.make_src()
        dcp.save(src.state_dict(), checkpoint_id=folder)  # every rank writes its part
        dist.barrier()
        dst = pair.make_dst()
        plan = archalign.align(src, pair.make_dst())  # checked on outputs: fused rows confirmed
        report = load_distributed_checkpoint(plan, dst, folder)
        inputs = pair.make_inputs()
        diff = float((run_model(src, inputs) - run_model(dst, inputs)).abs().max())
        torch.save({"diff": diff, "loaded": len(report.loaded), "adapted": len(report.adapted),
                    "missing": report.missing}, f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_load_a_dcp_checkpoint_through_a_plan(tmp_path: Path) -> None:
    folder, results = tmp_path / "ckpt", tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(folder), str(results)), nprocs=2, join=True)
    for rank in (0, 1):
        out = torch.load(results / f"rank{rank}.pt")
        assert out["diff"] <= 1e-5, out
        assert out["loaded"] == 15 and out["adapted"] == 4 and out["missing"] == ()


def test_a_checkpoint_that_lacks_a_key_is_refused(tmp_path: Path) -> None:
    from corpus import get_pair

    pair = get_pair("mlp->mlp_identical")
    src = pair.make_src()
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("fc3")}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    plan = archalign.align(src, pair.make_dst())
    with pytest.raises(PlanError, match=r"fc3\.weight"):
        load_distributed_checkpoint(plan, pair.make_dst(), tmp_path)


def test_a_plan_that_loads_nothing_reads_and_writes_nothing(tmp_path: Path) -> None:
    from corpus import get_pair

    pair = get_pair("mlp->mlp_identical")
    src = pair.make_src()
    dcp.save(src.state_dict(), checkpoint_id=str(tmp_path), no_dist=True)
    plan = archalign.align(src, pair.make_dst()).drop("*")  # every match dropped
    dst = pair.make_dst()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_distributed_checkpoint(plan, dst, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    assert report.loaded == () and set(report.missing) == set(before)
    assert set(report.unexpected) == set(src.state_dict())


class _Planted:
    """A pickled object whose unpickling would create ``marker`` (were it unpickled)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _saved(folder: Path) -> tuple[archalign.Plan, torch.nn.Module, dict[str, torch.Tensor]]:
    from corpus import get_pair

    pair = get_pair("mlp->mlp_identical")
    src = pair.make_src()
    dcp.save(src.state_dict(), checkpoint_id=str(folder), no_dist=True)
    dst = pair.make_dst()
    return archalign.align(src, pair.make_dst()), dst, {k: v.clone() for k, v in
                                                        dst.state_dict().items()}


def _tamper(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    import pickle

    metadata = read_dcp_metadata(folder)
    change(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("where", ["whole", "planner_data", "storage_meta", "entry"])
def test_a_planted_reduce_in_the_metadata_never_runs(tmp_path: Path, where: str) -> None:
    import pickle

    folder, marker = tmp_path / "ckpt", tmp_path / "ran"
    plan, dst, before = _saved(folder)
    planted = _Planted(marker)
    if where == "whole":
        (folder / ".metadata").write_bytes(pickle.dumps(planted))
    elif where == "entry":
        _tamper(folder, lambda m: m.state_dict_metadata.__setitem__("fc1.weight", planted))
    else:
        _tamper(folder, lambda m: setattr(m, where, planted))
    with pytest.raises(SourceError, match=r"names posix\.system.*refuses it"):
        load_distributed_checkpoint(plan, dst, folder)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def _escape(metadata) -> None:  # type: ignore[no-untyped-def]
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"


def _bytes_entry(metadata) -> None:  # type: ignore[no-untyped-def]
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata.state_dict_metadata["fc1.bias"] = BytesStorageMetadata()


def _bad_chunk(metadata) -> None:  # type: ignore[no-untyped-def]
    entry = metadata.state_dict_metadata["fc1.weight"]
    entry.chunks[0].sizes = torch.Size([d + 1 for d in entry.size])


@pytest.mark.parametrize(("change", "message"), [
    (_escape, "outside its own folder"), (_bytes_entry, "as pickled bytes, not as a tensor"),
    (_bad_chunk, "does not lie within its size")])
def test_metadata_that_does_not_hold_together_is_refused(tmp_path: Path, change, message) -> None:  # type: ignore[no-untyped-def]
    plan, dst, before = _saved(tmp_path)
    _tamper(tmp_path, change)
    with pytest.raises(SourceError, match=message):
        load_distributed_checkpoint(plan, dst, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


@pytest.mark.parametrize("data", [
    b"", b"not a pickle", b"\x80\x05K\x01.", b"\x80\x05]\x94.",
    b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"x.",  # a 1 TiB bytearray, 1 byte given
    b"\x80\x04K\x01r" + (2**30).to_bytes(4, "little") + b".",  # a memo of 2**30 entries (16 GB)
])
def test_a_metadata_file_that_is_not_metadata_is_a_source_error(tmp_path: Path, data: bytes) -> None:
    (tmp_path / ".metadata").write_bytes(data)
    with pytest.raises(SourceError, match="metadata"):
        read_dcp_metadata(tmp_path)
    with pytest.raises(SourceError, match=r"is .* a torch\.distributed\.checkpoint folder"):
        read_dcp_metadata(tmp_path / "missing")
