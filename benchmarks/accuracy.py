"""Accuracy benchmark: archalign in every way of calling it, against the baselines and the peers.

Every method runs in this process on the same pairs (`corpus`): real models written by others,
random init made trained-like, with a hand-written ground truth proved by a converter. Three sets:
`corpus.PAIRS` (torchvision, timm and transformers ports), `corpus.PORTS` (original reference
codebases -> Hugging Face, MoE expert stacking, rotary permutations, release formats whose source
is a checkpoint only) and `corpus.VISION_PORTS` (reference codebases and timm <-> Hugging Face
vision models).

archalign is called five ways (the *mode*):

- ``inputs``: both models as modules, with the pair's example inputs;
- ``module``: both models as modules and nothing else (``align(src, dst)``);
- ``state_dict``: the source's ``state_dict()`` (in memory, registration order);
- ``file``: the source as a file: the pair's release (a checkpoint-only pair's mode), or a
  ``.safetensors`` file of its state_dict (keys stored sorted, ties saved once); a release that
  declares an entry is read with it (``read_source(path, entry=...)``), as a user does once the
  error for the whole file has named the entries;
- ``structure``: the same file, with the source module moved to the meta device (every value
  gone, non-persistent buffers too) as its structure (``read_source(path, structure=module)``):
  the user has the code, not the weights.

A destination tensor counts as *right* when the load wrote exactly the converter's value into it
(exact pairs), or when it was mapped to the truth's source keys (partial pairs, where a shape
mismatch proposed but not loaded also counts, as the peers' mappings do); *wrong* when the load
wrote anything else; *wrong>=0.9* when archalign itself scored that wrong write >= 0.9. *same
out* means max |src - dst| <= 1e-4 after the load. Peers see modules only (their one mode).

Run: ``python benchmarks/accuracy.py`` (all sets, all modes, peers when installed: ``pip install
-e '.[bench]'``); ``--sets pairs,ports,vision``, ``--modes inputs,module``, ``--only NAME``,
``--no-peers`` narrow it. The tables are saved as ``benchmarks/results/accuracy.md`` (a full run
only). ``PYTHONHASHSEED`` is pinned to 0 because lit-wsl's answers depend on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if os.environ.get("PYTHONHASHSEED") != "0":  # lit-wsl breaks ties in set order: pin it
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import copy  # noqa: E402
import itertools  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import archalign  # noqa: E402
import corpus  # noqa: E402
from benchmarks._harness import library_versions, write_result  # noqa: E402
from benchmarks.peers import PEERS, apply_peer  # noqa: E402
from corpus import Pair, run_model  # noqa: E402

TOLERANCE = 1e-4  # max abs output difference that counts as "reproduces the source"
HIGH = 0.9  # a wrong load scored at least this is "confident and wrong"
MODES = ("inputs", "module", "state_dict", "file", "structure")
SETS: dict[str, list[Pair]] = {"pairs": corpus.PAIRS, "ports": corpus.PORTS,
                               "vision": corpus.VISION_PORTS}


@dataclass
class Row:
    """One method, in one mode, on one pair."""

    pair: str
    set: str  # "pairs", "ports" or "vision"
    method: str  # "archalign" or a peer's name
    mode: str  # one of MODES ("module" for the peers)
    exact: bool  # the pair has an exact port (outputs can be compared)
    truth: int  # destination keys the truth maps
    correct: int = 0  # right, as the module docstring defines it
    wrong: int = 0  # loaded with anything else
    wrong_high: int = 0  # wrong and scored >= HIGH by the method itself
    diff: float | None = None  # max |src - dst| after the load (exact pairs), None otherwise
    seconds: float = 0.0
    error: str = ""
    scores: list[tuple[float, bool]] = field(default_factory=list)  # (confidence, right) per
    # destination tensor of every proposed match (archalign only)

    @property
    def reproduces(self) -> bool:
        return self.diff is not None and self.diff <= TOLERANCE


def _modes(pair: Pair, wanted: tuple[str, ...]) -> list[str]:
    if not pair.source_module:  # a checkpoint-only release: the file (and maybe the code)
        return [m for m in ("file", "structure") if m in wanted]
    return list(wanted)


def _file_of(pair: Pair, src: nn.Module, folder: Path) -> Path:
    """The pair's release, or a ``.safetensors`` file of the source's state_dict."""
    if pair.release is not None:
        (folder / "release").mkdir()
        return corpus.read_release(pair, folder / "release", src)[0]
    from safetensors.torch import save_file

    seen: set[int] = set()
    state: dict[str, torch.Tensor] = {}
    for key, tensor in src.state_dict().items():
        if tensor.numel() and tensor.data_ptr() in seen:
            continue  # a tie is saved once, as safetensors files are
        seen.add(tensor.data_ptr())
        state[key] = tensor.detach().contiguous()
    path = folder / "model.safetensors"
    save_file(state, str(path))
    return path


def _on_meta(src: nn.Module) -> nn.Module:
    """A copy of ``src`` whose parameters and buffers are all on the meta device, ties kept
    (``Module.to("meta")`` gives each tied key its own Parameter); but the non-persistent buffers
    archalign cannot compute again (not a Hugging Face model's), which only the constructor
    computes: the command line's ``--source-structure`` builds such a module on the CPU."""
    from archalign.structure import uncomputable_buffers

    copied = _all_on_meta(src)
    for name in uncomputable_buffers(copied):
        owner, _, local = name.rpartition(".")
        copied.get_submodule(owner)._buffers[local] = src.get_buffer(name)
    return copied


def _all_on_meta(src: nn.Module) -> nn.Module:
    copied = copy.deepcopy(src)
    metas: dict[int, Any] = {}
    for module in copied.modules():
        stores: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
        for store in stores:
            for name, tensor in store.items():
                if tensor is not None:
                    if id(tensor) not in metas:
                        meta = torch.empty_like(tensor, device="meta")
                        metas[id(tensor)] = (nn.Parameter(meta, tensor.requires_grad)
                                             if isinstance(tensor, nn.Parameter) else meta)
                    store[name] = metas[id(tensor)]
    return copied


def _expected(pair: Pair, src: nn.Module, dst: nn.Module, folder: Path
              ) -> tuple[dict[str, tuple[str, ...]], dict[str, torch.Tensor] | None]:
    """The truth (over the keys the converter reads) and, for exact pairs, the converted tensors."""
    state: Mapping[str, torch.Tensor] = src.state_dict()
    if pair.release is not None:
        (folder / "truth").mkdir()
        state = corpus.read_release(pair, folder / "truth", src)[1]
    truth = pair.truth(state, dst) if pair.release is not None else pair.truth(src, dst)
    converted = pair.convert(state, dst) if pair.exact and pair.convert is not None else None
    return truth, converted


def _diff(pair: Pair, src: nn.Module, dst: nn.Module) -> float | None:
    if not pair.exact:
        return None
    inputs = pair.make_inputs()
    try:
        return float((run_model(src, inputs) - run_model(dst, inputs)).abs().max())
    except Exception:  # a destination that cannot run after a bad load
        return float("inf")


def _judge(pair: Pair, dst: nn.Module, loaded: dict[str, tuple[tuple[str, ...], float]],
           truth: dict[str, tuple[str, ...]], converted: dict[str, torch.Tensor] | None
           ) -> dict[str, bool]:
    """Right or wrong for every destination key the method loaded (or mapped)."""
    state = dst.state_dict()
    out: dict[str, bool] = {}
    for key, (sources, _) in loaded.items():
        if converted is not None:
            want = converted.get(key)
            out[key] = (want is not None and want.shape == state[key].shape
                        and torch.equal(state[key].detach().cpu(), want.detach().cpu().to(
                            state[key].dtype)))
        else:
            out[key] = key in truth and set(sources) == set(truth[key])
    return out


def run_archalign(pair: Pair, set_name: str, mode: str) -> Row:
    row = Row(pair.name, set_name, "archalign", mode, pair.exact, 0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        src, dst = pair.make_src(), pair.make_dst()
        truth, converted = _expected(pair, src, dst, folder)
        row.truth = len(truth)
        start = time.perf_counter()
        try:
            if mode == "inputs":
                plan = archalign.align(src, dst, example_inputs=pair.make_inputs())
            elif mode == "module":
                plan = archalign.align(src, dst)
            elif mode == "state_dict":
                plan = archalign.align(src.state_dict(), dst)
            else:  # a release that declares an entry is read as its user would, once the
                # error for the whole file has named the entry
                entry = pair.release.entry if pair.release is not None else ""
                path = _file_of(pair, src, folder)
                structure = None
                if mode == "structure":  # the code without the weights: every value gone
                    structure = _on_meta(src)
                plan = archalign.align(archalign.read_source(path, entry=entry or None,
                                                             structure=structure), dst)
            report = plan.apply(dst)
        except Exception as exc:  # archalign must never raise on a real pair: it is recorded
            row.seconds = time.perf_counter() - start
            row.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:70]}"
            traceback.print_exc(file=sys.stderr)
            return row
        row.seconds = time.perf_counter() - start
        written = set(report.loaded)
        loaded = {k: (m.src, m.confidence) for m in plan.matches for k in m.dst if k in written}
        verdict = _judge(pair, dst, loaded, truth, converted)
        for key, ok in verdict.items():
            row.correct += ok
            row.wrong += not ok
            row.wrong_high += (not ok) and loaded[key][1] >= HIGH
        if not pair.exact:  # proposed mismatches count as mappings on partial pairs
            for mm in plan.mismatches:
                row.correct += sum(k in truth and set(mm.src) == set(truth[k]) and k not in loaded
                                   for k in mm.dst)
        for m in plan.matches:
            for key in m.dst:
                right = verdict[key] if key in verdict else (
                    key in truth and _same_sources(m.src, truth[key], pair))
                row.scores.append((m.confidence, right))
        row.diff = _diff(pair, src, dst)
    return row


