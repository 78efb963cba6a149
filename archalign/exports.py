"""Exports a user can ship without archalign, each generated from a plan alone (pure: no model,
no tensor):

- `to_key_mapping`: a transformers ``key_mapping`` (``from_pretrained(..., key_mapping=...)``),
  renames only;
- `to_python`: a standalone converter module (torch only): ``convert_state_dict(state_dict)``,
  a timm-style ``checkpoint_filter_fn(state_dict, model)``, and a command line
  (``python convert.py IN OUT``);
- `to_conversion_rules`: transformers v5 conversion rules (``WeightRenaming`` and
  ``WeightConverter`` with its ``Transpose``, ``Concatenate``, ``Chunk`` and ``Split`` ops, as in
  ``transformers/conversion_mapping.py``), to register before ``from_pretrained`` or to
  contribute a port upstream.
"""

from __future__ import annotations

import pprint
import re
from collections import defaultdict
from collections.abc import Sequence

from .errors import PlanError
from .ops import Op, OpKind
from .plan import Match, Plan

__all__ = ["to_conversion_rules", "to_key_mapping", "to_python"]

_DIGITS = re.compile(r"\d+")


def to_key_mapping(plan: Plan, *, min_confidence: float = 0.0) -> dict[str, str]:
    """A ``{regex: replacement}`` for ``from_pretrained(..., key_mapping=...)`` (transformers v5).

    Layer indices are folded into one pattern where a single index varies (``layers\\.(\\d+)\\.wq``
    -> ``model.layers.\\1.q_proj``; transformers substitutes only ``\\1``). The mapping is checked
    by replaying transformers' renaming (every matching pattern fires, in order) over all the
    plan's source keys: each matched key must land on its destination, and no other key on a
    destination key.

    Raises
    ------
    PlanError
        If a match needs an adaptation (a transpose, a split...: key_mapping only renames; export
        with `to_python` instead), or if the renames cannot be expressed without chaining.
    """
    matches = [m for m in plan.matches if m.confidence >= min_confidence]
    adapted = [m for m in matches if not _is_rename(m)]
    if adapted:
        shown = ", ".join(f"{m.dst[0]} ({' '.join(map(str, m.ops)) or 'fused'})"
                          for m in adapted[:4])
        raise PlanError(f"{len(adapted)} matches need adaptations a key_mapping cannot express: "
                        f"{shown}; use to_python() for a converter that applies them")
    renames = {m.src[0]: m.dst[0] for m in matches if m.src[0] != m.dst[0]}
    all_src = sorted({*(m.src[0] for m in matches), *plan.unmatched_src})
    all_dst = {*(m.dst[0] for m in matches), *plan.unmatched_dst}
    expected = {m.src[0]: m.dst[0] for m in matches}

    folded = _fold(renames)
    for mapping in (folded, {f"^{re.escape(s)}$": d for s, d in renames.items()}):
        if _consistent(mapping, all_src, all_dst, expected):
            return mapping
    raise PlanError("these renames chain into each other (a key renamed into another source "
                    "key's name), which a transformers key_mapping applies in turn; use "
                    "to_python() instead")


