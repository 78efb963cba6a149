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
from archalign.distributed import load_distributed_checkpoint
from archalign.errors import PlanError

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
