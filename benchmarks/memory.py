"""Peak memory of loading a sharded safetensors checkpoint: archalign's streaming load and baselines.

A 0.9 GB Llama (``corpus.scale.LLAMA_SHARDED``, every tensor a distinct constant) is written as five
safetensors shards and a Hugging Face ``model.safetensors.index.json``. Each variant
(`MEMORY_VARIANTS`) then runs in a fresh process that builds the destination (Mistral of the same
size, on CPU, or on meta where the variant says so) and loads the checkpoint: the Hugging Face way
(one shard at a time into ``load_state_dict(strict=False)``) and one merged state_dict into
``load_state_dict`` are the baselines, measured in the same run; archalign aligns the index itself
(``align(index.json, dst)`` -> ``apply``) or a merged state_dict. Peak RSS is ``ru_maxrss``, counted
above the RSS right after the imports, and reported as a ratio to the target's budget (destination
+ largest shard). The distinct constants let the benchmark count the destination tensors that
received the right values.

Run through ``python benchmarks/speed.py --only memory``.
"""

from __future__ import annotations

import gc
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks._harness import (
    Events,
    Log,
    Section,
    Target,
    format_mib,
    run_worker,
    setup_torch,
)

if TYPE_CHECKING:
    from torch import nn

MEMORY_VARIANTS = {  # name -> (label, is a streaming archalign load the target is about)
    "hf_streaming": ("baseline: load_file + load_state_dict(strict=False) one shard at a time "
                     "(how transformers loads)", False),
    "merged_load_state_dict": ("baseline: all shards merged into one state_dict -> "
                               "load_state_dict", False),
    "archalign_index": ("archalign: align(index.json, dst) -> apply(dst)", True),
    "archalign_index_nonatomic": ("archalign: align(index.json, dst) -> apply(dst, atomic=False)",
                                  True),
    "archalign_index_meta_dst": ("archalign: destination on meta; align(index.json, dst) -> "
                                 "apply(dst) materialises it", True),
    "archalign_merged_sorted": ("archalign: all shards merged into one state_dict, keys sorted "
                                "-> align -> apply", False),
    "archalign_merged": ("archalign: all shards merged into one state_dict in shard order -> "
                         "align -> apply", False),
}


def worker_write_shards(events: Events, directory: str, shards: int) -> dict[str, Any]:
    """Write the Llama source as ``shards`` safetensors files and a Hugging Face index into
    ``directory``, with ``expected.json`` (the constant each tensor holds)."""
    from safetensors.torch import save_file

    from corpus.scale import LLAMA_SHARDED, fill_distinct, make_llama_pair

    setup_torch()
    folder = Path(directory)
    src, _ = make_llama_pair(LLAMA_SHARDED, "meta")
    src = src.to_empty(device="cpu")
    fill_distinct(src)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    limit = total / shards
    parts: list[dict[str, Any]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if parts[-1] and size + nbytes > limit * 1.05:
            parts.append({})
            size = 0
        parts[-1][key] = tensor
        size += nbytes
    weight_map: dict[str, str] = {}
    sizes = []
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        sizes.append((folder / name).stat().st_size)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2),
                                                            encoding="utf-8")
    expected = {k: i + 1 for i, k in enumerate(state)}
    (folder / "expected.json").write_text(json.dumps(expected), encoding="utf-8")
    return {"total_bytes": total, "shard_bytes": sizes, "tensors": len(state)}


