"""Hostile inputs and what archalign must do with them: the oracles of tests/test_hostile.py (small
budgets, hypothesis) and of benchmarks/hostile.py (long runs, atheris or hypothesis).

Each ``run_*`` function takes one input as bytes (what a file on disk would hold), feeds it to the
readers and to everything that uses what they return, and returns the outcome's name: ``"ok"``, or
the class of the `ArchalignError` (or of the `OSError` naming the file) it was refused with. Any
other outcome raises `Breach`: an exception outside the family, a destination changed by a
refused call, a file outside the checkpoint's folder opened, or a planted payload that ran.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from archalign.apply import apply_plan
from archalign.errors import ArchalignError
from archalign.html import render_html
from archalign.ops import Op, OpKind
from archalign.plan import Match, Mismatch, Plan
from archalign.review import format_plan_html
from archalign.source import read_source

__all__ = ["Breach", "base_plan", "dcp_folder", "destination", "planted_pickles",
           "run_dcp_metadata", "run_index", "run_keys", "run_pickle", "run_plan", "run_safetensors",
           "source_state", "valid_safetensors", "zipped"]


class Breach(AssertionError):
    """A promise of docs/security.md was broken by one input."""


MARKER = "archalign-hostile-ran"  # the file a planted payload would create (in its folder)
TALLY: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(
    collections.Counter)  # target -> outcome -> how many inputs ended so (breaches excluded)


def _tallied(target: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Count the outcomes of a ``run_*`` oracle in `TALLY` (benchmarks/hostile.py reports them)."""

    def wrap(run: Callable[..., str]) -> Callable[..., str]:
        @functools.wraps(run)
        def counted(*args: Any, **kwargs: Any) -> str:
            outcome = run(*args, **kwargs)
            TALLY[target][outcome] += 1
            return outcome

        return counted

    return wrap


@contextlib.contextmanager
def refused_or_ok(outcome: list[str]) -> Iterator[None]:
    """Record the block's outcome in ``outcome``; raise `Breach` for any exception outside the
    family (an `ArchalignError`, or an `OSError` that names a file)."""
    try:
        yield
    except ArchalignError as exc:
        outcome.append(type(exc).__name__)
    except OSError as exc:
        if not exc.filename:
            raise Breach(f"an OSError naming no file: {exc!r}") from exc
        outcome.append("OSError")
    except Exception as exc:
        raise Breach(f"escaped the error family: {type(exc).__name__}: {exc}") from exc
    else:
        outcome.append("ok")


# --------------------------------------------------------------------------- the fixtures


@functools.lru_cache(maxsize=1)
def _source_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)  # trained-like: no two tensors alike
    shapes = {"a.weight": (4, 3), "b.weight": (3, 5), "c.weight": (6,), "d.weight": (2, 4),
              "e.weight": (3, 4), "f.weight": (6, 4), "g.weight": (12, 2), "h.weight": (5,)}
    return {k: torch.randn(s, generator=generator) * (1 + i) + i for i, (k, s) in
            enumerate(shapes.items())}


def source_state() -> dict[str, torch.Tensor]:
    """The source every plan case reads: eight tensors, values far from any initialisation."""
    return dict(_source_state())


_DESTINATION = {"p.weight": (4, 3), "q.weight": (5, 3), "r.weight": (6, 1, 1), "s.weight": (5, 4),
                "t1.weight": (2, 4), "t2.weight": (4, 4), "u.weight": (12, 2), "v.weight": (4,)}


def destination() -> nn.Module:
    """A fresh destination for `base_plan` (values distinct from the source's)."""
    return module_of({k: torch.full(s, -7.0) for k, s in _DESTINATION.items()})


def module_of(state: dict[str, torch.Tensor]) -> nn.Module:
    """A module whose state_dict is ``state`` (dotted keys become submodules)."""
    root = nn.Module()
    for key, tensor in state.items():
        *path, name = key.split(".")
        owner = root
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]  # type: ignore[assignment]
        owner.register_parameter(name, nn.Parameter(tensor.clone()))
    return root


