"""Align time: ``archalign.align(src, dst, check_outputs=False)`` by stage, on real architectures.

The cases (`align_cases`): torchvision -> timm ResNet-50 and ViT-B/16; Hugging Face Llama -> Mistral
at the 7B and 70B configurations, built on the meta device; and the Mixture-of-Experts pair of
``corpus.scale`` (Mixtral names -> DeepSeek names) with more than 10^4 tensors, in both directions.
Like the Hugging Face models it is not fx-traceable, so archalign runs it once with forward hooks on
its ``dummy_inputs``. The same pair built ``traceable=True`` takes archalign's torch.fx path: it is
measured at 10^4 and 3 x 10^4 tensors, both directions, with a sweep of its own (family "MoE fx").
A sweep of smaller Llama and MoE configurations shows how align time grows
with the tensor count (``benchmarks/scaling.py``: the fit, the extrapolation to a case that timed
out, and ``benchmarks/results/speed.png``).

Each case runs in a fresh worker process with a time limit (imports and model building included);
a case that exceeds it is recorded as a timeout, with the stages it finished and a lower bound for
the one it was killed in. Stage times come from `benchmarks._instruments.StageTimer` (the functions
``archalign.pipeline.align`` calls, wrapped with timers inside the worker). The slowest completed
case is then run again under the sampling profiler (`benchmarks._instruments.StackSampler`, every
5 ms), and so are the first ``profile_budget`` seconds of the largest case that timed out; the
longer listings go to ``benchmarks/results/speed_profile.txt``.

Run through ``python benchmarks/speed.py --only align [--cases resnet50,llama7b,...]``.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks._harness import (
    RESULTS,
    ROOT,
    Events,
    Log,
    Section,
    Target,
    WorkerRun,
    format_seconds,
    run_worker,
    setup_torch,
    write_result,
)
from benchmarks._instruments import (
    STAGE_LEGEND,
    STAGES,
    StackSampler,
    StageTimer,
    profile_tables,
    stage_of,
)
from benchmarks.scaling import Point, fit_growth, plot_scaling

if TYPE_CHECKING:
    from torch import nn

# the targets
TARGET_RESNET_S = 0.5
TARGET_70B_S = 3.0
TARGET_MOE_S = 30.0
TARGET_MOE_FX_S = 10.0  # the traceable MoE at 10^4 tensors (issue 17)
TARGET_MOE_FX_BIG_S = 30.0  # and at 3 x 10^4


@dataclass(frozen=True)
class AlignCase:
    """One source -> destination pair whose align time is measured."""

    name: str  # what --cases and the plot's labels call it
    label: str  # what the table shows
    family: str  # series of the plot
    kind: str  # "vision", "llama" or "moe"
    spec: Any = None  # LlamaShape / MoeShape, or a (src, dst) pair of model names
    reverse: bool = False  # swap source and destination
    repeats: int = 1  # runs after the first (the first is "cold")
    target: float | None = None  # seconds, from the issue
    sweep: bool = False  # only a point of the scaling plot
    traceable: bool = False  # an MoE that torch.fx traces (corpus.scale.make_moe(traceable=True))


@functools.cache
def align_cases() -> tuple[AlignCase, ...]:
    """Every align case, main cases first, then the sweep.

    Built on first use: importing ``corpus`` imports torch, which a worker must do only once it
    times its own imports.
    """
    from corpus.scale import LLAMA_7B, LLAMA_70B, MOE_BIG, MOE_FX_BIG, MOE_MIXTRAL_8X7B, MoeShape

    big = f"MoE {MOE_BIG.layers}L x {MOE_BIG.experts}E"
    fx_cases = []
    for shape, target, sweep in ((MOE_BIG, TARGET_MOE_FX_S, False),
                                 (MOE_FX_BIG, TARGET_MOE_FX_BIG_S, False),
                                 (MoeShape(4, 8), None, True), (MoeShape(16, 32), None, True),
                                 (MoeShape(16, 64), None, True)):
        size = f"{shape.layers}L x {shape.experts}E"
        stem = f"moe_fx_l{shape.layers}_e{shape.experts}"
        fx_cases += [
            AlignCase(f"{stem}_a2b", f"MoE fx {size} Mixtral-names -> DeepSeek-names (meta)",
                      "MoE fx (meta)", "moe", shape, target=target, sweep=sweep, traceable=True),
            AlignCase(f"{stem}_b2a", f"MoE fx {size} DeepSeek-names -> Mixtral-names (meta)",
                      "MoE fx (meta)", "moe", shape, reverse=True, target=target, sweep=sweep,
                      traceable=True)]
    main_fx = tuple(c for c in fx_cases if not c.sweep)
    sweep_fx = tuple(c for c in fx_cases if c.sweep)
    return (
        AlignCase("resnet50", "torchvision resnet50 -> timm resnet50", "torchvision -> timm",
                  "vision", ("resnet50", "resnet50"), repeats=5, target=TARGET_RESNET_S),
        AlignCase("vit_b_16", "torchvision vit_b_16 -> timm vit_base_patch16_224",
                  "torchvision -> timm", "vision", ("vit_b_16", "vit_base_patch16_224"),
                  repeats=3),
        AlignCase("llama7b", "Llama-7B -> Mistral-7B (meta)", "Llama -> Mistral (meta)", "llama",
                  LLAMA_7B),
        AlignCase("llama70b", "Llama-70B -> Mistral-70B (meta)", "Llama -> Mistral (meta)",
                  "llama", LLAMA_70B, target=TARGET_70B_S),
        AlignCase("moe_a2b", f"{big} Mixtral-names -> DeepSeek-names (meta)", "MoE (meta)", "moe",
                  MOE_BIG, target=TARGET_MOE_S),
        AlignCase("moe_b2a", f"{big} DeepSeek-names -> Mixtral-names (meta)", "MoE (meta)", "moe",
                  MOE_BIG, reverse=True, target=TARGET_MOE_S),
        *main_fx,
        AlignCase("llama7b_l2", "Llama -> Mistral, 7B width, 2 layers", "Llama -> Mistral (meta)",
                  "llama", replace(LLAMA_7B, layers=2), sweep=True),
        AlignCase("llama7b_l8", "Llama -> Mistral, 7B width, 8 layers", "Llama -> Mistral (meta)",
                  "llama", replace(LLAMA_7B, layers=8), sweep=True),
        AlignCase("moe_l4_e8", "MoE 4L x 8E", "MoE (meta)", "moe", MoeShape(4, 8), sweep=True),
        AlignCase("moe_l4_e32", "MoE 4L x 32E", "MoE (meta)", "moe", MoeShape(4, 32), sweep=True),
        AlignCase("moe_mixtral", "MoE 32L x 8E (Mixtral-8x7B topology)", "MoE (meta)", "moe",
                  MOE_MIXTRAL_8X7B, sweep=True),
        AlignCase("moe_l16_e32", "MoE 16L x 32E", "MoE (meta)", "moe", MoeShape(16, 32),
                  sweep=True),
        AlignCase("moe_l64_e104", "MoE 64L x 104E", "MoE (meta)", "moe", MoeShape(64, 104),
                  sweep=True),
        AlignCase("moe_l64_e256", "MoE 64L x 256E", "MoE (meta)", "moe", MoeShape(64, 256),
                  sweep=True),
        *sweep_fx,
    )


def find_align_case(name: str) -> AlignCase:
    """The align case called ``name``.

    Raises
    ------
    KeyError
        If there is none; the message lists the known names.
    """
    for case in align_cases():
        if case.name == name:
            return case
    raise KeyError(f"no align case {name!r}; known: {', '.join(c.name for c in align_cases())}")


def truth_of(case: AlignCase, src: nn.Module, dst: nn.Module) -> dict[str, str] | None:
    """The right destination key of every source key, where this benchmark knows it.

    Llama and Mistral share their key names; the MoE pair's truth is
    ``corpus.scale.rename_mixtral_to_deepseek``. The vision pairs' truth lives in the accuracy
    corpus (see ``benchmarks/accuracy.py``): None here.
    """
    from corpus.scale import rename_mixtral_to_deepseek

    if case.kind == "llama":
        return {k: k for k in src.state_dict()}
    if case.kind != "moe":
        return None
    mixtral_side = dst if case.reverse else src
    renamed = {key: rename_mixtral_to_deepseek(key) for key in mixtral_side.state_dict()}
    return {b: a for a, b in renamed.items()} if case.reverse else renamed


def build_align_case(case: AlignCase) -> tuple[nn.Module, nn.Module]:
    """Build the (source, destination) modules of an align case."""
    import torch

    from corpus.scale import make_llama_pair, make_moe, make_vision_pair

    if case.kind == "vision":
        src, dst = make_vision_pair(case.spec)
    elif case.kind == "llama":
        src, dst = make_llama_pair(case.spec, "meta")
    else:
        with torch.device("meta"):
            src = make_moe(case.spec, "a", traceable=case.traceable)
            dst = make_moe(case.spec, "b", traceable=case.traceable)
    return (dst, src) if case.reverse else (src, dst)


# ------------------------------------------------------------------------------------ workers


def worker_align(events: Events, case: str) -> dict[str, Any]:
    """Time the imports, the first (cold) align and the case's warm repeats."""
    start = time.perf_counter()
    import torch  # noqa: F401

    torch_s = time.perf_counter() - start
    import archalign

    import_s = time.perf_counter() - start
    setup_torch()
    events.emit("imported", torch_s=torch_s, import_s=import_s)
    spec = find_align_case(case)
    begin = time.perf_counter()
    src, dst = build_align_case(spec)
    build_s = time.perf_counter() - begin
    n_src, n_dst = len(src.state_dict()), len(dst.state_dict())
    events.emit("built", build_s=build_s, n_src=n_src, n_dst=n_dst)
    runs = []
    plan = None
    for i in range(1 + spec.repeats):
        timer = StageTimer(events if i == 0 else None)
        events.emit("align_start", run=i)
        wall, cpu = time.perf_counter(), time.process_time()
        with timer.installed():
            plan = archalign.align(src, dst, check_outputs=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        runs.append({"wall": wall, "cpu": cpu, "stages": timer.split(wall),
                     "functions": timer.by_function()})
        events.emit("align_end", run=i, wall=wall)
    assert plan is not None
    matched = {d for m in plan.matches for d in m.dst}
    truth = truth_of(spec, src, dst)
    right = None if truth is None else sum(
        len(m.src) == 1 and len(m.dst) == 1 and truth.get(m.src[0]) == m.dst[0]
        for m in plan.matches)
    return {"import_s": import_s, "torch_import_s": torch_s, "build_s": build_s,
            "n_src": n_src, "n_dst": n_dst, "runs": runs,
            "tracers": [plan.src_tracer, plan.dst_tracer], "matched_dst": len(matched),
            "right": right, "matches": len(plan.matches), "archalign_file": archalign.__file__,
            "low": sum(m.confidence < 0.5 for m in plan.matches)}


def worker_profile(events: Events, case: str) -> dict[str, Any]:
    """Sample one align of ``case`` (snapshots go to the events, in case the worker is killed)."""
    import archalign

    setup_torch()
    src, dst = build_align_case(find_align_case(case))
    events.emit("align_start", run=0)
    start = time.perf_counter()
    with StackSampler(events=events) as sampler:
        archalign.align(src, dst, check_outputs=False)
    return {"case": case, "completed": True, "wall": time.perf_counter() - start,
            "profile": sampler.summary()}


# ------------------------------------------------------------------------------------ tables


@dataclass
class AlignRow:
    """Align measurements of one case, as the tables and the plot need them."""

    case: AlignCase  # what was measured
    status: str  # the worker's: "ok", "timeout" or "error: ..."
    n_src: int | None = None  # tensors in the source state_dict
    n_dst: int | None = None  # tensors in the destination state_dict
    import_s: float | None = None  # importing torch and archalign in the worker
    build_s: float | None = None  # building both models
    cold: float | None = None  # seconds of the first align after import
    cold_cpu: float | None = None  # its CPU seconds
    warm: float | None = None  # median of the repeats
    stages: dict[str, float] = field(default_factory=dict)  # of the first run
    functions: dict[str, float] = field(default_factory=dict)  # seconds per timed function
    killed_in: str = ""  # the function running when the time limit struck
    lower_bound: float | None = None  # for a timeout: align had run at least this long
    extrapolated: float | None = None  # for a timeout: seconds predicted from the sweep
    archalign_file: str = ""  # where the worker imported archalign from
    detail: str = ""  # the notes column: tracers, tensors matched and right, or where it was killed

    @property
    def seconds(self) -> float | None:
        """The figure that is compared with a target: the cold align, or a lower bound."""
        return self.cold if self.cold is not None else self.lower_bound


def collect_align(case: AlignCase, run: WorkerRun) -> AlignRow:
    """Turn a worker's result, or the events of a killed worker, into a row."""
    row = AlignRow(case, run.status)
    built = run.first("built")
    if built:
        row.n_src, row.n_dst, row.build_s = built["n_src"], built["n_dst"], built["build_s"]
    imported = run.first("imported")
    if imported:
        row.import_s = imported["import_s"]
    if run.result is not None:
        r = run.result
        first = r["runs"][0]
        row.cold, row.cold_cpu, row.stages, row.functions = (
            first["wall"], first["cpu"], first["stages"], first["functions"])
        warm = [x["wall"] for x in r["runs"][1:]]
        row.warm = statistics.median(warm) if warm else None
        row.archalign_file = r["archalign_file"]
        row.detail = (f"tracers {r['tracers'][0]}/{r['tracers'][1]}; {r['matched_dst']}/"
                      f"{r['n_dst']} dst tensors matched" + (
                          f", {r['right']}/{r['n_src']} right" if r["right"] is not None else "")
                      + f"; {r['low']} matches below apply's min_confidence 0.5")
        return row
    # killed or failed: rebuild what the first run finished from its events
    hello, start = run.first("hello"), run.first("align_start")
    if hello is None or start is None:
        row.detail = "did not reach align"
        return row
    # seconds of the worker's own clock (0 when it created its event file) at the kill
    end_t = run.ended - hello["epoch"]
    open_calls: dict[str, float] = {}
    for event in run.events:
        if event["event"] == "start":
            open_calls[event["function"]] = event["t"]
        elif event["event"] == "end":
            open_calls.pop(event["function"], None)
            name, seconds = event["function"], event["seconds"]
            row.functions[name] = row.functions.get(name, 0.0) + seconds
            row.stages[stage_of(name)] = row.stages.get(stage_of(name), 0.0) + seconds
    row.lower_bound = max(end_t - start["t"], 0.0)
    if open_calls:
        name, since = next(iter(open_calls.items()))
        row.killed_in = name
        running = max(end_t - since, 0.0)
        row.stages[stage_of(name)] = row.stages.get(stage_of(name), 0.0) + running
        row.functions[name] = row.functions.get(name, 0.0) + running
    row.detail = f"killed in {row.killed_in}" if row.killed_in else row.status
    return row


def align_table(rows: list[AlignRow]) -> list[str]:
    """Markdown table of align times and their split by stage."""
    lines = ["| case | tensors src/dst | status | align s (first, after import) | warm median s | "
             "cpu s | " + " | ".join(STAGES) + " | import s | build s | notes |",
             "|---|---|---|---|---|---|" + "---|" * len(STAGES) + "---|---|---|"]
    for row in rows:
        tensors = f"{row.n_src}/{row.n_dst}" if row.n_src is not None else "-"
        if row.cold is not None:
            first = format_seconds(row.cold)
        elif row.lower_bound is not None:
            first = f"> {format_seconds(row.lower_bound)}"
        else:
            first = "-"
        stage_cells = []
        for stage in STAGES:
            seconds = row.stages.get(stage)
            if seconds is None:
                stage_cells.append("-")
                continue
            killed = row.killed_in and stage_of(row.killed_in) == stage
            share = f" ({100 * seconds / row.seconds:.0f}%)" if row.seconds else ""
            stage_cells.append(("> " if killed else "") + format_seconds(seconds) + share)
        status = row.status if not row.status.startswith("error") else "error"
        lines.append(f"| {row.case.label} | {tensors} | {status} | {first} | "
                     f"{format_seconds(row.warm)} | {format_seconds(row.cold_cpu)} | "
                     + " | ".join(stage_cells) + f" | {format_seconds(row.import_s)} | "
                     f"{format_seconds(row.build_s)} | {row.detail} |")
    return lines


def function_table(rows: list[AlignRow]) -> list[str]:
    """Markdown table: seconds per function called by ``pipeline.align`` (first run)."""
    names: list[str] = []
    for row in rows:
        names += [n for n in row.functions if n not in names]
    lines = ["| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        cells = []
        for n in names:
            if n not in row.functions:
                cells.append("-")
            else:
                killed = "> " if n == row.killed_in else ""
                cells.append(killed + format_seconds(row.functions[n]))
        lines.append(f"| {row.case.label} | " + " | ".join(cells) + " |")
    return lines


def _points(rows: list[AlignRow]) -> list[Point]:
    """The rows as the scaling fit and plot see them."""
    return [Point(r.case.name, r.case.family, r.n_src, r.cold, r.lower_bound,
                  fitted=r.case.kind != "vision", sweep=r.case.sweep, target=r.case.target)
            for r in rows]


def measure_align(log: Log, *, timeout: float, profile_budget: float,
                  cases: str = "") -> Section:
    """Align every case in its own worker, profile the slowest; returns markdown and targets.

    ``timeout`` is the time limit per case in seconds (imports and model building included),
    ``profile_budget`` the seconds of sampling on the largest case that timed out, and ``cases`` a
    comma-separated selection of case names ("": all).
    """
    wanted = set(cases.split(",")) if cases else None
    chosen = [c for c in align_cases() if not wanted or c.name in wanted]
    log(f"align: {len(chosen)} cases, time limit {timeout:.0f} s each")
    rows: list[AlignRow] = []
    for case in chosen:
        run = run_worker(worker_align, timeout, case=case.name)
        row = collect_align(case, run)
        rows.append(row)
        shown = (format_seconds(row.cold) if row.cold is not None
                 else f"> {format_seconds(row.lower_bound)}")
        log(f"  {case.name:<12} {row.status:<8} tensors {row.n_src}/{row.n_dst}  align {shown} s"
            f"  (worker {run.seconds:.0f} s) {row.detail}")
        if run.status.startswith("error") and run.stderr_tail.strip():
            log("    " + run.stderr_tail.strip().splitlines()[-1][:200])
    main_rows = [r for r in rows if not r.case.sweep]
    imported = sorted({str(Path(r.archalign_file).parent.parent) for r in rows if r.archalign_file})
    log(f"  archalign imported from {', '.join(imported) or '?'}")
    lines = ["## 1. Align time", "",
             "`archalign.align(src, dst, check_outputs=False)`: the first call after `import "
             "archalign` and building both models (what the targets are checked on), and the "
             "median of the warm repeats where there are some. Stage split of the first call, "
             f"measured by timing the functions `pipeline.align` calls ({STAGE_LEGEND}). "
             "`>`: the case hit the time limit "
             f"({timeout:.0f} s per case, imports and model building included) in that "
             "stage; the figure is a lower bound. \"right\": matches that agree with the known "
             "truth (Llama/Mistral: same key; MoE: the renames in `corpus.scale.MOE_RENAMES`).", ""]
    lines += align_table(main_rows)
    if any(r.case.sweep for r in rows):
        lines += ["", "### Scaling sweep (more points for the plot)", ""]
        lines += align_table([r for r in rows if r.case.sweep])
    grown = fit_growth(_points(rows))
    if grown:
        lines += ["", "Growth of align time with the tensor count n (completed runs; slope of log "
                  "time against log n, fitted over all points / between the two largest): " +
                  "; ".join(f"{k}: t ~ n^{g.fit:.2f} / n^{g.local:.2f}" for k, g in grown.items())
                  + "."]
        for row in rows:
            g = grown.get(row.case.family)
            if row.cold is None and row.n_src and g is not None:
                row.extrapolated = g.predict(row.n_src)
                lines.append(f"Extrapolated from the largest completed point with the fitted slope "
                             f"(rough), {row.case.name} ({row.n_src} tensors) would take about "
                             f"{row.extrapolated:.0f} s.")
    lines += ["", "### Seconds per function called by `pipeline.align` (first call)", ""]
    lines += function_table(rows)
    targets: list[Target] = []
    for row in main_rows:
        if row.case.target is None:
            continue
        ok = row.cold is not None and row.cold < row.case.target
        measured = (f"{format_seconds(row.cold)} s" if row.cold is not None else
                    f"{row.status}: > {format_seconds(row.lower_bound)} s")
        if row.extrapolated is not None:
            measured += f"; roughly {row.extrapolated:.0f} s extrapolated from the sweep"
        if row.warm is not None:
            measured += f" (warm median {format_seconds(row.warm)} s)"
        targets.append(Target(f"{row.case.label}: align < {row.case.target:g} s", measured, ok))
    note = plot_scaling(_points(rows), RESULTS / "speed.png")
    log(note or f"saved {(RESULTS / 'speed.png').relative_to(ROOT)}")

    # sample the slowest completed case to its end, and the first seconds of the largest killed one
    to_profile: list[tuple[AlignRow, float]] = []
    done = [r for r in rows if r.cold is not None and not r.case.sweep]
    if done:
        slowest = max(done, key=lambda r: r.cold or 0.0)
        to_profile.append((slowest, 2 * (slowest.cold or 0.0) + (slowest.build_s or 0.0) + 60))
    killed = [r for r in rows if r.cold is None and r.status == "timeout"]
    if killed:
        largest = max(killed, key=lambda r: r.n_src or 0)
        to_profile.append((largest, profile_budget + (largest.build_s or 0.0) + 15))
    if to_profile:
        lines += ["", "### Where the time goes (sampling profiler)", ""]
    listing: list[str] = []
    for row, limit in to_profile:
        log(f"profiling {row.case.name} (up to {limit:.0f} s)")
        run = run_worker(worker_profile, limit, case=row.case.name)
        lines += profile_tables(row.case.name, row.case.label, run)
        listing += [f"===== {row.case.label} =====",
                    *profile_tables(row.case.name, row.case.label, run, limit=40)]
    if listing:
        write_result("speed_profile.txt", "\n".join(listing) + "\n")
    return Section(lines, targets)


