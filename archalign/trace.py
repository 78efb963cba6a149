"""Trace a model into a `UnitGraph`: torch.fx first, forward hooks next, registration order last.

``torch.fx`` gives the truth (the order in which layers run and what feeds what) without running
any compute (`archalign.trace_fx`). Models it cannot trace (data-dependent control flow, most
Hugging Face models) are run once on ``example_inputs`` (or the model's own ``dummy_inputs``) with
forward pre-hooks that record the order in which layers start (`archalign.trace_hooks`). Without
either, the registration order is all there is, and the graph says so in its ``tracer`` field
(`archalign.graph.Tracer`). `harmonise_graphs` then brings both sides to the same evidence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .graph import Tracer, Unit, UnitGraph, build_units, chain_graph, natural_key
from .layouts import infer_layouts, probe_layouts
from .running import ExampleInputs, dummy_inputs, first_line
from .source import TensorSource
from .trace_fx import trace_fx
from .trace_hooks import trace_hooks

__all__ = ["harmonise_graphs", "trace_graph"]

logger = logging.getLogger(__name__)


def trace_graph(source: TensorSource, example_inputs: ExampleInputs = None, *,
                collapse_repeats: bool = True) -> UnitGraph:
    """Build the unit graph of a source, with the best tracer that works on it.

    Parameters
    ----------
    source : TensorSource
        What `read_source` returned for the model or state_dict.
    example_inputs : Tensor, tuple, list, dict or None
        Inputs the model accepts; used only when torch.fx cannot trace it.
    collapse_repeats : bool
        Whether the hooks tracer may run each run of identical blocks as its first two
        (`archalign.repeats`); False runs every block.

    Returns
    -------
    UnitGraph
        Its ``tracer`` names the method used: "fx", "hooks", "registration", "state_dict" (a
        state_dict in registration order) or "sorted" (a state_dict whose order means nothing).
    """
    units = build_units(source)
    module = source.module
    if module is not None:
        units = probe_layouts(module, units)
    if module is None:  # a checkpoint: its layouts from its own layers' shapes and conventions
        return chain_graph(infer_layouts(units), Tracer.STATE_DICT if source.ordered
                           else Tracer.SORTED)
    try:
        return trace_fx(module, units, source, collapse_repeats=collapse_repeats)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        logger.info("torch.fx cannot trace %s (%s: %s); trying forward hooks",
                    type(module).__name__, type(exc).__name__, first_line(exc))
    inputs = example_inputs if example_inputs is not None else dummy_inputs(module)
    if inputs is not None:
        try:
            return trace_hooks(module, units, inputs, collapse_repeats=collapse_repeats)
        except Exception as exc:
            logger.warning("running %s on the example inputs failed (%s: %s); falling back to "
                           "registration order", type(module).__name__, type(exc).__name__, exc)
    else:
        logger.warning("%s cannot be traced by torch.fx and no example_inputs were given; "
                       "using registration order (pass example_inputs=... for a better "
                       "alignment)", type(module).__name__)
    return chain_graph(units, Tracer.REGISTRATION)



def harmonise_graphs(src: UnitGraph, dst: UnitGraph, src_units: Sequence[Unit],
                     dst_units: Sequence[Unit]) -> tuple[UnitGraph, UnitGraph]:
    """Bring two graphs to the same kind of evidence so that their features compare.

    Registration order cannot be compared with execution order, and a hooks graph has order but
    no data flow: both sides are reduced to the weaker of the two. A checkpoint fitted to the
    destination's execution order (`Tracer.FITTED`) is compared with that order. A side whose key order means
    nothing (`Tracer.SORTED`: a ``.safetensors`` file) puts both sides in natural key order.

    Parameters
    ----------
    src, dst : UnitGraph
        What `trace_graph` returned for each side.
    src_units, dst_units : sequence of Unit
        Each side's units in registration order (`build_units`).
    """
    if Tracer.FITTED in (src.tracer, dst.tracer):  # fitted to the other's execution order: keep
        pair = (chain_graph(list(src.units.values()), src.tracer),  # both orders, drop data flow
                chain_graph(list(dst.units.values()), dst.tracer))
    elif not (src.tracer.ordered and dst.tracer.ordered):
        pair = (chain_graph(sorted(src_units, key=lambda u: natural_key(u.key)), Tracer.SORTED),
                chain_graph(sorted(dst_units, key=lambda u: natural_key(u.key)), Tracer.SORTED))
    elif src.tracer is dst.tracer or not (src.tracer.executes or dst.tracer.executes):
        return src, dst
    elif not (src.tracer.executes and dst.tracer.executes):  # one side's order is a guess
        pair = (chain_graph(list(src_units), Tracer.REGISTRATION if src.tracer.executes
                            else src.tracer),
                chain_graph(list(dst_units), Tracer.REGISTRATION if dst.tracer.executes
                            else dst.tracer))
    else:  # one side "hooks", the other "fx": keep each order, drop the fx data flow
        pair = (chain_graph(list(src.units.values()), src.tracer),
                chain_graph(list(dst.units.values()), dst.tracer))
    pair[0].reads, pair[1].reads = src.reads, dst.reads  # which layers read one tensor: kept
    return pair