def _rss_kib() -> dict[str, int]:
    """Current and peak resident set size of this process (KiB), from /proc."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _unit = line.split()
                values[name.rstrip(":")] = int(amount)
    return values


def _merged_shards(directory: Path, files: list[str]) -> dict[str, Any]:
    """Every shard read with ``safetensors.torch.load_file`` into one dict, in shard order."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def _load_by_variant(variant: str, directory: Path, files: list[str], dst: nn.Module,
                     marks: dict[str, int]) -> tuple[list[str], int] | None:
    """Load the checkpoint in ``directory`` into ``dst`` the way ``variant`` says.

    archalign applies with ``min_confidence=0`` so that every planned tensor is written (the
    memory of a full load). Returns the destination keys archalign loaded and how many of its
    matches the default ``min_confidence=0.5`` would have skipped (None for a baseline).

    Raises
    ------
    ValueError
        If ``variant`` is not a key of `MEMORY_VARIANTS`.
    """
    from safetensors.torch import load_file

    import archalign

    index = directory / "model.safetensors.index.json"
    if variant == "hf_streaming":
        for name in files:
            shard = load_file(str(directory / name))
            dst.load_state_dict(shard, strict=False)
            del shard
    elif variant == "merged_load_state_dict":
        state = _merged_shards(directory, files)
        marks["state_dict read"] = _rss_kib()["VmRSS"]
        dst.load_state_dict(state)
    elif variant.startswith("archalign_index"):
        plan = archalign.align(index, dst, check_outputs=False)
        marks["aligned"] = _rss_kib()["VmRSS"]
        report = plan.apply(dst, min_confidence=0.0, atomic=variant != "archalign_index_nonatomic")
        return list(report.loaded), sum(m.confidence < 0.5 for m in plan.matches)
    elif variant in ("archalign_merged", "archalign_merged_sorted"):
        state = _merged_shards(directory, files)
        if variant == "archalign_merged_sorted":
            state = dict(sorted(state.items()))
        marks["state_dict read"] = _rss_kib()["VmRSS"]
        plan = archalign.align(state, dst, check_outputs=False)
        marks["aligned"] = _rss_kib()["VmRSS"]
        report = plan.apply(dst, min_confidence=0.0)
        return list(report.loaded), sum(m.confidence < 0.5 for m in plan.matches)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return None


