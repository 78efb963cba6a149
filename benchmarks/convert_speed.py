"""Conversion throughput: ``convert_checkpoint`` on one process, on two ranks, against the floor.

A worker builds the MoE pair of ``corpus.scale`` at a width that makes a multi-GB float32
checkpoint (`SHAPE`: about 2.5 GB, 443 tensors), aligns it on the meta device, saves the plan, and
writes the source as safetensors shards (`SOURCE_SHARD_BYTES`) into a temporary folder under
``/tmp``. Then, in interleaved rounds, each in fresh processes:

* **floor**: ``safetensors.torch.load_file`` + ``save_file`` of every source shard (the same bytes,
  no plan, no renames): what reading and writing these files costs at least;
* **1 process**: ``archalign.convert_checkpoint(plan, src, out)``, as shipped (its default
  ``DEFAULT_WRITERS`` writer threads), and with one writer (``writers=1``: the work of one
  thread, what a rank does);
* **2 ranks**: ``torchrun --standalone --nproc-per-node 2``, every rank calling
  ``archalign.convert_distributed.convert_distributed`` (gloo, one writer each), timed from a
  barrier before the call to the last rank's end; the wall time of the whole ``torchrun``
  command is shown too.

Each process reports its peak RSS (``ru_maxrss``) and its RSS before converting (imports only).
Outputs are deleted after each run (the source stays in the page cache: every run reads from
memory). Medians over the rounds.

Run through ``python benchmarks/speed.py --only convert``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    ROOT,
    Events,
    Log,
    Section,
    Target,
    format_mib,
    run_worker,
    setup_torch,
)

TARGET_FLOOR_RATIO = 0.8  # the target: one process at >= 0.8x the floor's throughput
TARGET_SPEEDUP = 1.2  # "scales on two": two ranks at least this much faster than one process
SOURCE_SHARD_BYTES = 256 * 1024**2  # as the output: the floor writes the same files
OUTPUT_SHARD_BYTES = 256 * 1024**2  # ten shards: two ranks get five each
ROUNDS = 4  # counted rounds, after one warm-up round that is not
PARALLEL_START = 4.0  # seconds after launch at which both halves of the parallel floor start


def _shape() -> Any:
    from corpus.scale import MoeShape

    return MoeShape(layers=8, experts=16, hidden=768, intermediate=2048)


def _rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process, MiB."""
    current = 0.0
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------ workers


def worker_prepare(events: Events, folder: str) -> dict[str, Any]:
    """Build the pair on meta, align it, save the plan, write the source shards."""
    import torch

    import archalign
    from archalign.convert import write_safetensors
    from corpus.scale import make_moe

    setup_torch()
    shape = _shape()
    with torch.device("meta"):
        src, dst = make_moe(shape, "a", traceable=True), make_moe(shape, "b", traceable=True)
    plan = archalign.align(src, dst, check_outputs=False)
    plan.save(Path(folder) / "plan.json")
    specs = [(k, tuple(v.shape)) for k, v in src.state_dict().items()]
    tensors = ((k, torch.full(s, float(i % 251) + 0.5)) for i, (k, s) in enumerate(specs))
    files = write_safetensors(tensors, Path(folder) / "src", max_shard_bytes=SOURCE_SHARD_BYTES)
    return {"tensors": len(specs), "bytes": sum(f.stat().st_size for f in files
                                                 if f.suffix == ".safetensors"),
            "source_files": len(files), "matches": len(plan.matches)}


def worker_floor(events: Events, folder: str, out: str, part: int = 0, parts: int = 1,
                 start_at: float | None = None) -> dict[str, Any]:
    """``load_file`` + ``save_file`` of every source shard (of every ``parts``-th one from
    ``part``, when the floor runs as several processes; they start together at ``start_at``)."""
    from safetensors.torch import load_file, save_file

    setup_torch()
    before, _ = _rss_mib()
    shards = sorted((Path(folder) / "src").glob("*.safetensors"))[part::parts]
    Path(out).mkdir(exist_ok=True)
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    start, wall = time.perf_counter(), time.time()
    for shard in shards:
        save_file(load_file(str(shard)), str(Path(out) / shard.name), metadata={"format": "pt"})
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "start": wall, "end": wall + seconds, "rss_before": before,
            "peak_rss": _rss_mib()[1]}