def _match(src: tuple[str, ...], dst: tuple[str, ...], ops: tuple[Op, ...] = ()) -> Match:
    state = _source_state()
    return Match(src=src, dst=dst, src_shapes=tuple(tuple(state[k].shape) for k in src),
                 dst_shapes=tuple(_DESTINATION[k] for k in dst), confidence=0.9,
                 costs=(("type", 0.0), ("regret", 1.5)), src_unit=src[0].split(".")[0],
                 dst_unit=dst[0].split(".")[0], ops=ops)


def base_plan() -> Plan:
    """A valid plan using every kind of adaptation, a mismatch, hints and NaN/Inf keys."""
    from archalign.hints import Hints

    return Plan(
        matches=(_match(("a.weight",), ("p.weight",)),
                 _match(("b.weight",), ("q.weight",), (Op(OpKind.TRANSPOSE),)),
                 _match(("c.weight",), ("r.weight",), (Op(OpKind.RESHAPE, (6, 1, 1), (6,)),)),
                 _match(("d.weight", "e.weight"), ("s.weight",), (Op(OpKind.CONCAT, sizes=(2, 3)),)),
                 _match(("f.weight",), ("t1.weight", "t2.weight"), (Op(OpKind.SPLIT, sizes=(2, 4)),)),
                 _match(("g.weight",), ("u.weight",), (Op(OpKind.REGROUP, groups=(3, 2)),))),
        mismatches=(Mismatch(("h.weight",), ("v.weight",), ((5,),), ((4,),), "shape mismatch",
                             0.7),),
        unmatched_src=("h.weight",), unmatched_dst=("v.weight",), src_tracer="state_dict",
        dst_tracer="registration", verification="not run",
        hints=Hints(pin=(("a", "p"),), forbid=(("b", "p"),), drop=("zz",)),
        nonfinite=("c.weight",))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Bit for bit (NaN included: the bytes are compared)."""
    now = {k: v.detach() for k, v in module.state_dict().items()}
    if now.keys() != before.keys():
        return False
    for key, value in now.items():
        old = before[key]
        if value.dtype != old.dtype or value.shape != old.shape or value.device != old.device:
            return False
        if value.numel() and value.device.type != "meta" and not torch.equal(
                value.contiguous().view(torch.uint8), old.contiguous().view(torch.uint8)):
            return False
    return True


def _apply_checked(plan: Plan, src: Any, outcome: list[str], **kwargs: Any) -> None:
    """Apply ``plan`` into a fresh destination: refused means bit-identical."""
    dst = destination()
    before = _snapshot(dst)
    with refused_or_ok(outcome):
        apply_plan(plan, dst, src, **kwargs)
    if outcome[-1] != "ok" and not _same(dst, before):
        raise Breach(f"a refused apply ({outcome[-1]}) changed the destination")


# --------------------------------------------------------------------------- plans


@_tallied("plan")
def run_plan(data: bytes) -> str:
    """A plan file's bytes: read, render in every way, round trip, invert, apply."""
    outcome: list[str] = []
    with refused_or_ok(outcome):
        plan = Plan.from_json(data)
    if outcome[-1] != "ok":
        return outcome[-1]
    try:  # what a valid plan must always allow
        str(plan)
        format_plan_html(plan)
        render_html(plan)
        plan.to_records()
        plan.to_python()
        if Plan.from_json(plan.to_json()).to_json() != plan.to_json():  # (numbers are rounded)
            raise Breach("a plan read from a file does not survive a round trip")
    except Breach:
        raise
    except Exception as exc:
        raise Breach(f"rendering a plan that was read failed: {type(exc).__name__}: {exc}") from exc
    with refused_or_ok(outcome):
        plan.to_key_mapping()  # refused when an adaptation has no key_mapping form
    with refused_or_ok(outcome):
        plan.inverse()
    _apply_checked(plan, source_state(), outcome, min_confidence=0.0)
    _apply_checked(plan, source_state(), outcome, shape_policy="auto", strict=True)
    return outcome[-1]


# --------------------------------------------------------------------------- checkpoint files


