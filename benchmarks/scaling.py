"""How align time grows with the tensor count: a log-log fit per model family, and the plot.

The align benchmark (``benchmarks/align_speed.py``) runs a sweep of Llama and MoE configurations
besides its main cases; each case becomes a `Point`. `fit_growth` fits, per family, the slope of
log time against log tensor count (`Growth`, which also extrapolates to a case that hit its time
limit), and `plot_scaling` draws ``benchmarks/results/speed.png``: completed cases, lower bounds of
killed ones, and the targets of the speed issue.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

MARKERS = {"torchvision -> timm": "o", "Llama -> Mistral (meta)": "s", "MoE (meta)": "D",
           "MoE fx (meta)": "v"}


class Point(NamedTuple):
    """One align case, as the fit and the plot see it."""

    name: str  # the case's name, shown next to its point unless it is a sweep point
    family: str  # the series it belongs to
    n: int | None  # tensors in the source state_dict (None: the worker never built the models)
    seconds: float | None  # the first align after import; None if it did not complete
    lower_bound: float | None  # for a case killed at its time limit: align ran at least this long
    fitted: bool  # counts for the growth fit (architecture sweeps; not the vision pairs)
    sweep: bool  # only a point of the scaling sweep (unlabelled on the plot)
    target: float | None  # seconds, from the issue


@dataclass(frozen=True)
class Growth:
    """How align time grows with the tensor count in one plot family (completed runs)."""

    fit: float  # least-squares slope of log time against log tensors, over all points
    local: float  # slope between the two largest points (fixed costs matter less there)
    n_ref: int  # tensors of the largest point
    t_ref: float  # its align time

    def predict(self, n: int) -> float:
        """Seconds for ``n`` tensors: the largest point, extrapolated with the fitted slope (rough:
        the sweep's points differ in structure as well as in size)."""
        return self.t_ref * (n / self.n_ref) ** self.fit


def fit_growth(points: Sequence[Point]) -> dict[str, Growth]:
    """`Growth` per family (in the order the families first appear) with at least three completed,
    fitted points; both directions of a pair (same tensor count) make one point, their mean."""
    out = {}
    for family in dict.fromkeys(p.family for p in points):
        by_size: dict[int, list[float]] = {}
        for p in points:
            if p.family == family and p.seconds and p.n and p.fitted:
                by_size.setdefault(p.n, []).append(p.seconds)
        sizes = sorted((n, statistics.fmean(ts)) for n, ts in by_size.items())
        if len(sizes) < 3:
            continue
        logs = [(math.log(n), math.log(t)) for n, t in sizes]
        mx = statistics.fmean(x for x, _ in logs)
        my = statistics.fmean(y for _, y in logs)
        sxx = sum((x - mx) ** 2 for x, _ in logs)
        (x1, y1), (x2, y2) = logs[-2], logs[-1]
        if not sxx or x2 == x1:
            continue
        out[family] = Growth(fit=sum((x - mx) * (y - my) for x, y in logs) / sxx,
                             local=(y2 - y1) / (x2 - x1), n_ref=sizes[-1][0],
                             t_ref=sizes[-1][1])
    return out


def plot_scaling(points: Sequence[Point], path: Path) -> str:
    """Log-log plot of align time against tensor count; returns "" or why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for family, marker in MARKERS.items():
        done = sorted((p.n, p.seconds) for p in points
                      if p.family == family and p.seconds is not None and p.n)
        if done:
            xs, ys = zip(*done)
            ax.plot(xs, ys, marker=marker, linestyle="-" if family != "torchvision -> timm"
                    else "none", label=family)
        killed = [(p.n, p.lower_bound) for p in points if p.family == family
                  and p.seconds is None and p.lower_bound and p.n]
        if killed:
            xs, ys = zip(*killed)
            ax.scatter(xs, ys, marker="^", s=80, facecolors="none", edgecolors="red",
                       label=f"{family}: killed at time limit (lower bound)")
    labels: dict[tuple[float, float], list[str]] = {}  # points that (nearly) coincide share a label
    for p in points:
        seconds = p.seconds if p.seconds is not None else p.lower_bound
        if p.n and seconds and not p.sweep:
            spot = (round(math.log10(p.n), 1), round(math.log10(seconds), 1))
            labels.setdefault(spot, []).append(p.name)
    for (x, y), names in labels.items():
        ax.annotate(", ".join(names), (10 ** x, 10 ** y), textcoords="offset points",
                    xytext=(6, -12), fontsize=8)
    for i, p in enumerate(p for p in points if p.target and p.n):
        assert p.n is not None and p.target is not None
        ax.hlines(p.target, p.n / 1.35, p.n * 1.35, color="green",
                  linewidth=2, label="target from the issue" if i == 0 else "_nolegend_")
        ax.annotate(f"target {p.target:g} s", (p.n * 1.35, p.target),
                    textcoords="offset points", xytext=(3, -3), fontsize=7, color="green")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tensors in the source state_dict")
    ax.set_ylabel("align time, s (first call after import)")
    ax.set_title("archalign.align(src, dst, check_outputs=False)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ""