def _fold(renames: dict[str, str]) -> dict[str, str]:
    """Group renames that differ in one index into one pattern with one capture group."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    literal: dict[str, str] = {}
    for src, dst in renames.items():
        template = _one_index_template(src, dst)
        if template is None:
            literal[f"^{re.escape(src)}$"] = dst
        else:
            groups[template].append((src, dst))
    out: dict[str, str] = {}
    for (pattern, replacement), members in sorted(groups.items()):
        if len(members) > 1:
            out[pattern] = replacement
        else:
            src, dst = members[0]
            literal[f"^{re.escape(src)}$"] = dst
    out.update(sorted(literal.items()))
    return out


def _one_index_template(src: str, dst: str) -> tuple[str, str] | None:
    """``(pattern, replacement)`` folding the one index that both keys carry in the same place
    among their indices (all other indices literal), or None."""
    src_nums, dst_nums = _DIGITS.findall(src), _DIGITS.findall(dst)
    candidates = [(i, j) for i, a in enumerate(src_nums) for j, b in enumerate(dst_nums) if a == b]
    if not candidates:
        return None
    i, j = candidates[-1]  # the innermost shared index: usually the block number
    src_parts = _DIGITS.split(src)
    dst_parts = _DIGITS.split(dst)
    pattern = "".join(
        re.escape(part) + ("" if k >= len(src_nums) else
                           r"(\d+)" if k == i else re.escape(src_nums[k]))
        for k, part in enumerate(src_parts))
    replacement = "".join(
        part.replace("\\", "\\\\") + ("" if k >= len(dst_nums) else
                                      r"\1" if k == j else dst_nums[k])
        for k, part in enumerate(dst_parts))
    return f"^{pattern}$", replacement


def _replay(key: str, mapping: dict[str, str]) -> str:
    """What transformers v5 does with one checkpoint key: every matching renaming fires in turn."""
    for pattern, replacement in mapping.items():
        found = re.search(pattern, key)
        if found is None:
            continue
        if r"\1" in replacement:
            replacement = replacement.replace(r"\1", found.group(1))
        key = key.replace(found.group(0), replacement, 1)
    return key


def _consistent(mapping: dict[str, str], all_src: list[str], all_dst: set[str],
                expected: dict[str, str]) -> bool:
    for key in all_src:
        renamed = _replay(key, mapping)
        if key in expected:
            if renamed != expected[key]:
                return False
        elif renamed != key and renamed in all_dst:
            return False
    return True


_TEMPLATE = '''\"\"\"Convert a state_dict for loading into {dst_description}.

Generated by archalign from a reviewed plan ({n} tensors: {n_plain} renamed or copied,
{n_adapted} adapted). Needs only torch (and safetensors for .safetensors files). Keys not listed
are dropped; every destination key the plan does not load keeps its own initialisation.

As a module: ``convert_state_dict(state_dict)``, or ``checkpoint_filter_fn(state_dict, model)``
for timm (``timm.models.load_checkpoint(model, path, filter_fn=checkpoint_filter_fn)``).
As a command: ``python {{this file}} IN OUT [--entry KEY]`` (``.safetensors``, or a torch pickle
read with ``weights_only=True``).
\"\"\"

import argparse
import logging
import sys

import torch

logger = logging.getLogger(__name__)

# destination key -> source key (plain copies)
RENAMES = {renames}

# (destination keys, source keys, operations) for tensors that need an adaptation
ADAPTED = {adapted}


def _run(tensors, ops):
    for op in ops:
        kind = op["op"]
        if kind == "transpose":
            tensors = [t.transpose(*op.get("axes", (0, 1))) for t in tensors]
        elif kind == "reshape":
            tensors = [t.reshape(op["shape"]) for t in tensors]
        elif kind == "concat":
            tensors = [torch.cat(tensors, dim=op.get("axis", 0))]
        elif kind == "split":
            tensors = list(torch.split(tensors[0], op["sizes"], dim=op.get("axis", 0)))
        elif kind == "stack":  # runs of n tensors stacked along a new axis 0 (experts)
            n = op["sizes"][0]
            tensors = [torch.stack(tensors[i:i + n]) for i in range(0, len(tensors), n)]
        elif kind == "unstack":
            tensors = [piece for t in tensors for piece in t.unbind(0)]
        elif kind == "regroup":
            a, b = op["groups"]
            t = tensors[0]
            rows = t.shape[0] // (a * b)
            tensors = [t.reshape(a, b, rows, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]
        elif kind in ("rope", "unrope"):  # rotary rows: interleaved pairs <-> halves, per head
            heads = op["groups"][0]
            t = tensors[0]
            half = t.shape[0] // heads // 2
            inner = (half, 2) if kind == "rope" else (2, half)
            tensors = [t.reshape(heads, *inner, *t.shape[1:]).transpose(1, 2).reshape(t.shape)]
        elif kind == "pad":  # zero rows before and after, on axis 0
            before, after = op["sizes"]
            t = tensors[0]
            tensors = [torch.cat([t.new_zeros((before, *t.shape[1:])), t,
                                  t.new_zeros((after, *t.shape[1:]))])]
        elif kind == "crop":
            before, after = op["sizes"]
            tensors = [tensors[0][before:tensors[0].shape[0] - after]]
        else:
            raise ValueError("unknown operation " + repr(kind))
    return tensors


def convert_state_dict(state_dict):
    \"\"\"Return a new state_dict with the destination's keys (tensors are not copied unless adapted).\"\"\"
    out = {{}}
    for dst, src in RENAMES.items():
        out[dst] = state_dict[src]
    for dsts, srcs, ops in ADAPTED:
        for dst, tensor in zip(dsts, _run([state_dict[s] for s in srcs], ops)):
            out[dst] = tensor.contiguous()
    return out


def checkpoint_filter_fn(state_dict, model=None):
    \"\"\"timm's filter signature: the converted state_dict; with ``model``, its own tensors fill
    the keys the plan does not load (so that a strict load keeps their initialisation).\"\"\"
    for entry in ("state_dict", "model"):
        if isinstance(state_dict.get(entry), dict):
            state_dict = state_dict[entry]
    out = convert_state_dict(state_dict)
    if model is not None:
        out = {{**{{k: v for k, v in model.state_dict().items() if k not in out}}, **out}}
    return out


def _read(path, entry):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state[entry] if entry else state


def _write(state, path):
    state = {{k: v.contiguous() for k, v in state.items()}}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path, metadata={{"format": "pt"}})
    else:
        torch.save(state, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="the source checkpoint (.safetensors or a torch pickle)")
    parser.add_argument("output", help="where to write the converted one (.safetensors or pickle)")
    parser.add_argument("--entry", help="the entry of a training checkpoint holding the weights")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stdout)
    try:
        converted = convert_state_dict(_read(args.input, args.entry))
        _write(converted, args.output)
    except KeyError as exc:  # parser.exit: the message on stderr, exit status 2
        parser.exit(2, f"error: {{args.input}} holds no tensor {{exc}} (is it the checkpoint the "
                       "plan was made for? a training checkpoint needs --entry)\\n")
    except (OSError, RuntimeError, ValueError) as exc:
        parser.exit(2, f"error: {{exc}}\\n")
    logger.info("wrote %s (%d tensors)", args.output, len(converted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def to_python(plan: Plan, *, min_confidence: float = 0.0,
              description: str = "the destination model") -> str:
    """Source code of a standalone ``convert_state_dict(state_dict) -> state_dict`` (torch only).

    Matches below ``min_confidence`` are left out, as `Plan.apply` would skip them.
    """
    matches = [m for m in plan.matches if m.confidence >= min_confidence]
    plain = {m.dst[0]: m.src[0] for m in matches if _is_rename(m)}
    adapted = [(m.dst, m.src, [op.to_dict() for op in m.ops])
               for m in matches if not _is_rename(m)]
    return _TEMPLATE.format(
        dst_description=description, n=len(matches), n_plain=len(plain), n_adapted=len(adapted),
        renames=pprint.pformat(plain, width=100, sort_dicts=False),
        adapted=pprint.pformat(adapted, width=100, sort_dicts=False))


_RULES_TEMPLATE = '''"""Conversion rules to load {src_description} checkpoints into {dst_description}
(transformers v5 `WeightRenaming` / `WeightConverter`, as in transformers/conversion_mapping.py).

