"""Tests for archalign.convert_distributed: a conversion spread over gloo ranks, all or nothing."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import archalign
from archalign.convert import INDEX_NAME, convert_checkpoint
from archalign.convert_distributed import Shard, assign_shards, convert_distributed, shard_layout
from archalign.source import read_source

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 40_000  # a 64 x 64 float32 weight is 16 KiB: a handful of shards


class Old(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(7))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class New(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(64, 64) for _ in range(7))
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.classifier(x)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A source checkpoint file, its plan (saved), and the one-process conversion."""
    folder = tmp_path_factory.mktemp("case")
    torch.manual_seed(0)
    src = Old()
    save_file(src.state_dict(), str(folder / "src.safetensors"))
    plan = archalign.align(src, New(), check_outputs=False)
    plan.save(folder / "plan.json")
    convert_checkpoint(plan, folder / "src.safetensors", folder / "single",
                       max_shard_bytes=SHARD_BYTES)
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _rank(rank: int, world: int, store: str, folder: str, out: str, fail: str) -> None:
    """One rank of a conversion; writes what happened to ``out``.rank<N>.json."""
    import torch.distributed as dist

    from archalign import convert as module  # the one writer of shard files

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    if fail and rank == world - 1:
        save = module._save

        def broken(tensors, path, *args):
            if fail == "kill":
                os._exit(3)  # the process dies mid-conversion, as on SIGKILL
            save(tensors, path, *args)
            raise OSError(28, "No space left on device", str(path))

        module._save = broken
    try:
        files = convert_distributed(archalign.load_plan(Path(folder) / "plan.json"),
                                    Path(folder) / "src.safetensors", out,
                                    max_shard_bytes=SHARD_BYTES, overwrite=True)
        result = {"ok": [f.name for f in files]}
    except BaseException as exc:
        result = {"error": type(exc).__name__, "message": str(exc)}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_ranks(case: Path, out: Path, world: int = 2, fail: str = "") -> list[dict | None]:
    """Run ``world`` ranks (spawned processes, gloo) converting the case into ``out``."""
    context = multiprocessing.get_context("spawn")
    store = out.parent / f"{out.name}.store"
    processes = [context.Process(target=_rank, args=(r, world, str(store), str(case), str(out),
                                                      fail)) for r in range(world)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    results = []
    for r in range(world):
        path = Path(f"{out}.rank{r}.json")
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return results


def test_two_ranks_write_the_files_of_one_process_byte_for_byte(case, tmp_path):
    out = tmp_path / "two"
    results = run_ranks(case, out)
    single = files_of(case / "single")
    assert len(single) > 3 and INDEX_NAME in single
    assert results == [{"ok": list(single)}] * 2  # shards in order, the index last
    assert files_of(out) == single


def test_a_rank_that_fails_leaves_no_index_and_no_shard(case, tmp_path):
    out = tmp_path / "failed"
    results = run_ranks(case, out, fail="raise")
    assert results[1]["error"] == "OSError"
    assert results[0]["error"] == "ApplyError"
    assert "rank 1 of 2 failed (OSError" in results[0]["message"]
    assert not out.exists()  # the folder did not exist before: gone, staging and all


def test_a_rank_that_dies_leaves_an_earlier_checkpoint_intact(case, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    (out / "config.json").write_text("{}")
    results = run_ranks(case, out, fail="kill")
    assert results[1] is None  # it died
    assert results[0] is not None and "error" in results[0]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"old"


def test_one_process_without_a_group_is_the_plain_conversion(case, tmp_path):
    files = convert_distributed(archalign.load_plan(case / "plan.json"), case / "src.safetensors",
                                tmp_path / "one", max_shard_bytes=SHARD_BYTES)
    assert [f.name for f in files] == list(files_of(case / "single"))
    assert files_of(tmp_path / "one") == files_of(case / "single")


def test_layout_is_what_the_writer_packs_and_ranks_get_contiguous_even_ranges(case):
    plan = archalign.load_plan(case / "plan.json")
    layout = shard_layout(plan.matches, read_source(case / "src.safetensors"), SHARD_BYTES)
    index = json.loads((case / "single" / INDEX_NAME).read_text())["weight_map"]
    assert {k: s.name for s in layout for k in s.keys} == index
    for shard in layout:
        tensors = load_file(str(case / "single" / shard.name))
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == shard.nbytes
    shards = [Shard(f"s{i}", (f"k{i}",), n) for i, n in enumerate([10, 10, 10, 30, 40])]
    assert [[s.name for s in r] for r in assign_shards(shards, 2)] == [["s0", "s1", "s2", "s3"],
                                                                       ["s4"]]
    assert [[s.name for s in r] for r in assign_shards(shards[:1], 3)] == [[], ["s0"], []]


def test_cli_convert_distributed_under_torchrun(case, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--standalone", "-m", "archalign", "convert", str(case / "src.safetensors"),
         str(case / "plan.json"), "-o", str(out), "--max-shard-size", str(SHARD_BYTES),
         "--distributed"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "from 2 ranks" in done.stdout
    assert files_of(out) == files_of(case / "single")


def test_cli_convert_distributed_without_torchrun_is_a_usage_error(case, tmp_path, capsys):
    from archalign.cli import main

    code = main(["convert", str(case / "src.safetensors"), str(case / "plan.json"), "-o",
                 str(tmp_path / "x"), "--distributed"])
    assert code == 2
    assert "runs under torchrun" in capsys.readouterr().err