def worker_memory(events: Events, variant: str, directory: str) -> dict[str, Any]:
    """Build the destination and load the sharded checkpoint in ``directory`` into it by
    ``variant``; report RSS."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from corpus.scale import LLAMA_SHARDED

    setup_torch()
    folder = Path(directory)
    index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
    files = list(dict.fromkeys(index["weight_map"].values()))
    marks = {"imports": _rss_kib()["VmRSS"]}
    start = time.perf_counter()
    device = "meta" if variant.endswith("meta_dst") else "cpu"
    with torch.device(device):
        dst = MistralForCausalLM(MistralConfig(**LLAMA_SHARDED.kwargs())).eval()
    dst_bytes = sum(t.numel() * t.element_size() for t in dst.state_dict().values())
    marks["destination built"] = _rss_kib()["VmRSS"]
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    error = ""
    outcome: tuple[list[str], int] | None = None
    try:
        outcome = _load_by_variant(variant, folder, files, dst, marks)
    except Exception as exc:  # e.g. an archalign that cannot read a sharded index
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    load_s = time.perf_counter() - start
    gc.collect()
    marks["after load"] = _rss_kib()["VmRSS"]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expected = json.loads((folder / "expected.json").read_text(encoding="utf-8"))
    state_now = dst.state_dict()
    right = {k for k, v in expected.items() if k in state_now
             and state_now[k].device.type != "meta" and bool((state_now[k] == v).all())}
    return {"variant": variant, "peak_kib": peak_kib, "marks_kib": marks, "dst_bytes": dst_bytes,
            "build_s": build_s, "load_s": load_s, "correct": len(right), "tensors": len(expected),
            "loaded": None if outcome is None else len(outcome[0]),
            "wrong": None if outcome is None else len(set(outcome[0]) - right),
            "low": None if outcome is None else outcome[1], "error": error}


def measure_memory(log: Log) -> Section:
    """Peak RSS of loading a sharded checkpoint, per variant; returns markdown and targets."""
    from corpus.scale import LLAMA_SHARDED

    log("peak memory, loading a sharded safetensors checkpoint")
    directory = Path(tempfile.mkdtemp(prefix="archalign-speed-"))
    lines: list[str] = ["## 3. Peak memory, loading a sharded safetensors checkpoint", ""]
    targets: list[Target] = []
    try:
        written = run_worker(worker_write_shards, 600, directory=directory, shards=5)
        if written.result is None:
            log(f"  writing the shards failed: {written.status}")
            return Section([*lines, f"Writing the checkpoint failed: {written.status}"], targets)
        w = written.result
        largest = max(w["shard_bytes"])
        lines += [f"Checkpoint: Llama {LLAMA_SHARDED.layers} layers x {LLAMA_SHARDED.hidden} "
                  f"({w['tensors']} tensors, {format_mib(w['total_bytes'])} MiB fp32) in "
                  f"{len(w['shard_bytes'])} shards of "
                  f"{', '.join(format_mib(b) for b in w['shard_bytes'])} MiB + "
                  "`model.safetensors.index.json` (Hugging Face format); destination: Mistral of "
                  "the same size, built on CPU (or on meta where the row says so). A fresh "
                  "process per variant; memory is counted above the process's RSS right after its "
                  "imports; peak = `ru_maxrss`. archalign applies with `min_confidence=0` so that "
                  "every planned tensor is written. \"tensors right\": destination tensors "
                  "holding their source's value afterwards (an error means this archalign cannot "
                  "do it). "
                  "The streaming rows (align on the index) are the ones the target is about; the "
                  "merged rows are the fallback for an archalign that reads no index.", "",
                  "| variant | RSS after imports MiB | destination built, + MiB | peak, + MiB | "
                  "peak / (destination + largest shard) | load s | tensors right |",
                  "|---|---|---|---|---|---|---|"]
        budget_bytes = None
        hf_ratio = "not measured"
        for variant, (label, streaming) in MEMORY_VARIANTS.items():
            what = f"streaming peak memory <= destination + one shard, every tensor right [{label}]"
            run = run_worker(worker_memory, 600, variant=variant, directory=directory)
            if run.result is None:
                lines.append(f"| {label} | {run.status} | - | - | - | - | - |")
                log(f"  {variant}: {run.status}")
                if streaming:
                    targets.append(Target(what, run.status, None))
                continue
            r = run.result
            base = r["marks_kib"]["imports"] * 1024
            built = r["marks_kib"]["destination built"] * 1024 - base
            peak = r["peak_kib"] * 1024 - base
            budget_bytes = r["dst_bytes"] + largest
            right = f"{r['correct']}/{r['tensors']}"
            if r["loaded"] is not None:
                right += (f" (archalign loaded {r['loaded']}, {r['wrong']} of them wrong, "
                          f"{r['tensors'] - r['loaded']} untouched; {r['low']} of its matches "
                          "are below the default min_confidence 0.5)")
            if r["error"]:
                right += f" ({r['error']})"
            lines.append(f"| {label} | {format_mib(base)} | {format_mib(built)} | "
                         f"{format_mib(peak)} | {peak / budget_bytes:.2f} | {r['load_s']:.1f} | "
                         f"{right} |")
            log(f"  {variant}: peak +{format_mib(peak)} MiB (destination "
                f"{format_mib(r['dst_bytes'])} MiB + largest shard {format_mib(largest)} MiB = "
                f"{format_mib(budget_bytes)} MiB), {right} tensors right, {r['load_s']:.1f} s")
            if streaming:
                ok = None if r["error"] else (peak <= budget_bytes and r["correct"] == r["tensors"])
                targets.append(Target(what, f"+{format_mib(peak)} MiB vs {format_mib(budget_bytes)} "
                                      f"MiB ({peak / budget_bytes:.2f}x; transformers' own "
                                      f"loading: {hf_ratio}); {r['correct']}/{r['tensors']} "
                                      "tensors right", ok))
            if variant == "hf_streaming":
                hf_ratio = f"{peak / budget_bytes:.2f}x"
        if budget_bytes is not None:
            lines += ["", f"Budget of the target: destination ({format_mib(budget_bytes - largest)} "
                      f"MiB of tensors) + largest shard ({format_mib(largest)} MiB) = "
                      f"{format_mib(budget_bytes)} MiB."]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return Section(lines, targets)
