"""Converted checkpoints written straight to (sharded) safetensors."""

from __future__ import annotations

import dataclasses
import errno
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

import archalign
import archalign.convert
from archalign.convert import write_safetensors, write_safetensors_file
from archalign.errors import ApplyError, PlanError, UsageError
from corpus import get_pair, run_model


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 20_000])
def test_converted_checkpoint_loads_and_reproduces_the_source(tmp_path: Path,
                                                              max_shard_bytes: int) -> None:
    pair = get_pair("hf_llama->hf_phi3")
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    files = plan.convert_checkpoint(src, tmp_path, max_shard_bytes=max_shard_bytes)
    if max_shard_bytes > 1 << 29:
        assert [f.name for f in files] == ["model.safetensors"]
    else:
        assert files[-1].name == "model.safetensors.index.json" and len(files) > 3
    dst = pair.make_dst()
    # the folder is itself a source: read it back through archalign's own reader
    state = archalign.source.read_source(tmp_path)
    dst.load_state_dict({k: state.get(k) for k in state.specs}, strict=True)
    inputs = pair.make_inputs()
    assert float((run_model(src, inputs) - run_model(dst, inputs)).abs().max()) <= 1e-5


def test_convert_checks_the_source_and_the_shard_size(tmp_path: Path) -> None:
    pair = get_pair("mlp->mlp_identical")
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    with pytest.raises(UsageError):
        plan.convert_checkpoint(src, tmp_path, max_shard_bytes=0)
    with pytest.raises(PlanError, match="has no tensor"):
        plan.convert_checkpoint({"x": torch.zeros(1)}, tmp_path)


def test_a_plan_whose_adaptation_does_not_fit_is_refused_before_any_file(tmp_path: Path) -> None:
    pair = get_pair("hf_llama->hf_phi3")
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    fused = next(i for i, m in enumerate(plan.matches) if m.ops)
    bad = plan.matches[fused].ops[0]
    tampered = dataclasses.replace(plan.matches[fused], ops=(
        dataclasses.replace(bad, sizes=tuple(n + 1 for n in bad.sizes)),))
    plan = dataclasses.replace(plan, matches=(*plan.matches[:fused], tampered,
                                              *plan.matches[fused + 1:]))
    with pytest.raises(PlanError, match="concat"):
        plan.convert_checkpoint(src, tmp_path / "out", max_shard_bytes=20_000)
    assert not (tmp_path / "out").exists()


def _mlp() -> tuple[torch.nn.Module, archalign.Plan]:
    pair = get_pair("mlp->mlp_identical")
    src = pair.make_src()
    return src, archalign.align(src, pair.make_dst())


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)")])
@pytest.mark.parametrize("earlier", [False, True])
@pytest.mark.parametrize("writers", [1, 2])
def test_a_failed_conversion_leaves_nothing_and_keeps_the_earlier_checkpoint(
        tmp_path: Path, monkeypatch, failure: BaseException, earlier: bool,  # type: ignore[no-untyped-def]
        writers: int) -> None:
    src, plan = _mlp()
    out = tmp_path / "out"
    if earlier:
        plan.convert_checkpoint(src, out)
    before = _files(out) if earlier else None
    real, calls = safetensors.torch.save_file, []

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[1])
        if len(calls) == 3:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    expected = KeyboardInterrupt if isinstance(failure, KeyboardInterrupt) else OSError
    with pytest.raises(expected) as info:
        plan.convert_checkpoint(src, out, max_shard_bytes=200, overwrite=True, writers=writers)
    if expected is OSError:
        assert info.value.errno == 28 and info.value.filename == str(out)
        assert "No space left on device (writing shard 3" in info.value.strerror
    # one writer stops at the failure; with two, the next shard may have started meanwhile
    assert len(calls) == 3 if writers == 1 else 3 <= len(calls) <= 4
    assert not [t for t in threading.enumerate() if t.name.startswith("archalign-writer")]
    assert (_files(out) == before) if earlier else not out.exists()