def _same_sources(src: tuple[str, ...], truth: tuple[str, ...], pair: Pair) -> bool:
    """An unloaded match is right when it names the truth's keys (release keys may carry a
    prefix archalign strips: compare the keys' endings)."""
    if set(src) == set(truth):
        return True
    return pair.release is not None and len(src) == len(truth) and all(
        t.endswith(s) or s.endswith(t) for s, t in zip(sorted(src), sorted(truth)))


def run_peer(pair: Pair, set_name: str, name: str, fn: Callable[..., Any]) -> Row:
    row = Row(pair.name, set_name, name, "module", pair.exact, 0)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = pair.make_src(), pair.make_dst()
        truth, converted = _expected(pair, src, dst, Path(tmp))
        row.truth = len(truth)
        result = fn(src, dst, pair.make_inputs())
        row.seconds = result.seconds
        if result.error:
            row.error = result.error.splitlines()[0][:60]
            row.diff = _diff(pair, src, dst)
            return row
        apply_peer(result, dst)
        loaded = {k: (tuple(v), result.scores.get(k, 0.0)) for k, v in result.mapping.items()}
        for key, ok in _judge(pair, dst, loaded, truth, converted).items():
            row.correct += ok
            row.wrong += not ok
            row.wrong_high += (not ok) and loaded[key][1] >= HIGH
        row.diff = _diff(pair, src, dst)
    return row


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


