"""The command line: every command end to end, its exit codes, and what a new user meets.

Most commands run in-process (`main`); the ones whose point is the real entry point (exit codes
and stderr of the process, the working directory, a file-size limit, the round trips into
Hugging Face and timm) run ``python -m archalign`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import archalign
from archalign.cli import main
from archalign.factories import build_model
from archalign.plan import Match, Plan

ROOT = Path(__file__).resolve().parents[1]
SRC = "torchvision.models:resnet18(num_classes=10)"
DST = "timm:create_model('resnet18', num_classes=10)"


def run_cli(*args: str, cwd: Path | None = None, launcher: Path | None = None,
            limit_file_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m archalign ARGS`` (or ``python LAUNCHER ARGS``, which starts like the installed
    ``archalign`` script) in a fresh process that imports this checkout's archalign."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def limit() -> None:
        if limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    head = [sys.executable, str(launcher)] if launcher else [sys.executable, "-m", "archalign"]
    return subprocess.run([*head, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          preexec_fn=limit, timeout=300, check=False)


def one_error_line(stderr: str) -> str:
    """The single line an input error prints (no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights away from their initialisation (norms not identity, heads not zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():  # not the non-persistent buffers (rotary)
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
                if tensor.dim() == 1:
                    tensor.abs_().add_(0.5)  # also running_var stays positive
    return model.eval()


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "plan.json"
    torch.manual_seed(0)
    assert main(["propose", SRC, DST, "-o", str(path), "--no-check"]) == 0
    return path


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    src = trained_like(build_model(SRC))
    path = tmp_path_factory.mktemp("src") / "src.safetensors"
    save_file(src.state_dict(), str(path))
    return src, path


# --------------------------------------------------------------------------- the commands


def test_propose_prints_the_table_and_saves_the_plan(plan_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(plan_file.read_text())
    assert data["archalign_plan"] == 1 and len(data["matches"]) == 122
    assert main(["show", str(plan_file), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "122 matches" in out and "122 to load" in out and "119 more rows" in out


def test_apply_writes_a_file_that_loads(plan_file: Path, source_checkpoint,  # type: ignore[no-untyped-def]
                                        tmp_path: Path) -> None:
    src, checkpoint = source_checkpoint
    out = tmp_path / "dst.safetensors"
    assert main(["apply", str(checkpoint), str(plan_file), DST, "-o", str(out), "--strict"]) == 0
    dst = build_model(DST)
    dst.load_state_dict(load_file(str(out)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_strict_refusal_exits_1(plan_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    checkpoint = tmp_path / "src.pt"
    torch.save(dict(build_model(SRC).state_dict()), checkpoint)
    out = tmp_path / "dst.safetensors"
    code = main(["apply", str(checkpoint), str(plan_file), DST, "-o", str(out), "--strict",
                 "--min-confidence", "1.0"])
    assert code == 1 and not out.exists()
    assert capsys.readouterr().err.startswith("refused: strict: ")


def test_apply_that_would_load_nothing_saves_nothing(plan_file: Path, source_checkpoint,  # type: ignore[no-untyped-def]
                                                     tmp_path: Path, capsys) -> None:
    """Without --strict, a plan none of whose matches reaches --min-confidence would save the
    destination's initial values as if ported: refused, naming why, and no file."""
    _, checkpoint = source_checkpoint
    out = tmp_path / "dst.safetensors"
    code = main(["apply", str(checkpoint), str(plan_file), DST, "-o", str(out),
                 "--min-confidence", "1.0"])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "122 matches are all below --min-confidence 1.00" in err
    assert f"nothing was saved to {out}" in err


def test_verify_and_export(plan_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["verify", SRC, DST, "--plan", str(plan_file), "--input", "randn:1,3,64,64"]) == 0
    assert "outputs agree" in capsys.readouterr().out
    assert main(["verify", SRC, DST, "--input", "randn:1,3,64,64"]) == 1  # not loaded: differ
    mapping = tmp_path / "km.json"
    assert main(["export", str(plan_file), "--key-mapping", str(mapping)]) == 0
    assert json.loads(mapping.read_text()) == {}  # same names: nothing to rename
    code = tmp_path / "convert.py"
    assert main(["export", str(plan_file), "--python", str(code)]) == 0
    assert "def convert_state_dict" in code.read_text()
    assert "def checkpoint_filter_fn" in code.read_text()
    rules = tmp_path / "rules.py"
    assert main(["export", str(plan_file), "--conversion-rules", str(rules),
                 "--destination-class", "ResNet"]) == 0
    assert 'def register(model_type_or_class_name="ResNet"' in rules.read_text()


def test_a_checkpoint_on_its_source_structure(source_checkpoint, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              capsys, caplog) -> None:
    src, _ = source_checkpoint
    wrapped = tmp_path / "ddp.pt"  # a DDP save: every key under module.
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, wrapped)
    plan = tmp_path / "plan.json"
    # the checkpoint alone: --input orders the destination only, and the user is told so
    assert main(["propose", str(wrapped), DST, "--input", "randn:1,3,64,64", "--limit", "1"]) == 0
    assert "used for the destination only" in caplog.text and "--source-structure" in caplog.text
    assert main(["verify", str(wrapped), DST, "--input", "randn:1,3,64,64"]) == 2
    assert "give --source-structure FACTORY" in capsys.readouterr().err
    # with its structure, the source is the module: the plan is checked by running both
    assert main(["propose", str(wrapped), DST, "--source-structure", SRC, "-o", str(plan),
                 "--limit", "1"]) == 0
    assert "verification: outputs agree" in capsys.readouterr().out
    out = tmp_path / "dst.safetensors"
    assert main(["apply", str(wrapped), str(plan), DST, "--source-structure", SRC, "-o", str(out),
                 "--strict"]) == 0
    dst = build_model(DST)
    dst.load_state_dict(load_file(str(out)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert main(["verify", str(wrapped), DST, "--source-structure", SRC, "--plan", str(plan),
                 "--input", "randn:1,3,64,64"]) == 0
    assert "outputs agree" in capsys.readouterr().out
    assert main(["propose", SRC, DST, "--source-structure", SRC]) == 2
    assert "builds the module itself" in capsys.readouterr().err


def test_report_names_what_it_compares(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["report", SRC, DST, "-o", str(out), "--no-check"]) == 0
    page = out.read_text()
    assert "layer4.1.conv2" in page and "https://" not in page
    assert '"source":"torchvision.models:resnet18(num_classes=10)"' in page
    assert "timm:create_model('resnet18', num_classes=10)" in page


def test_a_training_checkpoint_entry_is_picked_with_entry(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    checkpoint = tmp_path / "last.ckpt"
    model = torch.nn.Linear(4, 3)
    torch.save({"model": model.state_dict(), "optimizer": {"lr": 0.1}, "epoch": 3}, checkpoint)
    factory = "torch.nn:Linear(4, 3)"
    assert main(["propose", str(checkpoint), factory, "--no-check"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'model' (2 tensors)" in line and "--entry model" in line
    plan = tmp_path / "plan.json"
    assert main(["propose", str(checkpoint), factory, "--entry", "model", "-o", str(plan)]) == 0
    out = tmp_path / "out.safetensors"
    assert main(["apply", str(checkpoint), str(plan), factory, "--entry", "model", "-o",
                 str(out)]) == 0
    assert torch.equal(load_file(str(out))["weight"], model.weight.detach())


def test_convert_writes_a_folder_from_pretrained_loads(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("transformers")
    from corpus import get_pair, run_model

    pair = get_pair("hf_llama->hf_phi3")
    src, dst = trained_like(pair.make_src()), pair.make_dst()
    src.save_pretrained(tmp_path / "llama")  # planned as a model, converted as a checkpoint
    dst.save_pretrained(tmp_path / "phi3")  # its config (and random weights: not used)
    plan = tmp_path / "plan.json"
    assert main(["propose", str(tmp_path / "llama"), str(tmp_path / "phi3"), "-o", str(plan)]) == 0
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "llama" / "model.safetensors"), str(plan), "-o",
                 str(out), "--config", str(tmp_path / "phi3"), "--max-shard-size", "100000"]) == 0
    assert "config.json, model-00001-of-" in capsys.readouterr().out
    loaded = type(dst).from_pretrained(out).eval()
    inputs = pair.make_inputs()
    assert float((run_model(loaded, inputs) - run_model(src, inputs)).abs().max()) <= 1e-5
    one = tmp_path / "one"  # one writer thread: the same files
    assert main(["convert", str(tmp_path / "llama" / "model.safetensors"), str(plan), "-o",
                 str(one), "--config", str(tmp_path / "phi3"), "--max-shard-size", "100000",
                 "--writers", "1"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        p.name: p.read_bytes() for p in one.iterdir()}
    assert main(["convert", str(tmp_path / "llama" / "model.safetensors"), str(plan), "-o",
                 str(tmp_path / "none"), "--writers", "0"]) == 2
    assert "writers must be a positive number of threads, got 0" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------- ordinary mistakes


@pytest.mark.parametrize(("argv", "says"), [
    (["propose", SRC, "timm:create_model('resnet1888')"], "similar name: resnet18"),
    (["propose", SRC, "timm:create_model"], "missing 1 required positional argument"),
    (["propose", SRC, "transformers:LlamaForCausalLM"], "built from its config"),
    (["propose", SRC, "torchvision.models:resnt18"], "did you mean resnet18"),
    (["propose", "no_such_module:f", DST], "cannot import 'no_such_module'"),
    (["propose", SRC, "torch:tensor(1)"], "built a Tensor, not an nn.Module"),
    (["propose", SRC, "torch.nn:Linear(in_features=x)"], "must be Python literals"),
    (["propose", SRC, DST, "--input", "randn:1,3"], "give an --input both models accept"),
    (["propose", SRC, DST, "--input", "zeros:1"], "use 'randn:SHAPE' or 'ids:SHAPE'"),
    (["propose", SRC, "missing/model.safetensors"], "no such file or folder"),
    (["show", "/nonexistent/plan.json"], "/nonexistent/plan.json: No such file or directory"),
    (["verify", SRC, DST], "verify needs --input"),
    (["apply", SRC, "plan.json", DST, "-o", "/nonexistent/out.safetensors"],
     "/nonexistent: the output's folder does not exist"),
])
def test_input_errors_exit_2_in_one_line(argv: list[str], says: str, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(argv) == 2
    assert says in one_error_line(capsys.readouterr().err)


def test_show_given_a_checkpoint_or_binary_says_it_is_not_a_plan(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    checkpoint = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(checkpoint))
    assert main(["show", str(checkpoint)]) == 2
    assert "is a checkpoint, not a plan" in one_error_line(capsys.readouterr().err)
    binary = tmp_path / "plan.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["show", str(binary)]) == 2
    assert "a plan file is UTF-8 text" in one_error_line(capsys.readouterr().err)


def test_a_plan_for_another_destination_says_what_does_not_fit(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    plan = tmp_path / "plan18.json"
    assert main(["propose", "torchvision.models:resnet18", "torchvision.models:resnet18",
                 "--no-check", "-o", str(plan)]) == 0
    capsys.readouterr()
    out = tmp_path / "out.safetensors"
    assert main(["apply", "torchvision.models:resnet18", str(plan),
                 "torchvision.models:resnet34", "-o", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "was made for another destination: 96 of the destination's tensors" in line
    assert "(layer1.2.conv1.weight, " in line and "and 91 more" in line and len(line) < 400
    assert not out.exists()


def test_hostile_keys_are_shown_as_text(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    def match(src: str, dst: str) -> Match:
        return Match(src=(src,), dst=(dst,), src_shapes=((3,),), dst_shapes=((3,),),
                     confidence=0.7, costs=(), src_unit=src, dst_unit=dst)

    plan = Plan(matches=(match("[/]w", "\x1b[2Jbias"), match("[bold]x", "\u202eweight")),
                unmatched_src=("weight", "bias"), unmatched_dst=("weight", "bias"),
                src_tracer="fx", dst_tracer="fx")
    plan.save(tmp_path / "hostile.json")
    assert main(["show", str(tmp_path / "hostile.json")]) == 0
    out = capsys.readouterr().out
    assert "[/]w" in out and "[bold]x" in out and "\\x1b[2Jbias" in out and "\\u202eweight" in out
    assert "\x1b" not in out and "\u202e" not in out
    # apply: the error that names the key is printed as text too
    code = main(["apply", "torch.nn:Linear(3, 3)", str(tmp_path / "hostile.json"),
                 "torch.nn:Linear(3, 3)", "-o", str(tmp_path / "out.safetensors")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "'[/]w'" in line and "\x1b" not in line


def test_a_read_only_folder_is_named(tmp_path: Path, plan_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["apply", SRC, str(plan_file), DST, "-o", str(folder / "x.safetensors")]) == 2
        assert f"{folder}: Permission denied" in one_error_line(capsys.readouterr().err)
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- the entry point


def test_the_command_answers_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    done = run_cli("apply", "torch.nn:Linear(2, 2)", "plan.json", "torch.nn:Linear(2, 2)",
                   "-o", str(tmp_path / "missing" / "out.safetensors"))
    assert done.returncode == 2
    assert one_error_line(done.stderr) == (f"error: {tmp_path / 'missing'}: the output's folder "
                                           "does not exist")


def test_version(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"archalign {archalign.__version__}\n"


def test_a_file_size_limit_is_an_input_error_naming_the_file(tmp_path: Path) -> None:
    factory = "torch.nn:Linear(300, 300)"  # 361 kB of weights
    plan = tmp_path / "plan.json"
    assert main(["propose", factory, factory, "--no-check", "-o", str(plan)]) == 0
    out = tmp_path / "out"
    out.mkdir()
    target = out / "big.safetensors"
    done = run_cli("apply", factory, str(plan), factory, "-o", str(target),
                   limit_file_bytes=200_000)
    assert done.returncode == 2, done.stderr
    assert one_error_line(done.stderr) == f"error: {target}: File too large"
    assert list(out.iterdir()) == []  # no partial file, no temporary file


@pytest.mark.parametrize("entry", ["installed", "module"])
def test_factories_never_import_from_the_working_directory(tmp_path: Path, entry: str) -> None:
    work, lib = tmp_path / "work", tmp_path / "lib"
    marker = tmp_path / "ran"
    for folder, name in ((work, "torchvision"), (work, "mymodels"), (lib, "mymodels")):
        folder.mkdir(exist_ok=True)  # planted in the working directory; the user's in lib/
        (folder / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({folder.name + '/' + name!r} + ' ')\n"
            "import torch\nNet = lambda: torch.nn.Linear(4, 4)\n")
    launcher = None
    if entry == "installed":  # what pip's console script does: sys.path[0] is its own folder
        launcher = tmp_path / "bin" / "archalign_script.py"
        launcher.parent.mkdir()
        launcher.write_text("import sys\nfrom archalign.cli import main\nsys.exit(main())\n")
    done = run_cli("--import-path", str(lib), "propose", "mymodels:Net",
                   "torchvision.ops:MLP(4, [4])", "--no-check", cwd=work, launcher=launcher)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "lib/mymodels "  # the module asked for; nothing planted ran


# --------------------------------------------------------------------------- round trips


def test_a_timm_destination_round_trips_through_timm(tmp_path: Path, plan_file: Path,
                                                      source_checkpoint, capsys) -> None:  # type: ignore[no-untyped-def]
    timm = pytest.importorskip("timm")
    src, checkpoint = source_checkpoint
    out = tmp_path / "resnet18.safetensors"
    assert main(["apply", str(checkpoint), str(plan_file), DST, "-o", str(out)]) == 0
    assert f"pretrained_cfg_overlay=dict(file='{out}', num_classes=10)" in capsys.readouterr().out
    loaded = timm.create_model("resnet18", pretrained=True, num_classes=10,
                               pretrained_cfg_overlay={"file": str(out), "num_classes": 10}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert float((loaded(x) - src(x)).abs().max()) <= 1e-5 * float(src(x).abs().max())


def test_a_hugging_face_destination_round_trips_through_from_pretrained(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from corpus import get_pair, run_model

    pair = get_pair("hf_gpt2->hf_gpt_bigcode")
    src, dst = trained_like(pair.make_src()), pair.make_dst()
    src.save_pretrained(tmp_path / "gpt2")  # a folder with weights: the trained model
    dst.config.architectures = [type(dst).__name__]
    dst.config.save_pretrained(tmp_path / "bigcode")  # the destination: its config only
    plan = tmp_path / "plan.json"
    assert main(["propose", str(tmp_path / "gpt2"), str(tmp_path / "bigcode" / "config.json"),
                 "-o", str(plan)]) == 0
    out = tmp_path / "out"
    done = run_cli("apply", str(tmp_path / "gpt2"), str(plan), str(tmp_path / "bigcode"),
                   "-o", str(out), "--strict")
    assert done.returncode == 0, done.stderr
    assert f"GPTBigCodeForCausalLM.from_pretrained('{out}')" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                      "model.safetensors"]
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))  # tied, as HF saves
    loaded = type(dst).from_pretrained(out).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    inputs = pair.make_inputs()
    assert float((run_model(loaded, inputs) - run_model(src, inputs)).abs().max()) <= 1e-5



def test_a_tampered_plan_is_an_input_error_whatever_the_parser_raises(tmp_path: Path,
                                                                      capsys) -> None:  # type: ignore[no-untyped-def]
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for path in (deep, tmp_path / "text.json"):
        if path.name == "text.json":
            path.write_text("not json")
        assert main(["show", str(path)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith((f"error: {path}", f"error: {str(path)!r}")) and len(line) < 400


def test_report_and_convert_check_their_output_first(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    page = tmp_path / "page.html"
    page.write_text("an earlier page")  # re-running report overwrites it
    assert main(["report", "torch.nn:Linear(2, 2)", "torch.nn:Linear(2, 2)", "-o", str(page),
                 "--no-check"]) == 0
    assert "archalign" in page.read_text()
    capsys.readouterr()
    assert main(["convert", "x.safetensors", "plan.json", "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "convert writes a folder" in one_error_line(capsys.readouterr().err)
