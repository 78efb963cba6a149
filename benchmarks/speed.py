"""Speed and memory benchmark: align time by stage, apply overhead, peak memory, conversion throughput.

Four measurements, each checked against the targets of the speed issues, one module each:

1. **Align time** (``benchmarks/align_speed.py``) of ``archalign.align(src, dst,
   check_outputs=False)`` on real architectures (torchvision -> timm ResNet-50 and ViT-B/16; Hugging
   Face Llama -> Mistral at the 7B and 70B configurations on the meta device; a Mixture-of-Experts
   pair with more than 10^4 tensors, both directions), by stage, with a scaling sweep
   (``benchmarks/scaling.py``: growth fit and plot) and sampled profiles of the slowest cases.
2. **Apply overhead** (``benchmarks/apply_speed.py``): ``plan.apply(dst)`` against
   ``dst.load_state_dict`` of the same tensors, in one process, interleaved, after a warm-up.
3. **Peak memory from a sharded checkpoint** (``benchmarks/memory.py``): archalign's streaming
   load of a five-shard safetensors checkpoint against the Hugging Face way of loading it.
4. **Conversion throughput** (``benchmarks/convert_speed.py``): ``convert_checkpoint`` of a 2.5 GB
   checkpoint on one process and on two torchrun ranks, against the floor (safetensors
   ``load_file`` + ``save_file`` of the same bytes), with peak RSS per process.

Every measurement runs in a fresh worker process (``benchmarks/_harness.py``) that imports one
frozen copy of archalign. Results: a summary on stdout, ``benchmarks/results/speed.md`` (all
tables and the targets' verdicts), ``benchmarks/results/speed.png`` (align time against tensor
count) and ``benchmarks/results/speed_profile.txt`` (longer profile listings).

Run: ``python benchmarks/speed.py`` (the plot needs ``pip install matplotlib``). Options:
``--timeout`` seconds per align case (default 120), ``--profile-budget`` (default 60), ``--only
align,apply,memory,convert``, ``--cases resnet50,llama7b,...``. 12-17 minutes on 2 CPU cores (more
when a case runs into its time limit).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import align_speed, apply_speed, convert_speed, memory  # noqa: E402
from benchmarks._harness import (  # noqa: E402
    RESULTS,
    Section,
    Target,
    archalign_snapshot,
    git,
    library_versions,
    source_digest,
    write_result,
)

LIBRARIES = ("torch", "transformers", "timm", "torchvision", "numpy", "scipy", "networkx")


def targets_table(rows: list[tuple[str, Target]]) -> list[str]:
    """Markdown table of every target's verdict (PASS, FAIL, or n/a when it was not measured),
    each row with the number of the section that measured it."""
    lines = ["## Targets (from the issue)", "", "| section | target | measured | verdict |",
             "|---|---|---|---|"]
    for number, (what, measured, ok) in rows:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"| {number} | {what} | {measured} | {verdict} |")
    return lines


def section_number(lines: list[str]) -> str:
    """The number of a section (``## 4. Conversion throughput`` -> ``"4"``)."""
    match = re.match(r"## (\d+)\.", lines[0]) if lines else None
    if match is None:
        raise ValueError(f"a section must start with '## <n>. <title>', not {lines[:1]}")
    return match.group(1)


def merged(old: str, header: list[str], new: dict[str, list[str]],
           targets: list[tuple[str, Target]]) -> str:
    """The results file: the sections in ``new`` (number -> lines) replace those of the same
    number in ``old`` (the file a previous run wrote); the others, and their rows of the targets
    table, are kept as they were (each says where it was measured in its provenance line)."""
    kept: dict[str, list[str]] = {}
    rows: list[tuple[str, Target]] = []
    current: list[str] | None = None
    in_targets = False
    for line in old.splitlines():
        if line.startswith("## "):
            in_targets = line.startswith("## Targets")
            number = re.match(r"## (\d+)\.", line)
            current = kept.setdefault(number.group(1), []) if number and not in_targets else None
        if in_targets:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| ") and len(cells) == 4 and cells[0].isdigit():
                rows.append((cells[0], Target(cells[1], cells[2],
                                              {"PASS": True, "FAIL": False}.get(cells[3]))))
        elif current is not None:
            current.append(line)
    sections = {**{n: b for n, b in kept.items() if n not in new}, **new}
    lines = list(header)
    for key in sorted(sections, key=int):
        block = sections[key]
        while block and not block[-1].strip():
            block = block[:-1]
        lines += [*block, ""]
    every = [r for r in rows if r[0] not in new] + targets
    lines += targets_table(sorted(every, key=lambda r: int(r[0])))
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every measurement in worker processes, print the tables, save markdown and plot."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per align case, imports and model building included")
    parser.add_argument("--profile-budget", type=float, default=60.0,
                        help="seconds of sampling on the largest case that timed out")
    parser.add_argument("--only", default="align,apply,memory,convert",
                        help="comma-separated sections: align, apply, memory, convert")
    parser.add_argument("--cases", default="", help="comma-separated align case names (all)")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, flush=True)

    sections = set(args.only.split(","))
    RESULTS.mkdir(parents=True, exist_ok=True)
    new: dict[str, list[str]] = {}
    targets: list[tuple[str, Target]] = []
    # every worker imports one frozen copy of archalign, even if the checkout changes meanwhile
    with archalign_snapshot() as digest:
        dirty = " + uncommitted changes" if git("status", "--porcelain", "archalign") else ""
        at = f"git {git('rev-parse', '--short', 'HEAD')}{dirty}, archalign/*.py digest {digest}"
        header = ["# Speed and memory: archalign", "",
                  f"Generated by `python benchmarks/speed.py` ({os.cpu_count()} CPUs, Python "
                  f"{platform.python_version()}; {library_versions(*LIBRARIES)}). A run with "
                  "`--only` replaces its own sections and keeps the others: each section says "
                  "at which git commit and archalign/*.py digest it was measured (archalign is "
                  "copied when the run starts; every worker imports that copy). Every "
                  "measurement runs in a fresh worker process with `torch.set_num_threads(2)`; "
                  "times are wall-clock.", ""]
        measurements = (
            ("align", lambda: align_speed.measure_align(
                log, timeout=args.timeout, profile_budget=args.profile_budget, cases=args.cases)),
            ("apply", lambda: apply_speed.measure_apply(log)),
            ("memory", lambda: memory.measure_memory(log)),
            ("convert", lambda: convert_speed.measure_convert(log)),
        )
        for name, measure in measurements:
            if name in sections:
                started, load_before = time.perf_counter(), os.getloadavg()[0]
                section: Section = measure()
                number = section_number(section.lines)
                changed = source_digest(ROOT / "archalign") != digest
                provenance = (
                    f"_Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at {at}"
                    f"{' (the checkout changed during the run; this copy was measured)' if changed else ''}"
                    f"; machine load average (1 min) {load_before:.2f} at the start, "
                    f"{os.getloadavg()[0]:.2f} at the end (other jobs share the CPUs when it "
                    f"exceeds 2); {time.perf_counter() - started:.0f} s._")
                new[number] = [section.lines[0], "", provenance, *section.lines[1:]]
                targets += [(number, t) for t in section.targets]
    path = RESULTS / "speed.md"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    text = merged(old, header, new, targets)
    path = write_result("speed.md", text)
    print("\n" + "\n".join(line for n in sorted(new, key=int) for line in new[n]))
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