@contextlib.contextmanager
def _opened_files(folder: Path) -> Iterator[list[str]]:
    """Every file the readers open while the block runs: Python's ``open`` (torch.load, json)
    through an audit hook, safetensors' native reader through its ``safe_open``."""
    import safetensors

    seen: list[str] = []
    real = safetensors.safe_open

    def recording(path: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(os.fspath(path))
        return real(path, *args, **kwargs)

    safetensors.safe_open = recording  # type: ignore[assignment,misc]
    _AUDIT.append(seen)
    try:
        yield seen
    finally:
        _AUDIT.remove(seen)
        safetensors.safe_open = real  # type: ignore[misc]


_AUDIT: list[list[str]] = []  # the open-file lists being recorded
_CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".pt", ".pth", ".bin", ".ckpt", ".distcp",
                        ".metadata")  # what a reader may open (imports open .py and .so files)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _AUDIT and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        for seen in _AUDIT:
            seen.append(path)


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only inside _opened_files


def _read_and_use(path: Path, folder: Path) -> str:
    """Read ``path`` as a source; then apply an identity plan of what it holds (every tensor
    read); no file outside ``folder`` may be opened, and no planted payload may run."""
    outcome: list[str] = []
    root = folder.resolve()
    with _opened_files(folder) as seen:
        with refused_or_ok(outcome):
            source = read_source(path)
        if outcome[-1] == "ok":
            _apply_identity(source, path, outcome)
    outside = [p for p in seen if p.endswith(_CHECKPOINT_SUFFIXES)
               and not Path(p).resolve().is_relative_to(root)]
    if outside:
        raise Breach(f"opened files outside the checkpoint's folder: {outside[:3]}")
    if (folder / MARKER).exists():
        raise Breach("a planted payload ran")
    return outcome[-1]


def _apply_identity(source: Any, path: Path, outcome: list[str]) -> None:
    specs = [s for s in source.specs.values() if len(s.shape) > 0 and all(d < 4096 for d in s.shape)
             and s.dtype.is_floating_point and s.device != "meta"][:8]
    if not specs:
        return
    names = {s.key: f"t{i}.w" for i, s in enumerate(specs)}
    dst = module_of({names[s.key]: torch.full(s.shape, -3.0, dtype=s.dtype) for s in specs})
    plan = Plan(matches=tuple(Match((s.key,), (names[s.key],), (s.shape,), (s.shape,), 1.0, (),
                                    s.key, names[s.key]) for s in specs))
    before = _snapshot(dst)
    with refused_or_ok(outcome):
        apply_plan(plan, dst, path)
    if outcome[-1] != "ok" and not _same(dst, before):
        raise Breach(f"a refused apply ({outcome[-1]}) changed the destination")


def valid_safetensors() -> bytes:
    """A small valid safetensors file (what the safetensors cases mutate)."""
    from safetensors.torch import save

    return save({"w.weight": torch.arange(6.0).reshape(2, 3), "w.bias": torch.ones(2),
                 "n": torch.tensor([1, 2], dtype=torch.int64)}, metadata={"format": "pt"})


@_tallied("safetensors")
def run_safetensors(data: bytes, folder: Path) -> str:
    """A ``.safetensors`` file's bytes (headers that lie included)."""
    path = folder / "model.safetensors"
    path.write_bytes(data)
    return _read_and_use(path, folder)


@_tallied("index")
def run_index(data: bytes, folder: Path) -> str:
    """A sharded index's bytes, next to two valid shards, with a valid safetensors file (and a
    link to it) outside the folder that the index may name."""
    inner = folder / "ckpt"
    inner.mkdir(exist_ok=True)
    outside = folder / "outside.safetensors"
    for target in (outside, inner / "model-1.safetensors", inner / "model-2.safetensors"):
        if not target.exists():
            target.write_bytes(valid_safetensors())
    link = inner / "link.safetensors"
    if not link.is_symlink():
        link.symlink_to(outside)
    (inner / "model.safetensors.index.json").write_bytes(data)
    outcome = _read_and_use(inner, inner)
    return outcome


