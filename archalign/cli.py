"""The ``archalign`` command line: propose, show, apply, verify, export (and report).

Exit codes: 0 done; 1 refused (``--strict`` and something would stay unloaded, or outputs differ
under ``verify``); 2 usage or input error.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from .confidence import DEFAULT_MIN_CONFIDENCE
from .errors import ApplyError, ArchalignError, SourceError
from .plan import Plan, load_plan
from .review import COLUMNS, Band, ReviewRow, build_review

__all__ = ["main"]

_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if "" not in sys.path:  # factories from local modules, as with `python -m archalign`
        sys.path.insert(0, "")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    try:
        return int(args.run(args, console))
    except ApplyError as exc:
        console.print(f"[red]refused:[/red] {exc}")
        return 1
    except (ArchalignError, ImportError, AttributeError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="archalign",
        description="Move trained weights between PyTorch models whose names do not line up.",
        epilog="SRC is a checkpoint file (.safetensors, .pt, .pth, .bin) or a factory; DST is a "
               "factory: 'module:callable' or 'module:callable(literal args)', e.g. "
               "\"torchvision.models:resnet18\" or \"timm:create_model('resnet18')\".")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("propose", help="align SRC to DST and print the plan for review")
    _models(p)
    p.add_argument("-o", "--output", type=Path, help="save the plan as JSON")
    p.add_argument("--limit", type=int, default=60, help="rows to print (0: all)")
    p.set_defaults(run=_propose)

    p = sub.add_parser("show", help="print a saved plan")
    p.add_argument("plan", type=Path)
    p.add_argument("--limit", type=int, default=0, help="rows to print (0: all)")
    p.set_defaults(run=_show)

    p = sub.add_parser("apply", help="load SRC into DST as a plan says and save the weights")
    p.add_argument("src", help="source checkpoint or factory")
    p.add_argument("plan", type=Path, help="plan JSON from 'propose'")
    p.add_argument("dst", help="destination factory")
    p.add_argument("-o", "--output", type=Path, required=True, help="write .safetensors here")
    p.add_argument("--min-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE)
    p.add_argument("--strict", action="store_true", help="exit 1 unless every tensor loads")
    p.add_argument("--shape-policy", choices=["slice", "input_channels", "resample", "auto"],
                   help="load shape mismatches with this policy")
    p.set_defaults(run=_apply)

    p = sub.add_parser("verify", help="run both models on one input and compare the outputs")
    _models(p)
    p.add_argument("--plan", type=Path, help="load SRC into DST with this plan first")
    p.set_defaults(run=_verify)

    p = sub.add_parser("export", help="export a plan as a transformers key_mapping or Python")
    p.add_argument("plan", type=Path)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--key-mapping", type=Path, help="write a JSON key_mapping here")
    group.add_argument("--python", type=Path, help="write a standalone converter here")
    p.add_argument("--min-confidence", type=float, default=0.0)
    p.set_defaults(run=_export)

    p = sub.add_parser("report", help="write a self-contained HTML review of the alignment")
    _models(p)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(run=_report)
    return parser


def _models(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source checkpoint or factory")
    p.add_argument("dst", help="destination factory")
    p.add_argument("--input", dest="example", metavar="SPEC",
                   help="an input both models accept: 'randn:1,3,224,224' (floats) or "
                        "'ids:2,16' (token ids); used to order untraceable models and to check "
                        "the plan by running both")
    p.add_argument("--no-check", action="store_true", help="do not run the models")


# ------------------------------------------------------------------------------- commands

def _aligned(args: argparse.Namespace, console: Console) -> tuple[Any, nn.Module, Plan]:
    """Build both sides and align them, showing the current stage on a terminal."""
    from .pipeline import align

    with console.status("building the models", spinner="dots") as status:
        src, dst = load_source(args.src), build_model(args.dst)
        plan = align(src, dst, example_inputs=parse_input(args.example, dst),
                     check_outputs=not args.no_check,
                     progress=lambda stage: status.update(stage))
    return src, dst, plan


def _propose(args: argparse.Namespace, console: Console) -> int:
    _, _, plan = _aligned(args, console)
    print_plan(plan, console, limit=args.limit)
    if args.output:
        plan.save(args.output)
        console.print(f"saved {args.output}")
    return 0


def _show(args: argparse.Namespace, console: Console) -> int:
    print_plan(load_plan(args.plan), console, limit=args.limit)
    return 0


def _apply(args: argparse.Namespace, console: Console) -> int:
    from safetensors.torch import save_file

    plan = load_plan(args.plan)
    src, dst = load_source(args.src), build_model(args.dst)
    with Progress(TextColumn("loading"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("loading", total=None)
        report = plan.apply(dst, src, min_confidence=args.min_confidence, strict=args.strict,
                            shape_policy=args.shape_policy,
                            progress=lambda done, total: bar.update(task, completed=done,
                                                                    total=total))
    console.print(str(report), markup=False)
    aliases = dict(report.tied)
    state = {k: v.detach().contiguous() for k, v in dst.state_dict().items() if k not in aliases}
    metadata = {"format": "pt", "archalign_tied": json.dumps(aliases)}
    save_file(state, str(args.output), metadata=metadata)
    console.print(f"saved {args.output} ({len(state)} tensors)")
    return 0


def _verify(args: argparse.Namespace, console: Console) -> int:
    from .verify import verify

    src, dst = load_source(args.src), build_model(args.dst)
    if not isinstance(src, nn.Module):
        raise SourceError("verify runs both models: SRC must be a factory, not a checkpoint")
    inputs = parse_input(args.example, dst)
    if inputs is None:
        raise SourceError("verify needs --input (e.g. --input randn:1,3,224,224)")
    plan = None
    if args.plan:
        plan = load_plan(args.plan)
        console.print(str(plan.apply(dst, src)), markup=False)
    result = verify(src, dst, inputs, plan=plan)
    console.print(str(result), markup=False)
    return 0 if result.ok else 1


def _export(args: argparse.Namespace, console: Console) -> int:
    plan = load_plan(args.plan)
    if args.key_mapping:
        mapping = plan.to_key_mapping(min_confidence=args.min_confidence)
        args.key_mapping.write_text(json.dumps(mapping, indent=1) + "\n", encoding="utf-8")
        console.print(f"saved {args.key_mapping} ({len(mapping)} patterns)")
    else:
        args.python.write_text(plan.to_python(min_confidence=args.min_confidence),
                               encoding="utf-8")
        console.print(f"saved {args.python}")
    return 0


def _report(args: argparse.Namespace, console: Console) -> int:
    _, _, plan = _aligned(args, console)
    plan.to_html(args.output)
    console.print(f"saved {args.output}")
    return 0


# ------------------------------------------------------------------------------- helpers

def print_plan(plan: Plan, console: Console, *, limit: int = 0) -> None:
    """The review table (`archalign.review.build_review`), at most ``limit`` rows (0: all): each
    row in its band's colour, bold when it stands out; then what is not loaded, and a summary."""
    review = build_review(plan)
    for line in review.header:
        console.print(line, markup=False)
    table = Table()
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in review.rows[:limit or None]:
        table.add_row(*row.cells, style=_row_style(row))
    console.print(table)
    if limit and len(review.rows) > limit:
        console.print(f"... {len(review.rows) - limit} more rows (--limit 0 shows all)")
    for line in review.not_loaded:
        console.print(line, style="red", markup=False)
    for line in review.unmatched:
        console.print(line, markup=False)
    below = sum(row.below_default for row in review.rows)
    adapted = sum(row.adapted for row in review.rows)
    console.print(f"[bold]{len(review.rows) - below} to load ({adapted} adapted), "
                  f"{below} below confidence {DEFAULT_MIN_CONFIDENCE}, "
                  f"{len(plan.unmatched_dst)} destination tensors left untouched[/bold]")