def test_a_file_size_limit_is_an_os_error_and_leaves_nothing(tmp_path: Path) -> None:
    script = (
        "import resource, sys, torch, archalign\n"
        "from corpus import get_pair\n"
        "pair = get_pair('mlp->mlp_identical'); src = pair.make_src()\n"
        "plan = archalign.align(src, pair.make_dst())\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))\n"
        "try:\n"
        "    plan.convert_checkpoint(src, sys.argv[1])\n"
        "except OSError as exc:\n"
        "    print(exc.errno, exc.filename)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], check=True,
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.stdout.split() == [str(errno.EFBIG), str(tmp_path / "out" / "model.safetensors")]
    assert not (tmp_path / "out").exists()


def test_converting_into_an_earlier_checkpoint_needs_overwrite_and_leaves_no_stale_file(
        tmp_path: Path) -> None:
    src, plan = _mlp()
    plan.convert_checkpoint(src, tmp_path, max_shard_bytes=200)  # sharded
    (tmp_path / "config.json").write_text("{}")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    with pytest.raises(UsageError, match=r"already holds a checkpoint.*overwrite=True"):
        plan.convert_checkpoint(src, tmp_path)
    files = plan.convert_checkpoint(src, tmp_path, overwrite=True)  # one file now
    assert [p.name for p in files] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    back = archalign.source.read_source(tmp_path)
    for match in plan.matches:
        assert torch.equal(back.get(match.dst[0]), src.state_dict()[match.src[0]])


def test_a_destination_key_safetensors_reserves_is_refused_before_any_file(tmp_path: Path) -> None:
    src, plan = _mlp()
    first = dataclasses.replace(plan.matches[0], dst=("__metadata__",))
    plan = dataclasses.replace(plan, matches=(first, *plan.matches[1:]))
    with pytest.raises(PlanError, match="'__metadata__', the name safetensors keeps"):
        plan.convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failing_adaptation_is_an_apply_error_and_leaves_nothing(tmp_path: Path,
                                                                  monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pair = get_pair("hf_llama->hf_phi3")
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    real = archalign.convert.apply_ops

    def failing(tensors, ops):  # type: ignore[no-untyped-def]
        if ops:
            raise RuntimeError("injected")
        return real(tensors, ops)

    monkeypatch.setattr(archalign.convert, "apply_ops", failing)
    with pytest.raises(ApplyError, match="injected; nothing was written"):
        plan.convert_checkpoint(src, tmp_path / "out", max_shard_bytes=20_000)
    assert not (tmp_path / "out").exists()


def test_one_source_tensor_written_to_two_keys_is_stored_twice(tmp_path: Path) -> None:
    src, plan = _mlp()
    first = plan.matches[0]
    twin = dataclasses.replace(first, dst=(first.dst[0] + "_twin",))
    plan = dataclasses.replace(plan, matches=(*plan.matches, twin))
    plan.convert_checkpoint(src, tmp_path)
    back = archalign.source.read_source(tmp_path)
    assert torch.equal(back.get(first.dst[0]), back.get(twin.dst[0]))


# --------------------------------------------------------------------------- the writer


def tensors(n: int, size: int = 64) -> list[tuple[str, torch.Tensor]]:
    return [(f"layer.{i}.weight", torch.full((size,), float(i))) for i in range(n)]


def test_convert_reports_progress_per_tensor(tmp_path: Path) -> None:
    pair = get_pair("mlp->mlp_identical")
    src = pair.make_src()
    plan = archalign.align(src, pair.make_dst())
    seen: list[tuple[int, int]] = []
    plan.convert_checkpoint(src, tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(n, len(plan.matches)) for n in range(1, len(plan.matches) + 1)]


def test_a_new_checkpoint_replaces_every_file_of_an_earlier_one(tmp_path: Path) -> None:
    sharded = write_safetensors(tensors(6), tmp_path, max_shard_bytes=600)
    assert len(sharded) == 4 and sharded[-1].name == "model.safetensors.index.json"
    (tmp_path / "notes.txt").write_text("kept")
    single = write_safetensors(tensors(2), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.txt"]
    assert single == [tmp_path / "model.safetensors"]
    assert sorted(archalign.read_source(tmp_path).specs) == ["layer.0.weight", "layer.1.weight"]


def test_a_failed_write_names_the_real_file_and_leaves_nothing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def full_disk(shard: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
        calls.append(path)
        if len(calls) == 2:  # the second shard: the first one is already on disk
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left "
                                              "on device (os error 28)")
        real(shard, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError) as exc:
        write_safetensors(tensors(6), out, max_shard_bytes=600)
    assert (exc.value.errno, exc.value.filename) == (errno.ENOSPC, str(out))
    assert exc.value.strerror.startswith("No space left on device (writing shard")
    assert not out.exists()  # the first shard and the folder it created are gone
    calls.clear()
    write_safetensors_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")  # call 1 writes
    with pytest.raises(OSError) as exc:  # call 2 fails: the file written before stays whole
        write_safetensors_file({"a": torch.ones(2)}, tmp_path / "one.safetensors")
    assert exc.value.filename == str(tmp_path / "one.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors"]
    assert torch.equal(archalign.read_source(tmp_path / "one.safetensors").get("a"), torch.zeros(2))


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    def interrupted() -> Iterator[tuple[str, torch.Tensor]]:
        yield from tensors(3)
        raise KeyboardInterrupt

    (tmp_path / "model.safetensors").write_bytes(b"earlier")
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(interrupted(), tmp_path, max_shard_bytes=300)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # untouched
    assert (tmp_path / "model.safetensors").read_bytes() == b"earlier"


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(OSError) as exc:
        write_safetensors(tensors(1), tmp_path / "a" / "b")
    assert (exc.value.errno, exc.value.filename) == (errno.ENOENT, str(tmp_path / "a"))
    with pytest.raises(OSError, match="does not exist"):
        write_safetensors_file({"a": torch.zeros(1)}, tmp_path / "a" / "x.safetensors")


@pytest.mark.parametrize("writers", [2, 3])
def test_writer_threads_write_the_same_files_as_one_writer(tmp_path: Path, writers: int) -> None:
    one = write_safetensors(tensors(9), tmp_path / "one", max_shard_bytes=600, writers=1)
    many = write_safetensors(tensors(9), tmp_path / "many", max_shard_bytes=600, writers=writers)
    assert [p.name for p in one] == [p.name for p in many] and len(one) == 6
    assert _files(tmp_path / "one") == _files(tmp_path / "many")


def test_writer_threads_hold_at_most_their_number_of_shards(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real, lock = safetensors.torch.save_file, threading.Lock()
    busy, most = [0], [0]

    def slow(shard: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.05)
        real(shard, path, metadata=metadata)
        with lock:
            busy[0] -= 1

    monkeypatch.setattr(safetensors.torch, "save_file", slow)
    write_safetensors(tensors(12), tmp_path, max_shard_bytes=300, writers=2)
    assert most[0] == 2  # both threads worked at once, and never more shards than threads
    assert sorted(archalign.read_source(tmp_path).specs) == sorted(k for k, _ in tensors(12))


@pytest.mark.parametrize("writers", [0, -1, 1.5, True])
def test_writers_must_be_a_positive_count(tmp_path: Path, writers: object) -> None:
    src, plan = _mlp()
    with pytest.raises(UsageError, match=f"writers must be a positive number of threads, got "
                                         f"{writers!r}"):
        plan.convert_checkpoint(src, tmp_path / "out", writers=writers)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="writers must be"):
        write_safetensors(tensors(1), tmp_path / "out", writers=writers)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
