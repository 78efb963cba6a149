"""The BatchNorm checkpoint check (`archalign.selfcheck`) on the corpus pairs that have BatchNorm.

For every exact pair whose destination holds BatchNorms: the destination loaded by the pair's
converter (a right load) is run on the input made for it alone (`archalign.inputs.make_inputs`),
and every BatchNorm's fit (`archalign.selfcheck.norm_fit`) with its own running statistics is
printed with the best rival's; then, for up to ``--swaps`` pairs of same-sized BatchNorms, the
two layers' sources are swapped (weight, bias and running statistics) and the check run again:
how many swaps it catches (both layers named, or one), and whether a right load ever fails.

Run: ``python benchmarks/norm_checks.py`` (``--only NAME``, ``--swaps N``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import archalign.selfcheck  # noqa: E402
import corpus  # noqa: E402
from archalign.inputs import make_inputs  # noqa: E402
from archalign.selfcheck import CheckpointChecks, run_checks  # noqa: E402

_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


def _norms(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))}


def _loaded(model: nn.Module) -> frozenset[str]:
    return frozenset(model.state_dict())


def _swap(model: nn.Module, a: str, b: str) -> None:
    ma, mb = model.get_submodule(a), model.get_submodule(b)
    with torch.no_grad():
        for key in _NORM_KEYS:
            ta, tb = getattr(ma, key), getattr(mb, key)
            if ta is None or tb is None:
                continue
            saved = ta.detach().clone()
            ta.copy_(tb)
            tb.copy_(saved)


def _check(model: nn.Module, inputs: object) -> tuple[CheckpointChecks, dict[str, float]]:
    """The checks, and for each BatchNorm how much better its input fits the best rival's
    statistics than its own (the margin `NORM_FIT_MARGIN` is measured against)."""
    checks = run_checks(model, inputs, _loaded(model))
    margin = archalign.selfcheck.NORM_FIT_MARGIN
    archalign.selfcheck.NORM_FIT_MARGIN = -10.0  # every best rival named
    try:
        every = run_checks(model, inputs, _loaded(model))
    finally:
        archalign.selfcheck.NORM_FIT_MARGIN = margin
    return checks, {c.layer: c.rival_fit - c.fit for c in every.norms if c.rival}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=())
    parser.add_argument("--swaps", type=int, default=12)
    args = parser.parse_args(argv)
    pairs = [p for p in (*corpus.PAIRS, *corpus.VISION_PORTS)
             if p.exact and p.convert is not None and p.release is None
             and (not args.only or any(o in p.name for o in args.only))]
    total_right = total_fail = caught_both = caught_one = swaps = 0
    worst: list[float] = []
    right_gaps: list[float] = []  # per pair, the largest rival gap on a right load
    swap_gaps: list[float] = []  # the rival gaps of the two swapped layers
    for pair in pairs:
        src, dst = pair.make_src(), pair.make_dst()
        if not _norms(dst):
            continue
        assert pair.convert is not None
        dst.load_state_dict(pair.convert(src.state_dict(), dst), strict=False)
        made, how = make_inputs(dst, dst)
        if made is None:
            print(f"{pair.name}: no input ({how})")
            continue
        checks, gaps = _check(dst, made.dst)
        right_gaps.append(max(gaps.values(), default=float("nan")))
        fails = [c for c in checks.norms if not c.ok]
        fits = sorted(c.fit for c in checks.norms if c.fit == c.fit)
        worst.extend(fits[:1])
        total_right += len(checks.norms)
        total_fail += len(fails)
        print(f"{pair.name}: right load: {len(checks.norms) - len(fails)}/{len(checks.norms)} "
              f"consistent; fit min {fits[0] if fits else float('nan'):.2f} median "
              f"{fits[len(fits) // 2] if fits else float('nan'):.2f}; outputs finite "
              f"{checks.finite}, constant {checks.constant}")
        for c in fails:
            print(f"   FAILS ON A RIGHT LOAD: {c.why}")
        by_size: dict[int, list[str]] = {}
        for name, m in _norms(dst).items():
            by_size.setdefault(int(m.running_mean.shape[0]), []).append(name)  # type: ignore[index]
        candidates = [(a, b) for names in by_size.values() if len(names) > 1
                      for a, b in itertools.combinations(names, 2)]
        step = max(1, len(candidates) // max(args.swaps, 1))
        for a, b in candidates[::step][:args.swaps]:
            _swap(dst, a, b)
            swapped, gaps = _check(dst, made.dst)
            swap_gaps.extend(gaps[k] for k in (a, b) if k in gaps)
            _swap(dst, a, b)
            bad = {c.layer for c in swapped.norms if not c.ok}
            swaps += 1
            caught_both += {a, b} <= bad
            caught_one += len({a, b} & bad) == 1
            status = "both" if {a, b} <= bad else ("one" if {a, b} & bad else "MISSED")
            fit = {c.layer: f"{c.fit:.2f}" for c in swapped.norms}
            print(f"   swap {a} <-> {b}: {status} (fits {fit.get(a)}, {fit.get(b)}; "
                  f"{len(bad - {a, b})} others fail)")
    print(f"right loads: {total_right - total_fail}/{total_right} BatchNorms consistent "
          f"(lowest fit per pair: {', '.join(f'{w:.2f}' for w in worst)})")
    print(f"rival gap on right loads, largest per pair: "
          f"{', '.join(f'{g:.2f}' for g in right_gaps)}; on swapped layers: min "
          f"{min(swap_gaps, default=float('nan')):.2f}, median "
          f"{sorted(swap_gaps)[len(swap_gaps) // 2] if swap_gaps else float('nan'):.2f}")
    print(f"swaps: {swaps}, caught on both layers {caught_both}, on one {caught_one}, missed "
          f"{swaps - caught_both - caught_one}")


if __name__ == "__main__":
    main()