Generated by archalign from a reviewed plan ({n} tensors; {n_renames} renaming and {n_converted}
converting rules). Register them before loading: ``register("{dst_name}")``, then
``{dst_name}.from_pretrained(folder)`` on a folder that holds the source checkpoint and the
destination's config.json; or contribute ``RULES`` upstream under the model type.
"""

from transformers.core_model_loading import {imports}

RULES = [
{rules}]


def register(model_type_or_class_name="{dst_name}", overwrite=True):
    """Make ``from_pretrained`` of that class (or model type) apply `RULES`."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping

    register_checkpoint_conversion_mapping(model_type_or_class_name, RULES, overwrite=overwrite)
'''


def to_conversion_rules(plan: Plan, *, min_confidence: float = 0.0,
                        destination: str = "DestinationModel",
                        source: str = "the source's") -> str:
    """Source code of transformers v5 conversion rules that load the plan's source checkpoint
    into its destination: ``RULES`` (a list of ``WeightRenaming`` and ``WeightConverter``) and
    ``register(name)``, which makes ``from_pretrained`` apply them.

    Plain renames become ``WeightRenaming`` rules, layer indices folded as in `to_key_mapping`
    (transformers fires every matching renaming in turn: the rules are checked by replaying
    that over all the plan's source keys). Each adapted match becomes one ``WeightConverter``
    on its full keys: ``transpose`` is ``Transpose(0, 1)``, ``concat`` is ``Concatenate(dim=0)``,
    ``split`` is ``Chunk(dim=0)`` (equal sizes) or ``Split(dim=0)``.

    Parameters
    ----------
    plan : Plan
        The reviewed plan.
    min_confidence : float
        Matches below it are left out, as `Plan.apply` would skip them.
    destination : str
        The destination's transformers class name (the default name ``register`` uses).
    source : str
        How the docstring names the source checkpoints.

    Raises
    ------
    PlanError
        If a match needs an operation transformers has no op for (``reshape``, ``regroup``, a
        transpose of several tensors before they are concatenated): the error names them; export
        with `to_python` instead. Or if the renames chain into each other.
    """
    matches = [m for m in plan.matches if m.confidence >= min_confidence]
    converted = [m for m in matches if not _is_rename(m)]
    missing = [(m, why) for m in converted if (why := _unsupported(m.ops, len(m.src)))]
    if missing:
        shown = "; ".join(f"{', '.join(m.dst)} ({why})" for m, why in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise PlanError(f"{len(missing)} matches need operations transformers' conversion ops "
                        f"cannot express: {shown}{more}; use to_python() for a converter that "
                        "applies them")
    renames = {m.src[0]: m.dst[0] for m in matches if _is_rename(m) and m.src[0] != m.dst[0]}
    all_src = sorted({*(k for m in matches for k in m.src), *plan.unmatched_src})
    all_dst = {*(k for m in matches for k in m.dst), *plan.unmatched_dst}
    expected = {**{m.src[0]: m.dst[0] for m in matches if _is_rename(m)},
                **{k: k for m in converted for k in m.src}}  # a converter sees its own keys
    for mapping in (_fold(renames), {f"^{re.escape(a)}$": b for a, b in renames.items()}):
        if _consistent(mapping, all_src, all_dst, expected):
            break
    else:
        raise PlanError("these renames chain into each other (a key renamed into another source "
                        "key's name), which transformers applies in turn; use to_python() instead")
    clash = sorted(set(renames.values()) & {k for m in converted for k in m.src})
    if clash:  # transformers would run the converter of that key on the renamed tensor too
        raise PlanError(f"renamed keys {', '.join(clash[:4])} are also source keys of adapted "
                        "matches, which transformers would convert again; use to_python() instead")
    rules = [f"    WeightRenaming({pattern!r}, {target!r}),\n" for pattern, target in mapping.items()]
    names = {"WeightRenaming"} if mapping else set()
    converters = _converter_rules(converted, [_replay(k, mapping) for k in all_src])
    for sources, targets, op_list in converters:
        ops = [_hf_op(op) for op in op_list]
        names.update(["WeightConverter", *(op.split("(")[0] for op in ops)])
        rules.append(
            "    WeightConverter(\n"
            f"        source_patterns={sources[0] if len(sources) == 1 else sources!r},\n"
            f"        target_patterns={targets[0] if len(targets) == 1 else targets!r},\n"
            f"        operations=[{', '.join(ops)}],\n"
            "    ),\n")
    return _RULES_TEMPLATE.format(
        src_description=source, dst_description=destination, dst_name=destination,
        n=len(matches), n_renames=len(mapping), n_converted=len(converters),
        imports=", ".join(sorted(names)) or "WeightRenaming", rules="".join(rules))


def _converter_rules(converted: Sequence[Match], keys: Sequence[str]
                     ) -> list[tuple[list[str], list[str], tuple[Op, ...]]]:
    """``(source patterns, target patterns, ops)`` of one ``WeightConverter`` per kind of adapted
    match: matches that differ only in the block index before their keys' common part
    (``model.layers.<i>.`` + ``self_attn.q_proj.weight``, ...) share a rule on that part, as the
    rules in transformers' conversion_mapping.py are written. A shared rule is kept only if,
    replayed as transformers matches it over ``keys`` (every checkpoint key after renaming), it
    takes exactly its matches' keys and names their destinations; otherwise each match gets a
    rule on its full keys."""
    groups: dict[tuple[tuple[str, ...], tuple[str, ...], tuple[Op, ...]],
                 list[tuple[Match, str]]] = defaultdict(list)
    for m in converted:
        prefix = _block_prefix([*m.src, *m.dst])
        groups[(tuple(k[len(prefix):] for k in m.src), tuple(k[len(prefix):] for k in m.dst),
                m.ops)].append((m, prefix))
    rules: list[tuple[list[str], list[str], tuple[Op, ...]]] = []
    for (rel_src, rel_dst, ops), members in groups.items():
        patterns = [re.escape(k) for k in rel_src]
        if all(prefix for _, prefix in members) and _takes_exactly(patterns, rel_dst[0], members,
                                                                   keys):
            rules.append((patterns, list(rel_dst), ops))
        else:
            rules.extend(([f"^{re.escape(k)}$" for k in m.src], list(m.dst), m.ops)
                         for m, _ in members)
    return rules


def _block_prefix(keys: Sequence[str]) -> str:
    """The keys' common dotted prefix, cut after its last part that holds a digit (the block
    index): ``model.layers.0.`` for ``model.layers.0.self_attn.{q,k,v}_proj.weight``; "" when
    it holds none."""
    parts = [k.split(".") for k in keys]
    common = 0
    for column in zip(*(p[:-1] for p in parts)):
        if len(set(column)) > 1:
            break
        common += 1
    indexed = [i for i, part in enumerate(parts[0][:common]) if any(c.isdigit() for c in part)]
    return ".".join(parts[0][:indexed[-1] + 1]) + "." if indexed else ""


def _takes_exactly(patterns: list[str], target: str, members: list[tuple[Match, str]],
                   keys: Sequence[str]) -> bool:
    """Whether a converter on ``patterns`` matches exactly the members' source keys among
    ``keys`` and renames each onto its member's first destination key (transformers searches
    each pattern in the key, ends it at a name boundary, replaces the match by ``target``)."""
    compiled = [re.compile(p + (r"(?!\w)" if re.search(r"[a-zA-Z0-9]$", p) else ""))
                for p in patterns]
    wanted = {k: m.dst[0] for m, _ in members for k in m.src}
    if any(not dst.endswith(target) or dst.index(target) != len(dst) - len(target)
           for dst in wanted.values()):
        return False  # transformers finds the prefix before the target's first occurrence
    for key in keys:
        found = [hit for c in compiled if (hit := c.search(key))]
        if not found:
            if key in wanted:
                return False
            continue
        if (key not in wanted or len(found) > 1
                or key.replace(found[0].group(0), target, 1) != wanted[key]):
            return False
    return True


def _unsupported(ops: Sequence[Op], inputs: int) -> str:
    """Why transformers' ops cannot run ``ops`` on ``inputs`` tensors ("" when they can)."""
    count = inputs
    for op in ops:
        if op.kind not in (OpKind.TRANSPOSE, OpKind.CONCAT, OpKind.SPLIT):
            return f"{op}: no transformers op archalign can prove equal"
        if op.kind is OpKind.TRANSPOSE and count != 1:
            return f"a transpose of {count} tensors at once"
        if op.kind is OpKind.CONCAT:
            count = 1
        elif op.kind is OpKind.SPLIT:
            count = len(op.sizes)
    return ""


def _hf_op(op: Op) -> str:
    """The transformers conversion op that does what ``op`` does, as source code."""
    if op.kind is OpKind.TRANSPOSE:
        a, b = op.axes or (0, 1)
        return f"Transpose(dim0={a}, dim1={b})"
    if op.kind is OpKind.CONCAT:
        return f"Concatenate(dim={op.axis})"
    if len(set(op.sizes)) == 1:
        return f"Chunk(dim={op.axis})"
    return f"Split(dim={op.axis})"  # the sizes are read from the destination's parameters


def _is_rename(match: Match) -> bool:
    """One source tensor copied as it is into one destination tensor: a plain rename."""
    return not match.ops and len(match.src) == 1 and len(match.dst) == 1
