"""Hostile and faulty inputs (docs/security.md): no code runs from any file, no file outside a
checkpoint's folder is opened, every failure is an `ArchalignError` (or an `OSError` naming the
file) and leaves the destination bit-identical. Property-based: hypothesis tampers with plan
files, sharded indexes, safetensors headers, pickles and DCP metadata, and makes keys of any text;
every case goes through an oracle of tests/hostile.py, which raises `Breach` when a promise
breaks. The budgets here are small (CI); benchmarks/hostile.py runs the same oracles for long.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import hostile

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch: pickle protocols, DCP

EXAMPLES = int(os.environ.get("ARCHALIGN_HOSTILE_EXAMPLES", "200"))  # benchmarks/hostile.py: more
CI = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------- strategies

LEAVES = (st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats()
          | st.text(max_size=12) | st.sampled_from(["1e400", "\ud800", "..", "/etc/passwd", "[/]"]))
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def tampered(draw: Any, data: Any) -> Any:
    """``data`` (JSON-like) with one to three places replaced, deleted or wrapped."""
    data = json.loads(json.dumps(data))
    for _ in range(draw(st.integers(1, 3))):
        parent: Any = None
        key: Any = None
        node = data
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        if parent is None:
            continue
        action = draw(st.sampled_from(["replace", "delete", "wrap", "number"]))
        if action == "delete":
            del parent[key]
        elif action == "wrap":
            parent[key] = [parent[key]]
        elif action == "number":
            parent[key] = draw(st.sampled_from([0, 1, -1, 2**63, 10**400 // 10**300, 1.5,
                                                float("inf"), float("nan"), True]))
        else:
            parent[key] = draw(JSON)
    return data


@st.composite
def byte_edits(draw: Any, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, inserted, deleted, or the end cut off."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        at = draw(st.integers(0, len(out) - 1))
        edit = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if edit == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del out[at:at + draw(st.integers(1, 8))]
        else:
            del out[at:]
    return bytes(out)


def _dumps(data: Any) -> bytes:
    return json.dumps(data, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def folder() -> Any:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


# --------------------------------------------------------------------------- plans


def test_the_untampered_cases_pass(folder: Path) -> None:
    assert hostile.run_plan(hostile.base_plan().to_json().encode()) == "ok"
    assert hostile.run_safetensors(hostile.valid_safetensors(), folder) == "ok"
    weight_map = {"w.weight": "model-1.safetensors", "n": "model-2.safetensors"}
    assert hostile.run_index(_dumps({"weight_map": weight_map}), folder) == "ok"


@CI
@given(st.data())
def test_a_tampered_plan_is_refused_or_works_everywhere(data: Any) -> None:
    text = _dumps(data.draw(tampered(hostile.base_plan().to_dict())))
    if data.draw(st.booleans()):
        text = data.draw(byte_edits(text))
    hostile.run_plan(text)


def _edited(match: int, field: str, value: Any) -> bytes:
    """The base plan with one field of one match's first op (or of the match) set to ``value``."""
    data = hostile.base_plan().to_dict()
    entry = data["matches"][match]
    if field in ("groups", "sizes"):
        entry["ops"][0][field] = value
    else:
        entry[field] = value
    return _dumps(data)


ISSUE_PLANS = {  # the tampered plans of issue #13, item 7
    "not UTF-8": b"\xff\xfe{}", "deep nesting": b'{"matches": ' + b"[" * 100_000,
    "a bare number": b"1e400", "empty": b"",
    "regroup of one group": _edited(5, "groups", [3]), "regroup of no group": _edited(5, "groups", []),
    "regroup of 1x12": _edited(5, "groups", [1, 12]), "split of size 0": _edited(4, "sizes", [0, 6]),
    "1e400 in a shape": _edited(0, "src_shapes", [[float("inf"), 3]]),
    "an absurd size": _edited(0, "src_shapes", [[4 * 10**18, 3]]),
    "a size beyond int64": _edited(0, "src_shapes", [[2**64, 3]]),
    "a negative size": _edited(0, "dst_shapes", [[-4, 3]]),
    "a NaN confidence": _edited(0, "confidence", float("nan")),
}


@pytest.mark.parametrize("text", ISSUE_PLANS.values(), ids=ISSUE_PLANS.keys())
def test_the_plan_files_of_the_issue_are_plan_errors(text: bytes) -> None:
    assert hostile.run_plan(text) == "PlanError"


# --------------------------------------------------------------------------- checkpoint files

NAMES = st.sampled_from(["model-1.safetensors", "model-2.safetensors", "link.safetensors",
                         "../outside.safetensors", "ckpt/../model-1.safetensors",
                         "./model-2.safetensors", "/etc/passwd", "", "model.safetensors.index.json",
                         "model-1.safetensors\x00", "C:\\outside.safetensors",
                         "..\\outside.safetensors", "sub/../../outside.safetensors"]) | st.text(
                             max_size=12)
KEYS = st.sampled_from(["w.weight", "w.bias", "n", "missing", "__metadata__"]) | st.text(max_size=6)


@CI
@given(st.dictionaries(KEYS, NAMES, max_size=4), st.data())
def test_a_tampered_index_reads_nothing_outside_its_folder(folder: Path, weight_map: Any,
                                                           data: Any) -> None:
    index: Any = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    if data.draw(st.integers(0, 4)) == 0:
        index = data.draw(tampered(index))
    hostile.run_index(_dumps(index), folder)


