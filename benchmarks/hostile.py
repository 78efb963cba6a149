"""Hostile-input fuzzing, the long run of tests/test_hostile.py (docs/security.md).

Targets, each fed by one engine and judged by the oracles of tests/hostile.py (an outcome is
"ok", a refusal of the error family by class, or a *breach*: an exception outside the family, a
destination changed by a refused call, a file outside the checkpoint's folder opened, a planted
payload that ran):

``plan``         the bytes of a plan file (``Plan.from_json``, every renderer, round trip, apply)
``safetensors``  the bytes of a ``.safetensors`` file (header parsing, then every tensor applied)
``index``        the bytes of a ``model.safetensors.index.json`` next to two shards and a file
                 outside the folder (and a link to it) that the index may name
``pickle``       the bytes of a ``.pt`` file (``torch.load(weights_only=True)``, zip or old format)
``dcp``          the bytes of a DCP folder's ``.metadata`` (read without unpickling code)
``keys``         state_dict keys of any text (align, render, round trip, convert)
``interrupt``    not fuzzed but timed: a Ctrl-C at a random moment of ``apply`` from a safetensors
                 file, many times; every run must end loaded or with ``KeyboardInterrupt``

Engines: ``atheris`` (coverage-guided libFuzzer over archalign's instrumented code; each target in
its own process, seeded with valid inputs; ``pip install atheris``, in the ``bench`` extra) and
``hypothesis`` (the strategies of tests/test_hostile.py with a large budget: the fallback where
atheris does not install). Prints, per target: cases run, outcomes by class, breaches by class
(with the first input of each saved under ``--out``), and the time taken.

    python -m benchmarks.hostile --seconds 120            # every target, atheris
    python -m benchmarks.hostile --engine hypothesis --examples 5000 --targets plan pickle
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("plan", "safetensors", "index", "pickle", "dcp", "keys")


class Tally:
    """Outcomes of one target, written to ``path`` as JSON every second and at the end (a
    libFuzzer process ends by calling exit(), without running Python's cleanups)."""

    def __init__(self, path: Path, target: str) -> None:
        self.path, self.target = path, target
        self.cases = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.breaches: collections.Counter[str] = collections.Counter()
        self.start = self.last = time.perf_counter()

    def run(self, oracle: Callable[[], str], data: bytes) -> None:
        from tests.hostile import Breach

        self.cases += 1
        try:
            self.outcomes[oracle()] += 1
        except Breach as exc:
            name = str(exc).split(":")[0][:80]
            if not self.breaches[name]:
                (self.path.parent / f"breach-{self.target}-{len(self.breaches)}.bin").write_bytes(data)
            self.breaches[name] += 1
        except Exception as exc:  # the oracle itself failed: count it as a breach too
            self.breaches[f"oracle {type(exc).__name__}"] += 1
        if time.perf_counter() - self.last > 1.0:
            self.save()

    def save(self) -> None:
        self.last = time.perf_counter()
        self.path.write_text(json.dumps({
            "target": self.target, "cases": self.cases, "seconds": round(self.last - self.start, 1),
            "outcomes": dict(self.outcomes), "breaches": dict(self.breaches)}))


def _oracles(work: Path) -> dict[str, Callable[[bytes], str]]:
    """Target name -> a function of the input bytes (imports tests.hostile: instrument first)."""
    from tests import hostile

    def keys(data: bytes) -> str:
        text = data.decode("utf-8", "replace")
        return hostile.run_keys(list(dict.fromkeys(k for k in text.split("\n")[:6] if k)) or ["k"],
                                work)

    (work / "dcp").mkdir(exist_ok=True)
    if not (work / "dcp" / ".metadata").exists():
        hostile.dcp_folder(work / "dcp")
    return {"plan": hostile.run_plan,
            "safetensors": lambda d: hostile.run_safetensors(d, work),
            "index": lambda d: hostile.run_index(d, work),
            "pickle": lambda d: hostile.run_pickle(d, work),
            "dcp": lambda d: hostile.run_dcp_metadata(d, work / "dcp"),
            "keys": keys}


def _seeds(target: str, work: Path) -> list[bytes]:
    """Valid (and planted) inputs the fuzzer starts from."""
    import io

    import torch

    from tests import hostile

    if target == "plan":
        return [hostile.base_plan().to_json().encode()]
    if target == "safetensors":
        return [hostile.valid_safetensors()]
    if target == "index":
        return [json.dumps({"metadata": {"total_size": 1}, "weight_map": {
            "w.weight": "model-1.safetensors", "n": "model-2.safetensors"}}).encode()]
    if target == "pickle":
        buffer = io.BytesIO()
        torch.save(hostile.source_state(), buffer)
        old = io.BytesIO()
        torch.save(hostile.source_state(), old, _use_new_zipfile_serialization=False)
        return [buffer.getvalue(), old.getvalue(), *hostile.planted_pickles(work)]
    if target == "dcp":
        return [(work / "dcp" / ".metadata").read_bytes()]
    return [b"a.weight\nb[/]\n\x1b[31mc\n__metadata__"]


# JSON values a structure-aware mutation puts in place of a part of a plan or index
_ODD: list[Any] = [None, True, 0, 1, -1, 2, 3, 2**31, 2**63, 2**64, 10**30, 1.5, 1e400, -1e400, "", "x",
        "../outside.safetensors", "/etc/passwd", "link.safetensors", "model-1.safetensors",
        "model.safetensors.index.json", "\u0000", "\ud800", "[/]", "\x1b[31m", "regroup",
        "split", "concat", "reshape", "transpose", "__metadata__", [], {}, [[]], [1], [0, 0],
        [3], [1, 12], [2, 2], {"op": "regroup", "groups": [3]}]


def _tamper_json(obj: Any, rng: Any) -> Any:
    """Replace, delete, duplicate or wrap one part of ``obj`` (structure-aware mutation)."""
    if not isinstance(obj, (dict, list)) or not obj:
        return rng.choice(_ODD)
    node = obj
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = rng.choice(keys)
        child = node[key]
        if isinstance(child, (dict, list)) and child and rng.random() < 0.7:
            node = child
            continue
        action = rng.random()
        if action < 0.5:
            node[key] = rng.choice(_ODD)
        elif action < 0.65:
            del node[key]
        elif action < 0.8:
            node[key] = [child] * rng.randint(1, 3)
        elif isinstance(node, dict):
            node[rng.choice(["src", "dst", "ops", "shape", "sizes", "groups", "weight_map",
                             "metadata", "confidence", "extra"])] = child
        else:
            node.append(child)
        return obj


def _mutator(target: str) -> Callable[[bytes, int, int], bytes] | None:
    """A structure-aware libFuzzer mutator for the JSON targets (and the safetensors header):
    parse, tamper one part, write back; otherwise, or sometimes, atheris's byte mutation."""
    if target not in ("plan", "index", "safetensors"):
        return None
    import random
    import struct

    import atheris

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.25:
            return atheris.Mutate(data, max_size)
        head, body, tail = b"", data, b""
        if target == "safetensors":
            if len(data) < 8:
                return atheris.Mutate(data, max_size)
            size = struct.unpack("<Q", data[:8])[0]
            body, tail = data[8:8 + size], data[8 + size:]
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return atheris.Mutate(data, max_size)
        text = json.dumps(_tamper_json(obj, rng)).encode()
        if target == "safetensors":
            size = len(text) if rng.random() < 0.9 else rng.choice([0, 1, len(text) + 8, 2**63])
            head = struct.pack("<Q", size)
        return (head + text + tail)[:max_size]

    return mutate


# --------------------------------------------------------------------------- engines


def fuzz_atheris(target: str, seconds: float, runs: int, out: Path) -> None:
    """In this process: instrument archalign, then fuzz ``target`` until the budget ends."""
    import atheris

    with atheris.instrument_imports(include=["archalign"]):
        import archalign
        import archalign.checkpoint
        import archalign.distributed
        import archalign.html
        import archalign.plan  # noqa: F401
    work = Path(tempfile.mkdtemp(prefix=f"hostile-{target}-"))
    oracle = _oracles(work)[target]
    corpus = work / "corpus"
    corpus.mkdir()
    for n, seed in enumerate(_seeds(target, work)):
        (corpus / f"seed-{n}").write_bytes(seed)
    tally = Tally(out / f"{target}.json", target)

    def one(data: bytes) -> None:
        tally.run(lambda: oracle(data), data)
        if runs and tally.cases >= runs:
            tally.save()

    atheris.Setup([sys.argv[0], f"-max_total_time={int(seconds)}", f"-runs={runs or -1}",
                   "-rss_limit_mb=6144", "-max_len=65536", "-print_final_stats=0",
                   f"-artifact_prefix={out}/artifact-{target}-", str(corpus)],
                  one, custom_mutator=_mutator(target))
    try:
        atheris.Fuzz()
    finally:
        tally.save()


def fuzz_hypothesis(target: str, examples: int, out: Path) -> None:
    """In this process: the matching tests of tests/test_hostile.py with ``examples`` each."""
    os.environ["ARCHALIGN_HOSTILE_EXAMPLES"] = str(examples)
    from hypothesis.errors import HypothesisException

    from tests import hostile, test_hostile

    tests = {"plan": ["test_a_tampered_plan_is_refused_or_works_everywhere"],
             "safetensors": ["test_a_lying_safetensors_file_is_refused_or_read_whole"],
             "index": ["test_a_tampered_index_reads_nothing_outside_its_folder"],
             "pickle": ["test_a_pickle_of_odd_objects_is_refused_or_read"],
             "dcp": ["test_tampered_dcp_metadata_runs_nothing_and_reads_only_its_folder"],
             "keys": ["test_keys_of_any_text_align_render_round_trip_and_convert"]}[target]
    tally = Tally(out / f"{target}.json", target)
    work = Path(tempfile.mkdtemp(prefix=f"hostile-{target}-"))
    kwargs: dict[str, Any] = {"folder": work}
    if target == "dcp":
        kwargs = {"dcp": (work / "dcp", hostile.dcp_folder(work / "dcp"))}
    for name in tests:
        try:
            getattr(test_hostile, name)(**kwargs)
        except (hostile.Breach, HypothesisException, AssertionError) as exc:
            tally.breaches[str(exc).split(":")[0][:80]] += 1
    tally.cases = sum(hostile.TALLY[target].values())
    tally.outcomes.update(hostile.TALLY[target])
    tally.save()


def interrupts(trials: int, out: Path) -> None:
    """Ctrl-C at a random moment of ``apply`` from a safetensors file: every run must end loaded
    or with KeyboardInterrupt (never another exception: the interrupt lost)."""
    import random

    import torch
    from safetensors.torch import save_file
    from torch import nn

    import archalign

    torch.manual_seed(0)
    src, dst = (nn.Sequential(*[nn.Linear(64, 64) for _ in range(40)]) for _ in range(2))
    path = Path(tempfile.mkdtemp()) / "src.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    plan = archalign.align(src, dst)
    start = time.perf_counter()
    plan.apply(dst, path)
    took = time.perf_counter() - start
    tally = Tally(out / "interrupt.json", "interrupt")
    rng = random.Random(0)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIG_IGN
    signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGINT))
    for _ in range(trials):
        outcome = None
        try:
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, 1.5 * took))
            try:
                plan.apply(dst, path)
                outcome = "completed"
            except KeyboardInterrupt:
                outcome = "KeyboardInterrupt"
            except Exception as exc:
                tally.breaches[f"interrupt lost: {type(exc).__name__}"] += 1
                outcome = "breach"
            signal.setitimer(signal.ITIMER_REAL, 0)
            time.sleep(0.002)
        except KeyboardInterrupt:
            outcome = outcome or "KeyboardInterrupt (after apply)"
        tally.cases += 1
        if outcome != "breach":
            tally.outcomes[outcome] += 1
    tally.save()


