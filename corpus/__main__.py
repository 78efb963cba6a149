"""``python -m corpus``: build every pair, validate its truth, prove every exact one."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from . import PAIRS, PORTS, VISION_PORTS
from .check import read_release, run_model, validate_truth, verify_truth


def main() -> None:
    """Verify every exact pair of `PAIRS` and `PORTS`; print one row per pair."""
    import logging
    import warnings

    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import timm  # noqa: F401  # import the libraries up front so that build times are the models'
    import torchvision  # noqa: F401
    import transformers  # noqa: F401

    print(f"{'pair':44} {'exact':5} {'truth':>5} {'dst':>4} {'fits':>4} {'build s':>7} {'|out|':>7} "
          f"{'max diff':>8}")
    for pair in (*PAIRS, *PORTS, *VISION_PORTS):
        start = time.perf_counter()
        src, dst = pair.make_src(), pair.make_dst()
        build = time.perf_counter() - start
        src_state = src.state_dict()
        if pair.release is not None:  # the truth names the release's keys
            with tempfile.TemporaryDirectory() as folder:
                src_state = read_release(pair, Path(folder), src)[1]
        problems = validate_truth(pair, src_state, dst)
        truth = pair.truth(src_state, dst)
        dst_state = dst.state_dict()
        fits = sum(len(s) == 1 and src_state[s[0]].shape == dst_state[k].shape for k, s in truth.items())
        scale = float(run_model(src, pair.make_inputs()).abs().max())
        diff = f"{verify_truth(pair):8.1e}" if pair.exact else f"{'-':>8}"
        print(f"{pair.name:44} {pair.exact!s:5} {len(truth):5d} {len(dst_state):4d} {fits:4d} "
              f"{build:7.2f} {scale:7.2f} {diff}")
        for problem in problems:
            print(f"    PROBLEM: {problem}")


if __name__ == "__main__":
    main()
