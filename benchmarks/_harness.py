"""What the benchmarks share: worker processes, the frozen archalign they import, results files.

A speed measurement runs in a fresh interpreter with a time limit (`run_worker`): ``python
benchmarks/_harness.py --worker benchmarks.<module>:<function> --events FILE --options JSON``
imports the benchmark module, calls ``function(events, **options)`` and appends the JSON result to
the events file, which the parent reads even after it killed the worker at its time limit (the
worker's earlier events then tell how far it got). Worker functions import torch, archalign and
corpus themselves, so that a worker's measured imports and memory are its own: a benchmark module
imports nothing but the standard library and this harness at module level.

`archalign_snapshot` copies ``archalign/`` to a temporary directory first, and every worker imports
that copy (``PYTHONPATH``: the copy, then this checkout for ``benchmarks`` and ``corpus``), so a long
run measures one version of the code even if the checkout changes meanwhile.

Results go to ``benchmarks/results/`` (`write_result`); `library_versions`, `git` and
`source_digest` say what was measured. `Section` is what a benchmark returns to the entry point
(``benchmarks/speed.py``): its markdown and its `Target` verdicts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

Log = Callable[[str], None]


class Target(NamedTuple):
    """One target of the speed issue and how it fared."""

    what: str  # the target, in words
    measured: str  # the figure it is judged on
    passed: bool | None  # None: could not be measured


class Section(NamedTuple):
    """What one benchmark contributes to its results file."""

    lines: list[str]  # markdown
    targets: list[Target]  # verdicts for the targets table


# ------------------------------------------------------------------------------------ worker side


class Events:
    """Progress of a worker, one JSON object per line in a file the parent reads (even after a kill)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self.emit("hello", epoch=time.time())

    def emit(self, kind: str, **data: Any) -> None:
        """Append one event, stamped with the seconds since the worker started."""
        record = {"event": kind, "t": round(time.perf_counter() - self._start, 4), **data}
        with self._lock:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()


def setup_torch() -> None:
    """Two intra-op threads (the machine has two cores) and a fixed seed."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)


def serve_worker(argv: Sequence[str]) -> None:
    """Entry point of a worker process: run one measurement, write its result as an event.

    Raises
    ------
    ValueError
        If ``--worker`` is not ``module:function``.
    """
    parser = argparse.ArgumentParser(description="one benchmark measurement (internal)")
    parser.add_argument("--worker", required=True, help="module:function")
    parser.add_argument("--events", required=True, help="JSON-lines file to append events to")
    parser.add_argument("--options", default="{}", help="keyword arguments, as a JSON object")
    args = parser.parse_args(argv)
    module, _, name = args.worker.partition(":")
    if not module or not name:
        raise ValueError(f"--worker {args.worker!r}: expected module:function, "
                         "e.g. benchmarks.apply_speed:worker_apply")
    events = Events(Path(args.events))
    function = getattr(importlib.import_module(module), name)
    events.emit("result", result=function(events, **json.loads(args.options)))


# ------------------------------------------------------------------------------------ parent side


@dataclass
class WorkerRun:
    """What a worker process left behind."""

    events: list[dict[str, Any]]  # every event it wrote, in order
    result: dict[str, Any] | None  # its result; None if it was killed or failed
    seconds: float  # wall time of the whole process, as the parent saw it
    ended: float  # time.time() when the worker ended or was killed
    status: str  # "ok", "timeout" or "error: ..."
    stderr_tail: str = ""  # the end of its stderr, when it failed

    def first(self, kind: str) -> dict[str, Any] | None:
        """The first event of ``kind``, if any."""
        return next((e for e in self.events if e["event"] == kind), None)


def run_worker(function: Callable[..., dict[str, Any]], timeout: float, **options: Any) -> WorkerRun:
    """Run ``function(events, **options)`` in a fresh interpreter, killed after ``timeout`` seconds.

    ``function`` must be a module-level function of a ``benchmarks`` module; ``options`` must be
    JSON-serialisable (paths are passed as strings).

    Raises
    ------
    ValueError
        If ``function`` is not importable by name from a fresh interpreter.
    """
    module = function.__module__
    if not module.startswith("benchmarks.") or function.__qualname__ != function.__name__:
        raise ValueError(f"worker {module}:{function.__qualname__} is not a module-level function "
                         "of a benchmarks module: import the benchmark as benchmarks.<name>")
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as handle:
        events_path = Path(handle.name)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker",
               f"{module}:{function.__name__}", "--events", str(events_path),
               "--options", json.dumps(options, default=str)]
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)
    env = {**os.environ, "PYTHONHASHSEED": "0", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": pythonpath}
    start = time.perf_counter()
    status, stderr = "ok", ""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=ROOT, check=False)
        if done.returncode != 0:
            stderr = done.stderr
            last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            status = "error: " + (last[-1][:160] if last else f"exit code {done.returncode}")
    except subprocess.TimeoutExpired as exc:
        status = "timeout"
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (
            exc.stderr or "")
    seconds, ended = time.perf_counter() - start, time.time()
    events = [json.loads(line) for line in events_path.read_text(encoding="utf-8").splitlines()
              if line.strip()]
    events_path.unlink()
    result = next((e["result"] for e in events if e["event"] == "result"), None)
    return WorkerRun(events, result, seconds, ended, status, stderr[-2000:])


@contextlib.contextmanager
def archalign_snapshot() -> Iterator[str]:
    """Copy ``archalign/`` to a temporary directory that every worker started inside imports.

    Yields the copy's `source_digest`; the copy is removed and ``PYTHONPATH`` restored on exit.
    """
    snapshot = Path(tempfile.mkdtemp(prefix="archalign-snapshot-"))
    shutil.copytree(ROOT / "archalign", snapshot / "archalign",
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(snapshot), before or "") if p)
    try:
        yield source_digest(snapshot / "archalign")
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


# ------------------------------------------------------------------------------------ results


def write_result(name: str, text: str) -> Path:
    """Write ``benchmarks/results/<name>`` (the directory is created if needed); returns its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text, encoding="utf-8")
    return path


def source_digest(package: Path) -> str:
    """Short hash of ``package/*.py``, so that a result names the code it measured."""
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git(*args: str) -> str:
    """Output of a read-only git command in the checkout ("?" without git)."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT,
                              check=False).stdout.strip()
    except OSError:
        return "?"


def library_versions(*modules: str) -> str:
    """``"torch 2.4.0, numpy 2.0.1"``: each module's ``__version__``, read in a subprocess (so that
    the caller stays light); "?" if one cannot be imported."""
    code = ("import importlib, sys; print(', '.join(f'{m} {importlib.import_module(m).__version__}' "
            "for m in sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return done.stdout.strip() or "?"


def format_seconds(x: float | None) -> str:
    """Seconds for a table cell: three decimals below 10 s, one above; "-" for none."""
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def format_mib(n_bytes: float) -> str:
    """Bytes as whole MiB with thousands separators."""
    return f"{n_bytes / 2 ** 20:,.0f}"


if __name__ == "__main__":
    # a worker: import this file again as the module the benchmarks import (one Events class)
    from benchmarks._harness import serve_worker as _serve

    _serve(sys.argv[1:])