@_tallied("pickle")
def run_pickle(data: bytes, folder: Path, suffix: str = ".pt") -> str:
    """A pickle checkpoint's bytes (zip or old format)."""
    path = folder / f"model{suffix}"
    path.write_bytes(data)
    return _read_and_use(path, folder)


class _Payload:
    """Unpickled, it would create `MARKER` in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (os.system, (f"touch {self.folder / MARKER}",))


def planted_pickles(folder: Path) -> list[bytes]:
    """Pickles that would run code: every protocol, raw and inside torch's zip format, alone
    and inside a state_dict next to real tensors."""
    payload = _Payload(folder)
    out: list[bytes] = []
    for obj in (payload, {"w": torch.ones(2), "x": payload}, {"state_dict": payload}):
        out.extend(pickle.dumps(obj, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1))
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        out.append(buffer.getvalue())
        buffer = io.BytesIO()
        torch.save(obj, buffer, _use_new_zipfile_serialization=False)
        out.append(buffer.getvalue())
    return out


def zipped(data: bytes) -> bytes:
    """``data`` as the data.pkl of a torch zip file (so that a raw pickle reaches the zip reader)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    return buffer.getvalue()


# --------------------------------------------------------------------------- DCP, keys


def dcp_folder(folder: Path) -> bytes:
    """Save `source_state` as a DCP folder at ``folder``; returns its valid ``.metadata``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(source_state(), checkpoint_id=str(folder), no_dist=True)
    return (folder / ".metadata").read_bytes()


@_tallied("dcp")
def run_dcp_metadata(data: bytes, folder: Path) -> str:
    """A DCP ``.metadata`` file's bytes, in a `dcp_folder`."""
    from archalign.distributed import load_distributed_checkpoint

    (folder / ".metadata").write_bytes(data)
    outcome: list[str] = []
    dst = destination()
    before = _snapshot(dst)
    root = folder.resolve()
    with _opened_files(folder) as seen, refused_or_ok(outcome):
        load_distributed_checkpoint(base_plan(), dst, folder, min_confidence=0.0)
    if outcome[-1] != "ok" and not _same(dst, before):
        raise Breach(f"a refused DCP load ({outcome[-1]}) changed the destination")
    if (folder / MARKER).exists():
        raise Breach("a planted payload in DCP metadata ran")
    outside = [p for p in seen if p.endswith(_CHECKPOINT_SUFFIXES)
               and not Path(p).resolve().is_relative_to(root)]
    if outside:
        raise Breach(f"DCP read files outside its folder: {outside[:3]}")
    return outcome[-1]


@_tallied("keys")
def run_keys(keys: list[str], folder: Path) -> str:
    """State_dict keys of any text (control characters, markup, ``__metadata__``): align, render,
    round trip, apply and convert must hold or refuse, never break."""
    import archalign

    generator = torch.Generator().manual_seed(len(keys))
    state = {k: torch.randn(3 + i % 2, 2, generator=generator) for i, k in enumerate(keys)}
    outcome: list[str] = []
    with refused_or_ok(outcome):
        plan = archalign.align(state, dict(state))
    if outcome[-1] != "ok":
        return outcome[-1]
    try:
        text = str(plan) + format_plan_html(plan) + render_html(plan) + plan.to_python()
        if Plan.from_json(plan.to_json()).to_json() != plan.to_json():
            raise Breach("a plan of these keys does not survive a round trip")
        json.loads(plan.to_json())
        del text
    except Breach:
        raise
    except Exception as exc:
        raise Breach(f"rendering the plan failed: {type(exc).__name__}: {exc}") from exc
    out = folder / "converted"
    before = _contents(out)
    with refused_or_ok(outcome):
        plan.convert_checkpoint(state, out, min_confidence=0.0, overwrite=True)
    if outcome[-1] == "ok":
        back = read_source(out)
        for match in plan.matches:
            if not torch.equal(back.get(match.dst[0]), state[match.src[0]]):
                raise Breach(f"{match.dst[0]!r} was converted to other values")
    elif _contents(out) != before:
        raise Breach(f"a refused conversion ({outcome[-1]}) changed the output folder")
    return outcome[-1]


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included), by relative path."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
