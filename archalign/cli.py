"""The ``archalign`` command line: propose, show, apply, convert, verify, export and report.

Exit codes: 0 done; 1 refused (``--strict`` and something would stay unloaded, or the outputs
differ under ``verify``); 2 usage or input error, said in one line on stderr, without a
traceback (a bad argument, a model that cannot be built or rejects ``--input``, a file that
cannot be read or written, a plan that does not fit the models, a source with nothing in common
with the destination, an ``apply`` that would load nothing: nothing is saved); 3 an internal
error (a bug: the traceback is printed); 130 interrupted.

Models come from factories (`archalign.factories`), which import from installed packages only:
``--import-path DIR`` lets them import from ``DIR`` too (``--import-path .`` for a module in the
current directory). Everything printed passes through `archalign.terminal`, which shows keys and
messages as they are (no markup, no escape sequence reaches the terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from . import __version__
from .checkpoint import PICKLE_SUFFIXES
from .confidence import DEFAULT_MIN_CONFIDENCE
from .convert import DEFAULT_SHARD_BYTES, DEFAULT_WRITERS
from .errors import ApplyError, ArchalignError, PlanError, RunError, SourceError, StrictError, UsageError
from .factories import build_model, import_paths, load_source, parse_input
from .plan import Plan, load_plan
from .source import TensorSource
from .terminal import PrintableFormatter, make_console, print_plan, printable, progress_bar, say

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_DONE, EXIT_REFUSED, EXIT_INPUT, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("archalign")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    out, err = make_console(), make_console(stderr=True)
    try:
        with import_paths(args.import_path or ()):
            return int(args.run(args, out))
    except StrictError as exc:
        _error(err, "refused", exc)
        return EXIT_REFUSED
    except (ArchalignError, OSError) as exc:
        _error(err, "error", exc)
        return EXIT_INPUT
    except KeyboardInterrupt:
        _error(err, "interrupted", "stopped by Ctrl-C")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: say so, with the traceback
        say(err, "".join(traceback.format_exception(exc)))
        _error(err, "internal error", f"{type(exc).__name__}: {exc} (this is a bug in archalign; "
                                      "please report it with the traceback above)")
        return EXIT_BUG
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _error(console: Console, label: str, exc: BaseException | str) -> None:
    """One line on stderr: ``label: message`` (an OSError names its file first)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    say(console, f"{label}: " + " ".join(printable(text).split()), "red")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="archalign",
        description="Move trained weights between PyTorch models whose names do not line up.",
        epilog="SRC is a checkpoint (.safetensors, .pt, .pth, .bin, .ckpt, a sharded index or its "
               "folder), a factory, or a Hugging Face model's folder or config.json; DST is a "
               "factory or a Hugging Face folder or config.json. A factory is 'module:callable' "
               "or 'module:callable(literal args)', e.g. \"torchvision.models:resnet18\" or "
               "\"timm:create_model('resnet18')\". Exit codes: 0 done, 1 refused, 2 usage or "
               "input error, 3 internal error.")
    parser.add_argument("--version", action="version", version=f"archalign {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    parser.add_argument("--import-path", action="append", metavar="DIR",
                        help="let factories import modules from DIR (e.g. '.'; repeatable); by "
                             "default they import installed packages only")
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
    _source(p)
    p.add_argument("plan", type=Path, help="plan JSON from 'propose'")
    p.add_argument("dst", help="destination factory, or Hugging Face folder or config.json")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="OUT.safetensors: one file of the destination's state_dict (timm loads "
                        "it with pretrained_cfg_overlay=dict(file=...)); any other path: a "
                        "folder (a Hugging Face destination's from_pretrained folder)")
    p.add_argument("--min-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE)
    p.add_argument("--strict", action="store_true", help="exit 1 unless every tensor loads")
    p.add_argument("--shape-policy", choices=["slice", "input_channels", "resample", "auto"],
                   help="load shape mismatches with this policy")
    _shards(p)
    p.set_defaults(run=_apply)

    p = sub.add_parser("convert", help="write SRC converted by a plan, without building DST")
    _source(p)
    p.add_argument("plan", type=Path, help="plan JSON from 'propose'")
    p.add_argument("-o", "--output", type=Path, required=True, help="the folder to write")
    p.add_argument("--config", type=Path, metavar="CONFIG",
                   help="a Hugging Face config.json (or its folder) to copy into the output, "
                        "so that from_pretrained loads it")
    p.add_argument("--min-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE)
    p.add_argument("--distributed", action="store_true",
                   help="spread the shards over the ranks torchrun starts (torchrun "
                        "--nproc-per-node N -m archalign convert ... --distributed; gloo on CPU)")
    p.add_argument("--writers", type=int, metavar="N",
                   help="shards written at once, one thread each (default: "
                        f"{DEFAULT_WRITERS}; 1 per rank with --distributed); each shard being "
                        "written is held in memory")
    _shards(p)
    p.set_defaults(run=_convert)

    p = sub.add_parser("verify", help="run both models on one input and compare the outputs")
    _models(p)
    p.add_argument("--plan", type=Path, help="load SRC into DST with this plan first")
    p.set_defaults(run=_verify)

    p = sub.add_parser("export", help="export a plan as a transformers key_mapping or conversion "
                                      "rules, or as a standalone Python converter")
    p.add_argument("plan", type=Path)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--key-mapping", type=Path, help="write a JSON key_mapping here")
    group.add_argument("--python", type=Path,
                       help="write a standalone converter here (python FILE IN OUT; it also "
                            "defines a timm-style checkpoint_filter_fn)")
    group.add_argument("--conversion-rules", type=Path,
                       help="write transformers v5 conversion rules (WeightRenaming, "
                            "WeightConverter) here, as a Python module")
    p.add_argument("--destination-class", default="DestinationModel",
                   help="the destination's transformers class, for --conversion-rules")
    p.add_argument("--min-confidence", type=float, default=0.0)
    p.set_defaults(run=_export)

    p = sub.add_parser("report", help="write a self-contained HTML review of the alignment")
    _models(p)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(run=_report)
    return parser


def _source(p: argparse.ArgumentParser) -> None:
    """SRC and the options that say how to read it."""
    p.add_argument("src", help="source checkpoint, factory, or Hugging Face folder or config.json")
    p.add_argument("--entry", metavar="KEY",
                   help="the entry of a training checkpoint that holds the weights (e.g. "
                        "'model' for {'model': ..., 'optimizer': ...})")
    p.add_argument("--source-structure", metavar="FACTORY",
                   help="when SRC is a checkpoint: a factory (or Hugging Face folder or "
                        "config.json) of the module it was saved from; built on the meta device, "
                        "the checkpoint's tensors are attached to it, and SRC is then that model "
                        "(traced, probed, run to check the plan)")


def _models(p: argparse.ArgumentParser) -> None:
    _source(p)
    p.add_argument("dst", help="destination factory, or Hugging Face folder or config.json")
    p.add_argument("--input", dest="example", metavar="SPEC",
                   help="an input both models accept: 'randn:1,3,224,224' (floats) or "
                        "'ids:2,16' (token ids); used to order untraceable models and to check "
                        "the plan by running both")
    p.add_argument("--no-check", action="store_true", help="do not run the models")


def _shards(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-shard-size", type=int, default=DEFAULT_SHARD_BYTES, metavar="BYTES",
                   help="a folder's checkpoint is split into shards of this size")


# ------------------------------------------------------------------------------- commands

def _aligned(args: argparse.Namespace, console: Console) -> Plan:
    """Build both sides and align them, showing the current stage on a terminal."""
    from .pipeline import align

    with console.status("building the models", spinner="dots") as status:
        src = _load_source(args)
        dst = build_model(args.dst)
        example = parse_input(args.example, dst)
        _say_what_input_does(args, src)
        try:
            return align(src, dst, example_inputs=example, check_outputs=not args.no_check,
                         progress=lambda stage: status.update(stage))
        except RunError as exc:
            hint = ("give an --input both models accept" if args.example is not None else
                    "give an --input both models accept, or --no-check not to run them")
            raise RunError(f"{exc}; {hint}") from exc


def _propose(args: argparse.Namespace, console: Console) -> int:
    plan = _aligned(args, console)
    print_plan(plan, console, limit=args.limit)
    if args.output:
        plan.save(args.output)
        say(console, f"saved {args.output}")
    return EXIT_DONE


def _show(args: argparse.Namespace, console: Console) -> int:
    print_plan(_read_plan(args.plan), console, limit=args.limit)
    return EXIT_DONE


def _apply(args: argparse.Namespace, console: Console) -> int:
    from .outputs import check_output, save_model

    check_output(args.output)
    plan = _read_plan(args.plan)
    with console.status("building the models", spinner="dots"):
        src, dst = _load_source(args), build_model(args.dst)
    _check_fit(plan, args.plan, src, dst)
    with progress_bar(console, "loading") as update:
        report = plan.apply(dst, src, min_confidence=args.min_confidence, strict=args.strict,
                            shape_policy=args.shape_policy, progress=update)
    say(console, str(report))
    if not report.loaded:  # a file of the destination's initial values is no port
        why = (f"its {len(plan.matches)} matches are all below --min-confidence "
               f"{args.min_confidence:.2f} or refused by shape" if plan.matches
               else "the plan has no match")
        raise ApplyError(f"nothing of {args.src} was loaded into {args.dst}: {why}; nothing was "
                         f"saved to {args.output} (see 'archalign show {args.plan}')")
    with progress_bar(console, "saving") as update:
        saved = save_model(dst, args.output, max_shard_bytes=args.max_shard_size,
                           progress=update)
    files = f"{len(saved.files)} file" + ("s" if len(saved.files) > 1 else "")
    say(console, f"saved {args.output} ({saved.kind.value}: {saved.tensors} tensors in {files}); "
                 f"load it with {saved.load_with}")
    return EXIT_DONE


def _convert(args: argparse.Namespace, console: Console) -> int:
    from .convert import convert_checkpoint
    from .outputs import check_output, copy_config

    if str(args.output).endswith(".safetensors"):
        raise UsageError(f"convert writes a folder (model.safetensors, or shards and an index); "
                         f"-o {args.output} names a file: give a folder")
    check_output(args.output, file=False)
    config = _config_file(args.config) if args.config is not None else None
    plan = _read_plan(args.plan)
    src = _load_source(args)
    if args.distributed:
        return _convert_distributed(args, console, plan, src, config)
    with progress_bar(console, "converting") as update:
        files = convert_checkpoint(plan, src, args.output, min_confidence=args.min_confidence,
                                   max_shard_bytes=args.max_shard_size, progress=update,
                                   writers=DEFAULT_WRITERS if args.writers is None else args.writers)
    if config is not None:
        files.insert(0, copy_config(config, args.output))
    say(console, f"saved {args.output} ({', '.join(f.name for f in files)})")
    return EXIT_DONE


def _convert_distributed(args: argparse.Namespace, console: Console, plan: Any, src: Any,
                         config: Path | None) -> int:
    """``convert --distributed``: one rank of the group torchrun started (its environment
    variables), gloo backend; rank 0 reports and copies the config."""
    import torch.distributed as dist

    from .convert_distributed import convert_distributed
    from .outputs import copy_config

    if "RANK" not in os.environ and not dist.is_initialized():
        raise UsageError("convert --distributed runs under torchrun (torchrun --nproc-per-node N "
                         "-m archalign convert ... --distributed): RANK and WORLD_SIZE are not set")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        bar = progress_bar(console, "converting") if rank == 0 else contextlib.nullcontext(None)
        with bar as update:
            files = convert_distributed(plan, src, args.output,
                                        min_confidence=args.min_confidence,
                                        max_shard_bytes=args.max_shard_size, progress=update,
                                        writers=1 if args.writers is None else args.writers)
        if rank == 0:
            if config is not None:
                files.insert(0, copy_config(config, args.output))
            say(console, f"saved {args.output} ({', '.join(f.name for f in files)}) from "
                         f"{dist.get_world_size()} ranks")
    finally:
        if started:
            dist.destroy_process_group()
    return EXIT_DONE


def _verify(args: argparse.Namespace, console: Console) -> int:
    from .verify import verify

    src, dst = _load_source(args), build_model(args.dst)
    model = src.module if isinstance(src, TensorSource) else src
    if not isinstance(model, nn.Module):
        raise SourceError("verify runs both models: SRC is a checkpoint, which cannot run; give "
                          "--source-structure FACTORY (the module it was saved from: its tensors "
                          "are attached to it), or a model as SRC (a factory or a Hugging Face "
                          "folder)")
    inputs = parse_input(args.example, dst)
    if inputs is None:
        raise UsageError("verify needs --input (e.g. --input randn:1,3,224,224)")
    plan = None
    if args.plan:
        plan = _read_plan(args.plan)
        _check_fit(plan, args.plan, src, dst)
        say(console, str(plan.apply(dst, src)))
    result = verify(model, dst, inputs, plan=plan)
    say(console, str(result))
    return EXIT_DONE if result.ok else EXIT_REFUSED


def _export(args: argparse.Namespace, console: Console) -> int:
    plan = _read_plan(args.plan)
    if args.key_mapping:
        mapping = plan.to_key_mapping(min_confidence=args.min_confidence)
        _write_text(args.key_mapping, json.dumps(mapping, indent=1) + "\n")
        say(console, f"saved {args.key_mapping} ({len(mapping)} patterns)")
    elif args.python:
        _write_text(args.python, plan.to_python(min_confidence=args.min_confidence))
        say(console, f"saved {args.python} (run it: python {args.python} IN OUT)")
    else:
        rules = plan.to_conversion_rules(min_confidence=args.min_confidence,
                                         destination=args.destination_class)
        _write_text(args.conversion_rules, rules)
        say(console, f"saved {args.conversion_rules} (import it and call register(), then "
                     f"{args.destination_class}.from_pretrained)")
    return EXIT_DONE


def _report(args: argparse.Namespace, console: Console) -> int:
    from .outputs import check_output

    check_output(args.output, file=True)
    plan = _aligned(args, console)
    plan.to_html(args.output, title=f"{Path(args.src).name} -> {args.dst}",
                 source=args.src, destination=args.dst)
    say(console, f"saved {args.output}")
    return EXIT_DONE


# ------------------------------------------------------------------------------- helpers

def _load_source(args: argparse.Namespace) -> Any:
    """SRC, read with ``--entry`` and attached to ``--source-structure`` when given."""
    return load_source(args.src, entry=args.entry, structure=args.source_structure)


def _say_what_input_does(args: argparse.Namespace, src: Any) -> None:
    """``--input`` is never ignored in silence: say what it is used for."""
    if args.example is None:
        return
    runs = isinstance(src, nn.Module) or (isinstance(src, TensorSource) and src.module is not None)
    if runs:
        logger.info("--input %s: given to both models, to order the layers of a model fx cannot "
                    "trace and to check the plan by running both", args.example)
    else:
        logger.warning("--input %s is used for the destination only (its execution order); SRC "
                       "is a checkpoint, which cannot run, so the plan is not checked by running "
                       "both models: give --source-structure FACTORY (the module the checkpoint "
                       "was saved from) to have it checked", args.example)


def _read_plan(path: Path) -> Plan:
    """The plan saved at ``path``; a checkpoint given by mistake is named as one."""
    if path.is_dir() or path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        raise PlanError(f"{path} is a checkpoint, not a plan: give the plan JSON that "
                        "'archalign propose -o plan.json' saves")
    try:
        return load_plan(path)
    except (OSError, ArchalignError):
        raise  # both name the file already
    except Exception as exc:  # whatever else a tampered file makes the parser raise: an input
        raise PlanError(f"{path} is not a valid plan: {type(exc).__name__}: {exc}") from exc


def _check_fit(plan: Plan, path: Path, src: Any, dst: Any) -> None:
    """Refuse a plan made for another destination: tensors it holds that the plan never
    mentions would stay untouched without the plan having said so. (Source tensors the plan
    does not know are only unused: the report lists them.)"""
    from .checks import unplanned_keys
    from .source import read_destination, read_source

    _, keys = unplanned_keys(plan, read_source(src), read_destination(dst))
    if keys:
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        raise PlanError(f"{path} was made for another destination: {len(keys)} of the "
                        f"destination's tensors are not in it ({shown}); make a plan for these "
                        "models with 'archalign propose SRC DST -o plan.json'")


def _config_file(path: Path) -> Path:
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise SourceError(f"--config {str(path)!r}: no config.json there")
    return config


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