def run_parallel_floor(folder: str, out: str, parts: int) -> dict[str, Any]:
    """The floor as ``parts`` processes on disjoint shares of the shards, started together:
    what the machine allows two ranks at most (memory bandwidth, disk, cores)."""
    start_at = time.time() + PARALLEL_START
    runs: list[Any] = [None] * parts

    def one(n: int) -> None:
        runs[n] = run_worker(worker_floor, 900, folder=folder, out=out, part=n, parts=parts,
                             start_at=start_at)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = [r.result for r in runs if r is not None and r.result is not None]
    if len(results) != parts:
        return {"error": next((r.status for r in runs if r is None or r.result is None), "?")}
    if min(r["start"] for r in results) < start_at - 0.05:
        return {"error": "a part started late (imports took longer than the start delay)"}
    return {"seconds": max(r["end"] for r in results) - start_at,
            "rss_before": [r["rss_before"] for r in results],
            "peak_rss": [r["peak_rss"] for r in results]}


def worker_convert(events: Events, folder: str, out: str, writers: int | None = None
                   ) -> dict[str, Any]:
    """``convert_checkpoint`` on one process (``writers``: its default when None)."""
    import archalign
    from archalign.convert import DEFAULT_WRITERS, convert_checkpoint

    setup_torch()
    plan = archalign.load_plan(Path(folder) / "plan.json")
    before, _ = _rss_mib()
    start = time.perf_counter()
    files = convert_checkpoint(plan, Path(folder) / "src", out,
                               max_shard_bytes=OUTPUT_SHARD_BYTES,
                               writers=DEFAULT_WRITERS if writers is None else writers)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_before": before, "peak_rss": _rss_mib()[1],
            "files": len(files)}


def rank_main(folder: str, out: str) -> None:
    """One rank under torchrun: convert, and write what it measured to ``out``.rank<N>.json."""
    import torch.distributed as dist

    import archalign
    from archalign.convert_distributed import convert_distributed

    setup_torch()
    dist.init_process_group("gloo")
    plan = archalign.load_plan(Path(folder) / "plan.json")
    before, _ = _rss_mib()
    dist.barrier()
    start = time.time()
    files = convert_distributed(plan, Path(folder) / "src", out,
                                max_shard_bytes=OUTPUT_SHARD_BYTES)
    end = time.time()
    result = {"rank": dist.get_rank(), "start": start, "end": end, "rss_before": before,
              "peak_rss": _rss_mib()[1], "files": len(files)}
    Path(f"{out}.rank{dist.get_rank()}.json").write_text(json.dumps(result), encoding="utf-8")
    dist.destroy_process_group()