# --------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["atheris", "hypothesis"], default=None,
                        help="default: atheris when it imports, otherwise hypothesis")
    parser.add_argument("--targets", nargs="+", choices=[*TARGETS, "interrupt"],
                        default=[*TARGETS, "interrupt"])
    parser.add_argument("--seconds", type=float, default=60.0, help="atheris: time per target")
    parser.add_argument("--runs", type=int, default=0, help="atheris: at most this many cases")
    parser.add_argument("--examples", type=int, default=2000, help="hypothesis: per test")
    parser.add_argument("--trials", type=int, default=1000, help="interrupt: Ctrl-C trials")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "archalign-hostile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:  # one atheris target, in its own process
        fuzz_atheris(args.child, args.seconds, args.runs, args.out)
        return
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    print(f"engine: {engine}; results in {args.out}")
    rows = []
    for target in args.targets:
        report = args.out / f"{target}.json"
        with contextlib.suppress(FileNotFoundError):
            report.unlink()
        start = time.perf_counter()
        if target == "interrupt":
            interrupts(args.trials, args.out)
        elif engine == "atheris":
            subprocess.run([sys.executable, "-m", "benchmarks.hostile", "--child", target,
                            "--seconds", str(args.seconds), "--runs", str(args.runs),
                            "--out", str(args.out)], cwd=ROOT, check=False,
                           stdout=subprocess.DEVNULL, stderr=(args.out / f"{target}.log").open("w"))
        else:
            fuzz_hypothesis(target, args.examples, args.out)
        result: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {
            "cases": 0, "outcomes": {}, "breaches": {"the fuzzer died (see its log)": 1}}
        result["seconds"] = round(time.perf_counter() - start, 1)
        rows.append((target, result))
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(result["outcomes"].items()))
        breaches = ", ".join(f"{k} {v}" for k, v in sorted(result["breaches"].items())) or "none"
        print(f"{target:12s} {result['cases']:8d} cases {result['seconds']:7.1f} s  "
              f"outcomes: {outcomes}\n{'':12s} breaches: {breaches}", flush=True)
    total = sum(r["cases"] for _, r in rows)
    broken = sum(sum(r["breaches"].values()) for _, r in rows)
    print(f"total: {total} cases, {broken} breaches")
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
