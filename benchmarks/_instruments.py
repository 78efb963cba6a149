"""Instruments that look inside archalign from a worker: stage timers, a sampling profiler.

This is the one module of the benchmarks that names archalign's internals: the functions
``archalign.pipeline.align`` calls through its module namespace (`stage_of`, `StageTimer`, and
`STAGE_LEGEND`, which says so in the results), and ``archalign.ops.apply_ops`` (`planned_state`).
When those move, fix them here; every other file of ``benchmarks/`` uses archalign's public API.

* `StageTimer` wraps, inside a worker, every archalign function in ``archalign.pipeline``'s
  namespace with a timer while it is installed (no archalign file is changed); `stage_of` sorts
  them into `STAGES`, and time between the calls is "other".
* `StackSampler` is a sampling profiler: a thread reading the main thread's stack every few ms
  (per-line attribution, negligible overhead); `profile_tables` renders what it counted.
* `planned_state` gives the tensors ``plan.apply`` writes, under the destination's names: the
  ``load_state_dict`` baseline of the apply benchmark loads exactly those.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks._harness import Events, WorkerRun

if TYPE_CHECKING:
    from torch import nn

STAGES = ("read_source", "trace", "features", "matching", "plan", "other")
STAGE_LEGEND = ("read_source; trace = trace_graph + harmonise_graphs and its helpers; features = "
                "extract_features (+ resolve_hints); matching = the match_* stages (+ _left); plan "
                "= _build_plan (+ what follows it); other = the rest")  # what `stage_of` counts


def stage_of(function_name: str) -> str:
    """The stage a function called by ``pipeline.align`` belongs to."""
    if function_name == "read_source":
        return "read_source"
    if function_name in ("trace_graph", "harmonise_graphs", "build_units",
                         "_in_registration_order"):
        return "trace"
    if function_name in ("extract_features", "resolve_hints"):
        return "features"
    if function_name.startswith("match_") or function_name == "_left":
        return "matching"
    if function_name in ("_build_plan", "decide_by_activations", "dummy_inputs", "_cheap_to_run"):
        return "plan"
    return "other"


class StageTimer:
    """Times the calls ``archalign.pipeline.align`` makes through its module namespace."""

    def __init__(self, events: Events | None = None) -> None:
        self.calls: list[tuple[str, float]] = []
        self._events = events
        self._depth = 0
        self._originals: dict[str, Any] = {}

    def _wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return function(*args, **kwargs)
            if self._events is not None:
                self._events.emit("start", function=name)
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                seconds = time.perf_counter() - start
                self.calls.append((name, seconds))
                if self._events is not None:
                    self._events.emit("end", function=name, seconds=round(seconds, 4))

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[StageTimer]:
        """Wrap every archalign function in ``archalign.pipeline``'s namespace while inside."""
        import archalign.pipeline as pipeline

        for name, value in vars(pipeline).items():
            if (inspect.isfunction(value) and value.__module__.startswith("archalign")
                    and name not in ("align", "align_and_load")):
                self._originals[name] = value
                setattr(pipeline, name, self._wrap(name, value))
        try:
            yield self
        finally:
            for name, value in self._originals.items():
                setattr(pipeline, name, value)
            self._originals.clear()

    def split(self, total: float) -> dict[str, float]:
        """Seconds per stage; "other" also takes what no wrapped call accounts for."""
        out = dict.fromkeys(STAGES, 0.0)
        for name, seconds in self.calls:
            out[stage_of(name)] += seconds
        out["other"] += max(total - sum(out.values()), 0.0)
        return out

    def by_function(self) -> dict[str, float]:
        """Seconds per wrapped function (summed over calls)."""
        out: dict[str, float] = {}
        for name, seconds in self.calls:
            out[name] = out.get(name, 0.0) + seconds
        return out


