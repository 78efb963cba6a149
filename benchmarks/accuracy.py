"""Accuracy benchmark: archalign against the naive baselines and the published peers.

Every method runs in this process on the same pairs (`corpus/`): real models written
by others, random init, with a hand-written ground truth proved by a converter. Per pair and
method it prints the destination tensors mapped to the right source (precision and recall
against the truth; a mapping whose shapes do not fit counts, as the peers' mappings do), wrong
mappings, wrong ones the method itself scored >= 0.9, whether the outputs
then equal the source's, and wall time; then a reliability table of archalign's confidences.
The table is saved as ``benchmarks/results/accuracy.md``.

Run: ``python benchmarks/accuracy.py`` (peers need ``pip install -e '.[bench]'``; a missing one is
reported as such). ``PYTHONHASHSEED`` is pinned to 0 because lit-wsl's answers depend on it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if os.environ.get("PYTHONHASHSEED") != "0":  # lit-wsl breaks ties in set order: pin it
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import itertools  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import archalign  # noqa: E402
from benchmarks._harness import library_versions, write_result  # noqa: E402
from benchmarks.peers import PEERS, apply_peer  # noqa: E402
from corpus import PAIRS, Pair, run_model  # noqa: E402

TOLERANCE = 1e-4  # max abs output difference that counts as "reproduces the source"
HIGH = 0.9  # a wrong load scored at least this is "confident and wrong"


@dataclass
class Row:
    """One method on one pair."""

    pair: str
    method: str
    exact: bool
    truth: int  # destination keys the truth maps
    loaded: int  # destination keys the method mapped (loaded, or proposed with a shape mismatch)
    correct: int  # loaded from exactly the truth's source key(s)
    wrong: int  # loaded from anything else
    wrong_high: int  # wrong and scored >= HIGH by the method itself
    diff: float | None  # max |src - dst| after the load (exact pairs), None otherwise
    seconds: float
    error: str = ""

    @property
    def precision(self) -> float:
        return self.correct / self.loaded if self.loaded else 1.0

    @property
    def recall(self) -> float:
        return self.correct / self.truth if self.truth else 1.0

    @property
    def reproduces(self) -> bool:
        return self.diff is not None and self.diff <= TOLERANCE


def _score(pair: Pair, truth: dict[str, tuple[str, ...]], mapping: dict[str, tuple[str, ...]],
           scores: dict[str, float]) -> tuple[int, int, int]:
    correct = wrong = wrong_high = 0
    for dst_key, src_keys in mapping.items():
        if dst_key in truth and set(src_keys) == set(truth[dst_key]):
            correct += 1
        else:
            wrong += 1
            wrong_high += scores.get(dst_key, 0.0) >= HIGH
    return correct, wrong, wrong_high


def _diff(pair: Pair, src: nn.Module, dst: nn.Module, inputs: Any) -> float | None:
    if not pair.exact:
        return None
    try:
        return float((run_model(src, inputs) - run_model(dst, inputs)).abs().max())
    except RuntimeError:
        return float("inf")


def run_archalign(pair: Pair, reliability: list[tuple[float, bool]]) -> Row:
    src, dst = pair.make_src(), pair.make_dst()
    truth = pair.truth(src, dst)
    start = time.perf_counter()
    plan = archalign.align(src, dst)
    report = plan.apply(dst)
    seconds = time.perf_counter() - start
    loaded = set(report.loaded)
    mapping: dict[str, tuple[str, ...]] = {}
    scores: dict[str, float] = {}
    for match in plan.matches:
        for key in match.dst:
            ok = key in truth and set(match.src) == set(truth[key])
            reliability.append((match.confidence, ok))
            if key in loaded:
                mapping[key] = match.src
                scores[key] = match.confidence
    for mm in plan.mismatches:  # proposed but not loaded (shapes differ): a mapping, score 0
        for key in mm.dst:
            mapping.setdefault(key, mm.src)
    correct, wrong, wrong_high = _score(pair, truth, mapping, scores)
    return Row(pair.name, "archalign", pair.exact, len(truth), len(mapping), correct, wrong,
               wrong_high, _diff(pair, src, dst, pair.make_inputs()), seconds)


def run_peer(pair: Pair, name: str, fn: Callable[..., Any]) -> Row:
    src, dst = pair.make_src(), pair.make_dst()
    truth = pair.truth(src, dst)
    inputs = pair.make_inputs()
    result = fn(src, dst, inputs)
    if result.error:
        return Row(pair.name, name, pair.exact, len(truth), 0, 0, 0, 0,
                   _diff(pair, src, dst, inputs), result.seconds, result.error.splitlines()[0][:60])
    apply_peer(result, dst)
    correct, wrong, wrong_high = _score(pair, truth, result.mapping, result.scores)
    return Row(pair.name, name, pair.exact, len(truth), len(result.mapping), correct, wrong,
               wrong_high, _diff(pair, src, dst, inputs), result.seconds)


def ambiguity_reliability() -> list[tuple[float, bool]]:
    """(confidence, correct) of every match on models with a layer deleted or inserted, where the
    truth is known but structure alone often cannot find it (runs of identical layers)."""
    out: list[tuple[float, bool]] = []
    for depth in range(3, 8):
        for k in range(depth):
            for edit in ("delete", "insert"):
                torch.manual_seed(depth * 10 + k)
                widths = [6] + [8] * depth
                if edit == "delete":
                    new = widths[:k + 1] + widths[k + 2:] if k + 1 < len(widths) - 1 else None
                else:
                    new = [*widths[:k + 1], 8, *widths[k + 1:]]
                if new is None or len(new) < 2:
                    continue
                src = nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(widths)])
                dst = nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(new)])
                plan = archalign.align(src, dst)
                for match in plan.matches:
                    s, d = int(match.src[0].split(".")[0]), int(match.dst[0].split(".")[0])
                    if edit == "delete":
                        truth = s if s < k + 1 else (s - 1 if s > k + 1 else -1)
                    else:
                        truth = s if s < k + 1 else s + 1
                    out.append((match.confidence, d == truth))
    return out


def _reliability_table(pairs: list[tuple[float, bool]]) -> list[str]:
    lines = ["| confidence | matches | correct | fraction correct |", "|---|---|---|---|"]
    edges = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001]
    for lo, hi in itertools.pairwise(edges):
        inside = [ok for c, ok in pairs if lo <= c < hi]
        if inside:
            lines.append(f"| [{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'} | "
                         f"{len(inside)} | {sum(inside)} | {sum(inside) / len(inside):.3f} |")
    return lines


def _fmt(row: Row) -> str:
    diff = "-" if row.diff is None else ("inf" if row.diff == float("inf") else f"{row.diff:.1e}")
    same = "-" if row.diff is None else ("yes" if row.reproduces else "NO")
    return (f"| {row.pair} | {row.method} | {row.correct}/{row.truth} | {row.precision:.3f} | "
            f"{row.recall:.3f} | {row.wrong} | {row.wrong_high} | {same} | {diff} | "
            f"{row.seconds:.2f} | {row.error} |")


def main() -> None:
    torch.set_num_threads(2)
    rows: list[Row] = []
    reliability: list[tuple[float, bool]] = []
    methods = ["archalign", *PEERS]
    for pair in PAIRS:
        rows.append(run_archalign(pair, reliability))
        for name, fn in PEERS.items():
            rows.append(run_peer(pair, name, fn))
        for row in rows[-len(methods):]:
            print(_fmt(row), flush=True)

    lines = ["# Accuracy: archalign vs baselines and peers", "",
             f"Generated by `python benchmarks/accuracy.py` ({library_versions('torch')}). "
             f"correct = destination tensors mapped to exactly the truth's source (loaded, or "
             f"proposed but not loaded because the shapes differ); "
             f"wrong>=0.9 = wrong loads the method itself scored >= {HIGH}; "
             f"same out = max |src - dst| <= {TOLERANCE} after the load (exact pairs only).", "",
             "| pair | method | correct/truth | precision | recall | wrong | wrong>=0.9 | "
             "same out | max diff | seconds | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_fmt(r) for r in rows]
    lines += ["", "## Summary per method", "",
              "| method | exact pairs reproduced | tensors correct | wrong | wrong>=0.9 | errors |",
              "|---|---|---|---|---|---|"]
    n_exact = sum(p.exact for p in PAIRS)
    for method in methods:
        mine = [r for r in rows if r.method == method]
        lines.append(
            f"| {method} | {sum(r.reproduces for r in mine if r.exact)}/{n_exact} | "
            f"{sum(r.correct for r in mine)}/{sum(r.truth for r in mine)} | "
            f"{sum(r.wrong for r in mine)} | {sum(r.wrong_high for r in mine)} | "
            f"{sum(bool(r.error) for r in mine)} |")
    lines += ["", "## archalign reliability (every proposed match, loaded or not)", "",
              *_reliability_table(reliability)]
    lines += ["", "## archalign reliability under ambiguity (MLPs of identical layers with one "
              "layer deleted or inserted; the truth is the edit)", "",
              *_reliability_table(ambiguity_reliability())]
    text = "\n".join(lines) + "\n"
    out = write_result("accuracy.md", text)
    print("\n" + "\n".join(lines[lines.index("## Summary per method"):]))
    print(f"\nsaved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
