"""The command line: every command end to end, and its exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from archalign.cli import build_model, main, parse_input
from archalign.errors import SourceError

SRC = "torchvision.models:resnet18(num_classes=10)"
DST = "timm:create_model('resnet18', num_classes=10)"


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "plan.json"
    torch.manual_seed(0)
    assert main(["propose", SRC, DST, "-o", str(path), "--no-check"]) == 0
    return path


def test_propose_prints_the_table_and_saves_the_plan(plan_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(plan_file.read_text())
    assert data["archalign_plan"] == 1 and len(data["matches"]) == 122
    assert main(["show", str(plan_file), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "122 matches" in out and "122 to load" in out and "119 more rows" in out


def test_apply_writes_a_checkpoint_that_loads(plan_file: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_model(SRC)
    checkpoint = tmp_path / "src.safetensors"
    save_file(src.state_dict(), str(checkpoint))
    out = tmp_path / "dst.safetensors"
    assert main(["apply", str(checkpoint), str(plan_file), DST, "-o", str(out), "--strict"]) == 0
    dst = build_model(DST)
    dst.load_state_dict(load_file(str(out)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_strict_refusal_exits_1(plan_file: Path, tmp_path: Path) -> None:
    src = build_model(SRC)
    state = dict(src.state_dict())
    checkpoint = tmp_path / "src.pt"
    torch.save(state, checkpoint)
    out = tmp_path / "dst.safetensors"
    code = main(["apply", str(checkpoint), str(plan_file), DST, "-o", str(out), "--strict",
                 "--min-confidence", "1.0"])
    assert code == 1 and not out.exists()


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


@pytest.mark.parametrize("argv", [
    ["propose", "no_such_module:f", DST],
    ["propose", SRC, "torch:tensor(1)"],
    ["propose", SRC, "torch.nn:Linear(in_features=x)"],
    ["show", "/nonexistent/plan.json"],
    ["verify", SRC, DST],
])
def test_input_errors_exit_2(argv: list[str]) -> None:
    assert main(argv) == 2


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["propose"])
    assert exc.value.code == 2


def test_python_dash_m_and_help() -> None:
    done = subprocess.run([sys.executable, "-m", "archalign", "apply", "--help"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "--shape-policy" in done.stdout


def test_parse_input() -> None:
    assert parse_input("randn:2,3", torch.nn.Linear(3, 3)).shape == (2, 3)
    ids = parse_input("ids:2,5", torch.nn.Linear(3, 3))
    assert ids["input_ids"].shape == (2, 5) and int(ids["input_ids"].max()) < 100
    with pytest.raises(SourceError):
        parse_input("zeros:2", torch.nn.Linear(3, 3))


def test_report_writes_a_self_contained_page(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["report", SRC, DST, "-o", str(out), "--no-check"]) == 0
    page = out.read_text()
    assert "layer4.1.conv2" in page and "https://" not in page