class StackSampler:
    """A sampling profiler: a background thread reads the main thread's Python stack every few ms.

    Unlike cProfile it adds almost no overhead (a timed-out case runs as far as unprofiled) and it
    attributes time to source lines. For every sample it counts, once each: the archalign functions
    and the archalign lines on the stack ("inclusive": the time spent in them and below), the
    innermost archalign line (where archalign's own code was running or called out to a library),
    and the innermost frame of all ("leaf": where the CPU was).
    """

    def __init__(self, interval: float = 0.005, events: Events | None = None,
                 snapshot_every: float = 5.0) -> None:
        self.interval = interval
        self.samples = 0
        self.functions: Counter[str] = Counter()
        self.lines: Counter[str] = Counter()
        self.innermost: Counter[str] = Counter()
        self.leaves: Counter[str] = Counter()
        self._events = events
        self._snapshot_every = snapshot_every
        self._stop = threading.Event()
        main = threading.main_thread().ident
        assert main is not None  # the main thread runs, so it has an id
        self._main = main
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.perf_counter()

    def __enter__(self) -> StackSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last_snapshot = time.perf_counter()
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._main)
            if frame is None:
                continue
            self._record(frame)
            if self._events is not None and time.perf_counter() - last_snapshot > self._snapshot_every:
                self._events.emit("profile", profile=self.summary())
                last_snapshot = time.perf_counter()

    def _record(self, frame: Any) -> None:
        self.samples += 1
        self.leaves[_where(frame.f_code, frame.f_lineno, as_line=True)] += 1
        functions, lines = set(), set()
        innermost = None
        while frame is not None:
            code = frame.f_code
            if "/archalign/" in code.co_filename:
                functions.add(_where(code, code.co_firstlineno, as_line=False))
                here = _where(code, frame.f_lineno, as_line=True)
                lines.add(here)
                innermost = innermost or here
            frame = frame.f_back
        self.functions.update(functions)
        self.lines.update(lines)
        if innermost is not None:
            self.innermost[innermost] += 1

    def summary(self, limit: int = 40) -> dict[str, Any]:
        """The counters as shares of all samples (the top ``limit`` of each)."""
        n = max(self.samples, 1)

        def top(counter: Counter[str]) -> list[tuple[str, float]]:
            return [(k, v / n) for k, v in counter.most_common(limit)]

        return {"samples": self.samples, "interval": self.interval,
                "elapsed": time.perf_counter() - self._started,
                "functions": top(self.functions), "lines": top(self.lines),
                "innermost": top(self.innermost), "leaves": top(self.leaves)}


def _where(code: Any, lineno: int, *, as_line: bool) -> str:
    """``archalign/match.py:401 _fused_pairs`` for a line, ``archalign/match.py:382(_fused_pairs)``
    for a function (its ``def`` line); library paths are shown from their package on."""
    path = code.co_filename
    if "/archalign/" in path:
        path = "archalign/" + path.rpartition("/archalign/")[2]
    elif "site-packages/" in path:
        path = path.rpartition("site-packages/")[2]
    elif path.startswith("/"):
        path = Path(path).name
    at = "?" if lineno is None else lineno
    return f"{path}:{at} {code.co_name}" if as_line else f"{path}:{at}({code.co_name})"


def profile_tables(name: str, label: str, run: WorkerRun, limit: int = 12) -> list[str]:
    """Markdown tables of the profile a worker sampled for the case ``name`` (shown as ``label``):
    its final `StackSampler.summary`, or the last snapshot of a killed run."""
    profile = run.result["profile"] if run.result else None
    snapshots = [e["profile"] for e in run.events if e["event"] == "profile"]
    if profile is None and snapshots:
        profile = snapshots[-1]
    if profile is None:
        return [f"Profiling `{name}` gave no samples ({run.status}).", ""]
    state = (f"completed in {run.result['wall']:.1f} s" if run.result else
             f"killed at the time limit; snapshot of its first {profile['elapsed']:.0f} s")
    lines = [f"**{label}** ({state}; {profile['samples']} stack samples, one per "
             f"{1000 * profile['interval']:.0f} ms; % of samples).", ""]
    titles = {"functions": "archalign function, inclusive (`file:def line(name)`)",
              "lines": "archalign line on the stack, inclusive",
              "innermost": "innermost archalign line (its own work and the library calls it makes)",
              "leaves": "innermost frame of all (where the CPU was)"}
    for key, title in titles.items():
        lines += [f"| {title} | % |", "|---|---|"]
        lines += [f"| `{where}` | {100 * share:.1f} |" for where, share in profile[key][:limit]]
        lines.append("")
    return lines


def planned_state(plan: Any, source: nn.Module, loaded: set[str]) -> dict[str, Any]:
    """The tensors ``plan.apply`` writes, under the destination's names (ops applied up front)."""
    import torch

    state = source.state_dict()
    out: dict[str, Any] = {}
    with torch.no_grad():
        for match in plan.matches:
            if not set(match.dst) <= loaded:
                continue
            if match.ops:  # an adaptation (none in these pairs): computed here, untimed
                from archalign.ops import apply_ops

                out.update(zip(match.dst, apply_ops([state[k] for k in match.src], match.ops)))
            else:
                out.update(zip(match.dst, (state[k] for k in match.src)))
    return out