def test_an_index_naming_the_outside_file_by_absolute_path_is_refused(folder: Path) -> None:
    outside = str((folder / "outside.safetensors").resolve())
    hostile.run_index(_dumps({"weight_map": {"w.weight": "model-1.safetensors"}}), folder)
    assert hostile.run_index(_dumps({"weight_map": {"w.weight": outside}}), folder) == "SourceError"


DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "C64",
                          "F8_E4M3", "F8_E5M2", "U64", "F4", "XX", ""])


@st.composite
def safetensors_files(draw: Any) -> bytes:
    """A safetensors file whose header may lie (dtypes, shapes, offsets, its own length)."""
    entries: dict[str, Any] = {}
    for key in draw(st.lists(KEYS, max_size=4, unique=True)):
        entries[key] = {"dtype": draw(DTYPES),
                        "shape": draw(st.lists(st.integers(-2, 2**40) | st.integers(0, 4),
                                               max_size=3)),
                        "data_offsets": draw(st.lists(st.integers(-1, 2**33) | st.integers(0, 64),
                                                      min_size=2, max_size=2))}
        if draw(st.integers(0, 5)) == 0:
            entries[key] = draw(tampered(entries[key]))
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), JSON, max_size=2))
    header = _dumps(entries)
    length = len(header) if draw(st.integers(0, 3)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=96))


@CI
@given(safetensors_files() | byte_edits(hostile.valid_safetensors()))
def test_a_lying_safetensors_file_is_refused_or_read_whole(folder: Path, data: bytes) -> None:
    hostile.run_safetensors(data, folder)


TENSORS = st.sampled_from([
    torch.ones(2, 3), torch.arange(6, dtype=torch.int64), torch.zeros(0, 4), torch.tensor(3.0),
    torch.ones(2, 2, dtype=torch.complex64), torch.ones(3, dtype=torch.float16),
    torch.eye(3).to_sparse(), torch.eye(3).to_sparse_csr(), torch.ones(4, 2).t(),
    torch.ones(2, dtype=torch.bool), torch.full((2,), float("nan")),
    torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), torch.nn.Parameter(torch.ones(2)),
])
PICKLED = st.recursive(
    TENSORS | LEAVES | st.sampled_from([torch.Size([2, 3]), torch.float32, b"bytes"]),
    lambda inner: st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(KEYS, inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3).map(
        OrderedDict) | st.dictionaries(st.integers(0, 3), inner, max_size=2)
    | st.dictionaries(KEYS, inner, max_size=2).map(lambda d: {"state_dict": d}), max_leaves=8)


def _saved(obj: Any, legacy: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


@CI
@given(PICKLED, st.booleans(), st.sampled_from([".pt", ".bin", ".ckpt"]), st.data())
def test_a_pickle_of_odd_objects_is_refused_or_read(folder: Path, obj: Any, legacy: bool,
                                                   suffix: str, data: Any) -> None:
    raw = _saved(obj, legacy)
    if data.draw(st.integers(0, 3)) == 0:
        raw = data.draw(byte_edits(raw))
    hostile.run_pickle(raw, folder, suffix)


def test_no_planted_pickle_runs(folder: Path) -> None:
    cases = hostile.planted_pickles(folder)
    outcomes = [hostile.run_pickle(data, folder) for data in cases]
    outcomes += [hostile.run_pickle(hostile.zipped(pickle.dumps(hostile._Payload(folder), p)),
                                    folder) for p in range(2, pickle.HIGHEST_PROTOCOL + 1)]
    assert set(outcomes) == {"SourceError"} and len(outcomes) == len(cases) + 4


# --------------------------------------------------------------------------- DCP, keys


@pytest.fixture(scope="module")
def dcp(folder: Path) -> tuple[Path, bytes]:
    where = folder / "dcp"
    return where, hostile.dcp_folder(where)


def test_the_untampered_dcp_folder_loads(dcp: tuple[Path, bytes]) -> None:
    assert hostile.run_dcp_metadata(dcp[1], dcp[0]) == "ok"


@CI
@given(st.data())
def test_tampered_dcp_metadata_runs_nothing_and_reads_only_its_folder(dcp: tuple[Path, bytes],
                                                                      data: Any) -> None:
    where, valid = dcp
    choice = data.draw(st.integers(0, 2))
    if choice == 0:
        raw = data.draw(byte_edits(valid))
    elif choice == 1:
        raw = pickle.dumps(data.draw(PICKLED.filter(lambda o: not isinstance(o, torch.Tensor))),
                           protocol=data.draw(st.integers(0, pickle.HIGHEST_PROTOCOL)))
    else:
        raw = pickle.dumps(hostile._Payload(where), protocol=data.draw(st.integers(0, 5)))
    hostile.run_dcp_metadata(raw, where)


CONTROL = st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "L", "N", "P", "S"]),
                  min_size=1, max_size=6)
KEY_TEXT = CONTROL | st.sampled_from(["[/]w", "[bold]x[/bold]", "\x1b[31mred\x1b[0m", "__metadata__",
                                      "a.b", "\r\n", "\u202etxt", "x" * 300])


@settings(CI, max_examples=max(1, EXAMPLES // 3))
@given(st.lists(KEY_TEXT, min_size=1, max_size=5, unique=True))
def test_keys_of_any_text_align_render_round_trip_and_convert(folder: Path, keys: list[str]) -> None:
    hostile.run_keys(keys, folder)