_BAND_STYLES = {Band.LOW: "red", Band.MID: "yellow", Band.HIGH: ""}  # rich styles of the bands


def _row_style(row: ReviewRow) -> str:
    """A review row's rich style: its band's colour, bold when it stands out."""
    return " ".join(s for s in (_BAND_STYLES[row.band], "bold" if row.stands_out else "") if s)


def load_source(spec: str) -> Any:
    """A checkpoint path (by suffix) or a model built from a factory spec."""
    if Path(spec).suffix in _FILE_SUFFIXES or Path(spec).exists():
        return spec
    return build_model(spec)


def build_model(spec: str) -> nn.Module:
    """Build a model from ``module:callable`` or ``module:callable(literal, key=literal)``.

    Raises
    ------
    SourceError
        If the spec is malformed, its arguments are not Python literals, or it builds no module.
    """
    module_name, sep, call = spec.partition(":")
    if not sep or not module_name or not call:
        raise SourceError(f"model spec {spec!r} is not 'module:callable' or a checkpoint file")
    name, args, kwargs = call, [], {}
    if "(" in call:
        try:
            tree = ast.parse(call, mode="eval").body
            if not isinstance(tree, ast.Call):
                raise ValueError("not a call")
            name = ast.unparse(tree.func)
            args = [ast.literal_eval(a) for a in tree.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords if k.arg}
        except (SyntaxError, ValueError) as exc:
            raise SourceError(f"model spec {spec!r}: arguments must be Python literals "
                              f"({exc})") from exc
    target: Any = importlib.import_module(module_name)
    for part in name.split("."):
        target = getattr(target, part)
    model = target(*args, **kwargs)
    if not isinstance(model, nn.Module):
        raise SourceError(f"{spec!r} built a {type(model).__name__}, not an nn.Module")
    return model.eval()


def parse_input(spec: str | None, model: nn.Module) -> Any:
    """``randn:1,3,224,224`` -> a float tensor; ``ids:2,16`` -> token ids below the vocab size."""
    if spec is None:
        return None
    kind, _, dims = spec.partition(":")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d)
    except ValueError as exc:
        raise SourceError(f"--input {spec!r}: the shape must be integers, e.g. randn:1,3,224,224"
                          ) from exc
    generator = torch.Generator().manual_seed(0)
    if kind == "randn":
        return torch.randn(shape, generator=generator)
    if kind == "ids":
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 100
        return {"input_ids": torch.randint(0, int(vocab), shape, generator=generator)}
    raise SourceError(f"--input {spec!r}: use 'randn:SHAPE' or 'ids:SHAPE'")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