def run_ranks(folder: str, out: str, ranks: int) -> dict[str, Any]:
    """``torchrun`` ``ranks`` processes of `rank_main`; their results, merged."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(ranks), str(Path(__file__).resolve()), folder, out],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    wall = time.perf_counter() - started
    results = [json.loads(Path(f"{out}.rank{r}.json").read_text(encoding="utf-8"))
               for r in range(ranks) if Path(f"{out}.rank{r}.json").exists()]
    if done.returncode != 0 or len(results) != ranks:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return {"seconds": max(r["end"] for r in results) - min(r["start"] for r in results),
            "wall": wall, "rss_before": [r["rss_before"] for r in results],
            "peak_rss": [r["peak_rss"] for r in results]}


# ------------------------------------------------------------------------------------ parent


def measure_convert(log: Log, rounds: int = ROUNDS) -> Section:
    """Prepare the checkpoint, run the interleaved rounds; returns markdown and targets."""
    work = Path(tempfile.mkdtemp(prefix="archalign-convert-bench-", dir="/tmp"))
    try:
        return _measure(log, work, rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(log: Log, work: Path, rounds: int) -> Section:
    from archalign.convert import DEFAULT_WRITERS

    log(f"convert throughput: preparing the source in {work}")
    prepared = run_worker(worker_prepare, 900, folder=str(work))
    lines = ["## 4. Conversion throughput", ""]
    what = (f"convert_checkpoint, 1 process (as shipped): >= {TARGET_FLOOR_RATIO}x the "
            "floor's throughput")
    scale = f"convert on 2 ranks: >= {TARGET_SPEEDUP}x faster than 1 process"
    if prepared.result is None:
        lines.append(f"Preparing the checkpoint failed: {prepared.status}")
        return Section(lines, [Target(what, prepared.status, None),
                               Target(scale, prepared.status, None)])
    info = prepared.result
    size = info["bytes"]
    kinds = ("floor", "shipped", "one", "two", "floor2")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    walls: list[float] = []
    rss: dict[str, list[Any]] = {k: [] for k in kinds}
    errors: list[str] = []
    for n in range(rounds + 1):  # round 0 warms up (page cache, first writes) and is not counted
        for kind in kinds:
            out = work / f"out-{kind}-{n}"
            os.sync()  # the previous run's dirty pages are written now, not during this run
            if kind == "two":
                result = run_ranks(str(work), str(out), 2)
            elif kind == "floor2":
                result = run_parallel_floor(str(work), str(out), 2)
            elif kind == "floor":
                run = run_worker(worker_floor, 900, folder=str(work), out=str(out))
                result = run.result or {"error": run.status}
            else:
                run = run_worker(worker_convert, 900, folder=str(work), out=str(out),
                                 writers=1 if kind == "one" else None)
                result = run.result or {"error": run.status}
            shutil.rmtree(out, ignore_errors=True)
            for stale in work.glob(f"{out.name}.rank*.json"):
                stale.unlink()
            label = f"round {n} {kind}" + (" (warm-up, not counted)" if n == 0 else "")
            if "error" in result:
                errors.append(f"{kind}: {result['error']}")
                log(f"  {label}: {result['error']}")
                continue
            log(f"  {label}: {result['seconds']:.2f} s "
                f"({size / result['seconds'] / 1024**2:.0f} MiB/s)")
            if n == 0:
                continue
            times[kind].append(result["seconds"])
            rss[kind].append((result["rss_before"], result["peak_rss"]))
            if kind == "two":
                walls.append(result["wall"])
    med = {k: statistics.median(v) if v else None for k, v in times.items()}
    lines += [f"A {format_mib(size)} MiB float32 checkpoint ({info['tensors']} tensors of the "
              f"`corpus.scale` MoE, `MoeShape(layers=8, experts=16, hidden=768, "
              f"intermediate=2048)`, Mixtral names -> DeepSeek names, {info['source_files'] - 1} "
              f"source shards of {format_mib(SOURCE_SHARD_BYTES)} MiB; output shards of "
              f"{format_mib(OUTPUT_SHARD_BYTES)} MiB) in `/tmp`, read from the page cache. "
              f"One warm-up round (not counted), then {rounds} interleaved rounds, fresh processes "
              "each, `os.sync()` before every run (so that no run pays for the writeback of "
              "the one before); medians. Floor: "
              "`safetensors.torch.load_file` + `save_file` of every source shard (the same "
              "bytes), one thread. `convert_checkpoint` as shipped writes with "
              f"{DEFAULT_WRITERS} writer threads (`archalign.convert.DEFAULT_WRITERS`: "
              "safetensors writes without the GIL); with `writers=1` it does the work of one "
              "thread, as each rank does. 2 ranks: `torchrun --standalone --nproc-per-node 2`, each calling "
              "`convert_distributed` (gloo), timed from a barrier before the call to the last "
              "rank's end. Two floors in parallel (a reference, not a target): the floor as two "
              "processes on disjoint halves of the shards, started together; what two ranks "
              "can reach on this machine at most. "
              "RSS: before converting (imports only) -> peak (`ru_maxrss`).", "",
              "| run | seconds (median) | MiB/s | vs floor | speed-up over 1 process | "
              "RSS before -> peak, MiB (per process) | all runs, s |", "|---|---|---|---|---|---|---|"]
    labels = {"floor": "floor: load_file + save_file",
              "shipped": f"convert_checkpoint, 1 process, {DEFAULT_WRITERS} writers (as shipped)",
              "one": "convert_checkpoint, 1 process, 1 writer",
              "two": "convert_distributed, 2 ranks, 1 writer each",
              "floor2": "reference: 2 floors in parallel, disjoint halves"}
    for kind, label in labels.items():
        t = med[kind]
        if t is None:
            lines.append(f"| {label} | failed | - | - | - | - | - |")
            continue
        last = rss[kind][-1]
        if kind in ("two", "floor2"):
            memory = "; ".join(f"rank {r}: {b:.0f} -> {p:.0f}"
                               for r, (b, p) in enumerate(zip(last[0], last[1])))
        else:
            memory = f"{last[0]:.0f} -> {last[1]:.0f}"
        floor = f"{med['floor'] / t:.2f}x" if med["floor"] else "-"
        speedup = (f"{med['one'] / t:.2f}x" if med["one"] and kind in ("one", "two",
                                                                      "shipped") else
                   f"{med['floor'] / t:.2f}x over 1 floor" if med["floor"] and kind == "floor2"
                   else "-")
        lines.append(f"| {label} | {t:.2f} | {size / t / 1024**2:.0f} | {floor} | {speedup} | "
                     f"{memory} | {', '.join(f'{x:.2f}' for x in times[kind])} |")
    if walls:
        lines += ["", f"The whole `torchrun` command (start-up, imports, reading the plan, "
                  f"converting) took {statistics.median(walls):.1f} s (median)."]
    if med["floor"] and med["floor2"]:
        lines += ["", f"Two floors in parallel run at {med['floor'] / med['floor2']:.2f}x one "
                  "floor: that is the most two ranks can gain over one process here (the same "
                  "bytes, no plan); at or below 1x the machine (two shared cores, the write "
                  "bandwidth into the page cache) cannot scale this work, whatever archalign does."]
    if errors:
        lines += ["", "Failed runs: " + "; ".join(errors)]
    targets = []
    ratio = med["floor"] / med["shipped"] if med["floor"] and med["shipped"] else None
    single = med["floor"] / med["one"] if med["floor"] and med["one"] else None
    shown = f"{ratio:.2f}x" if ratio else "not measured"
    if single:
        shown += f" (1 writer: {single:.2f}x)"
    targets.append(Target(what, shown, None if ratio is None else ratio >= TARGET_FLOOR_RATIO))
    gain = med["one"] / med["two"] if med["one"] and med["two"] else None
    ceiling = med["floor"] / med["floor2"] if med["floor"] and med["floor2"] else None
    shown = f"{gain:.2f}x over 1 writer" if gain else "not measured"
    if med["shipped"] and med["two"]:
        shown += f", {med['shipped'] / med['two']:.2f}x over the shipped default"
    if gain and ceiling:
        shown += f" (2 floors in parallel: {ceiling:.2f}x over 1 floor)"
    targets.append(Target(scale, shown,
                          None if gain is None else gain >= TARGET_SPEEDUP))
    return Section(lines, targets)


if __name__ == "__main__":  # a rank under torchrun (run_ranks; PYTHONPATH holds the checkout)
    rank_main(sys.argv[1], sys.argv[2])
