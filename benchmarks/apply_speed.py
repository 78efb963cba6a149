"""Apply overhead: ``plan.apply(dst)`` against ``dst.load_state_dict`` of the same tensors.

Per case (`apply_cases`), one worker process aligns the pair, then times ``plan.apply(dst)``
(atomic, the default), ``plan.apply(dst, atomic=False)`` and, as the baseline in the same process,
``dst.load_state_dict`` of the plan's source tensors under the destination's names
(`benchmarks._instruments.planned_state`): one warm-up each, then interleaved repeats, medians. The
table gives every time as a ratio to that baseline. One case also samples a single ``apply`` to
show where its time goes.

Run through ``python benchmarks/speed.py --only apply``.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from dataclasses import dataclass
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
from benchmarks._instruments import StackSampler, planned_state

if TYPE_CHECKING:
    from torch import nn

TARGET_APPLY_RATIO = 1.2  # the target: apply <= 1.2x load_state_dict


@dataclass(frozen=True)
class ApplyCase:
    """A pair whose ``plan.apply`` is timed against ``load_state_dict``."""

    name: str  # short name
    label: str  # what the table shows
    kind: str  # "vision" (spec: torchvision and timm names) or "llama" (spec: a LlamaShape)
    spec: Any  # see kind
    repeats: int  # interleaved timed rounds after the warm-up
    profile: bool = False  # also sample one apply (to see where its time goes)


@functools.cache
def apply_cases() -> tuple[ApplyCase, ...]:
    """Every apply case (built on first use: importing ``corpus`` imports torch)."""
    from corpus.scale import LLAMA_HALF_B

    return (
        ApplyCase("resnet50", "torchvision resnet50 -> timm resnet50", "vision",
                  ("resnet50", "resnet50"), 11),
        ApplyCase("vit_b_16", "torchvision vit_b_16 -> timm vit_base_patch16_224", "vision",
                  ("vit_b_16", "vit_base_patch16_224"), 5, profile=True),
        ApplyCase("llama_0.5b", "Llama-0.5B -> Mistral-0.5B (CPU, fp32)", "llama", LLAMA_HALF_B, 3),
    )


def find_apply_case(name: str) -> ApplyCase:
    """The apply case called ``name``.

    Raises
    ------
    KeyError
        If there is none; the message lists the known names.
    """
    for case in apply_cases():
        if case.name == name:
            return case
    raise KeyError(f"no apply case {name!r}; known: {', '.join(c.name for c in apply_cases())}")


def build_apply_case(case: ApplyCase) -> tuple[nn.Module, nn.Module]:
    """Build the (source, destination) modules of an apply case, with real memory on the CPU."""
    from corpus.scale import fill_distinct, make_llama_pair, make_vision_pair

    if case.kind == "llama":
        src, dst = make_llama_pair(case.spec, "meta")
        src, dst = src.to_empty(device="cpu"), dst.to_empty(device="cpu")
        fill_distinct(src)
        fill_distinct(dst)
        return src, dst
    return make_vision_pair(case.spec)


def worker_apply(events: Events, case: str) -> dict[str, Any]:
    """Median times of ``plan.apply`` (atomic and not) and of ``load_state_dict``, interleaved."""
    import archalign

    setup_torch()
    spec = find_apply_case(case)
    src, dst = build_apply_case(spec)
    n_bytes = sum(t.numel() * t.element_size() for t in dst.state_dict().values())
    plan = archalign.align(src, dst, check_outputs=False)
    report = plan.apply(dst)  # warm-up
    mapped = planned_state(plan, src, set(report.loaded))
    strict = len(mapped) == len(dst.state_dict())
    dst.load_state_dict(mapped, strict=strict)  # warm-up
    plan.apply(dst, atomic=False)  # warm-up
    timings: dict[str, list[float]] = {"apply": [], "apply_nonatomic": [], "load_state_dict": []}
    for _ in range(spec.repeats):
        for name in timings:
            gc.collect()
            start = time.perf_counter()
            if name == "load_state_dict":
                dst.load_state_dict(mapped, strict=strict)
            else:
                plan.apply(dst, atomic=name == "apply")
            timings[name].append(time.perf_counter() - start)
    profile = None
    if spec.profile:
        with StackSampler(interval=0.001) as sampler:
            plan.apply(dst)
        profile = sampler.summary()
    return {"case": case, "tensors": len(dst.state_dict()), "loaded": len(report.loaded),
            "bytes": n_bytes, "repeats": spec.repeats, "strict_baseline": strict,
            "median": {k: statistics.median(v) for k, v in timings.items()},
            "min": {k: min(v) for k, v in timings.items()},
            "all": timings, "profile": profile}


def measure_apply(log: Log) -> Section:
    """Time ``plan.apply`` against ``load_state_dict`` per case; returns markdown and targets."""
    log("apply vs load_state_dict")
    lines = ["## 2. Apply overhead", "",
             "`plan.apply(dst)` (default: atomic, keeps a copy of every written tensor until all "
             "writes succeeded), `plan.apply(dst, atomic=False)`, and `dst.load_state_dict` of the "
             "same tensors under the destination's names; one process per pair, one warm-up each, "
             "then interleaved repeats; medians.", "",
             "| pair | tensors loaded | MiB | repeats | apply s | apply(atomic=False) s | "
             "load_state_dict s | apply / load_state_dict | non-atomic / load_state_dict | "
             "apply / load_state_dict, best of each |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    targets: list[Target] = []
    profiles: list[tuple[str, dict[str, Any]]] = []
    for case in apply_cases():
        what = f"{case.label}: apply <= {TARGET_APPLY_RATIO}x load_state_dict"
        run = run_worker(worker_apply, 900, case=case.name)
        if run.result is None:
            lines.append(f"| {case.label} | - | - | - | {run.status} | - | - | - | - | - |")
            targets.append(Target(what, run.status, None))
            log(f"  {case.name}: {run.status}")
            continue
        r = run.result
        med = r["median"]
        ratio = med["apply"] / med["load_state_dict"]
        ratio_na = med["apply_nonatomic"] / med["load_state_dict"]
        lines.append(f"| {case.label} | {r['loaded']}/{r['tensors']} | {format_mib(r['bytes'])} | "
                     f"{r['repeats']} | {med['apply']:.4f} | {med['apply_nonatomic']:.4f} | "
                     f"{med['load_state_dict']:.4f} | {ratio:.2f}x | {ratio_na:.2f}x | "
                     f"{r['min']['apply'] / r['min']['load_state_dict']:.2f}x |")
        targets.append(Target(what, f"{ratio:.2f}x (atomic=False: {ratio_na:.2f}x)",
                              ratio <= TARGET_APPLY_RATIO))
        log(f"  {case.name}: apply {med['apply']:.4f} s, atomic=False {med['apply_nonatomic']:.4f}"
            f" s, load_state_dict {med['load_state_dict']:.4f} s -> {ratio:.2f}x / {ratio_na:.2f}x")
        if r["profile"]:
            profiles.append((case.label, r["profile"]))
    for label, profile in profiles:
        lines += ["", f"Where one `plan.apply(dst)` of {label} spends its time "
                  f"({profile['samples']} stack samples, one per ms; % of samples):", "",
                  "| innermost archalign line | % |", "|---|---|"]
        lines += [f"| `{w}` | {100 * x:.1f} |" for w, x in profile["innermost"][:6]]
        lines += ["", "| innermost frame of all | % |", "|---|---|"]
        lines += [f"| `{w}` | {100 * x:.1f} |" for w, x in profile["leaves"][:6]]
    return Section(lines, targets)