def reliability_table(pairs: list[tuple[float, bool]]) -> list[str]:
    lines = ["| confidence | matches | right | fraction right |", "|---|---|---|---|"]
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
    return (f"| {row.pair} | {row.method} | {row.mode} | {row.correct}/{row.truth} | "
            f"{row.wrong} | {row.wrong_high} | {same} | {diff} | {row.seconds:.2f} | "
            f"{row.error} |")


def summary(rows: list[Row]) -> list[str]:
    """One line per (set, method, mode)."""
    lines = ["| set | method | mode | exact pairs reproduced | tensors right | wrong | wrong>=0.9 "
             "| raised |", "|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r.set, r.method, r.mode) for r in rows))
    for set_name, method, mode in keys:
        mine = [r for r in rows if (r.set, r.method, r.mode) == (set_name, method, mode)]
        exact = [r for r in mine if r.exact]
        lines.append(
            f"| {set_name} | {method} | {mode} | {sum(r.reproduces for r in exact)}/{len(exact)} "
            f"| {sum(r.correct for r in mine)}/{sum(r.truth for r in mine)} | "
            f"{sum(r.wrong for r in mine)} | {sum(r.wrong_high for r in mine)} | "
            f"{sum(bool(r.error) for r in mine)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS), help="pairs,ports,vision")
    parser.add_argument("--modes", default=",".join(MODES), help=",".join(MODES))
    parser.add_argument("--only", nargs="*", default=(), help="pairs whose name contains one")
    parser.add_argument("--no-peers", action="store_true", help="archalign only")
    args = parser.parse_args(argv)
    import logging
    import warnings

    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    sets = [s for s in args.sets.split(",") if s]
    modes = tuple(m for m in args.modes.split(",") if m)
    full = set(sets) == set(SETS) and set(modes) == set(MODES) and not args.only
    rows: list[Row] = []
    for set_name in sets:
        for pair in SETS[set_name]:
            if args.only and not any(o in pair.name for o in args.only):
                continue
            for mode in _modes(pair, modes):
                rows.append(run_archalign(pair, set_name, mode))
                print(_fmt(rows[-1]), flush=True)
            if args.no_peers or not pair.source_module:
                continue
            for name, fn in PEERS.items():
                rows.append(run_peer(pair, set_name, name, fn))
                print(_fmt(rows[-1]), flush=True)

    ours = [r for r in rows if r.method == "archalign"]
    lines = ["# Accuracy: archalign in every calling mode, against the baselines and the peers", "",
             f"Generated by `python benchmarks/accuracy.py` ({library_versions('torch')}). "
             "right = the load wrote exactly the converter's value (exact pairs) or mapped the "
             "truth's source keys (partial pairs); wrong = loaded with anything else; "
             f"wrong>=0.9 = wrong writes the method itself scored >= {HIGH}; same out = max "
             f"|src - dst| <= {TOLERANCE} after the load. Modes: inputs (modules + example "
             "inputs), module (modules only), state_dict, file (a release, or a .safetensors of "
             "the state_dict), structure (that file on the source module moved to the meta "
             "device). Peers see modules.", "",
             "## Summary", "", *summary(rows), "",
             "## archalign reliability (every proposed match, loaded or not)", ""]
    for set_name in sets:
        lines += [f"### {set_name}", "", *reliability_table(
            [s for r in ours if r.set == set_name for s in r.scores]), ""]
    if full:
        lines += ["### under ambiguity (MLPs of identical layers with one layer deleted or "
                  "inserted; the truth is the edit)", "",
                  *reliability_table(ambiguity_reliability()), ""]
    lines += ["## Per pair", "",
              "| pair | method | mode | right/truth | wrong | wrong>=0.9 | same out | max diff | "
              "seconds | error |", "|---|---|---|---|---|---|---|---|---|---|",
              *(_fmt(r) for r in rows)]
    text = "\n".join(lines) + "\n"
    print("\n" + "\n".join(lines[lines.index("## Summary"):lines.index("## Per pair")]))
    if full:
        out = write_result("accuracy.md", text)
        print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
