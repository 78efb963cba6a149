"""The benchmark corpus: every exact pair's hand-written truth is proved by its converter.

Slow pairs (building the models and running them takes a few seconds on 2 CPU cores) are marked
``slow``; deselect them with ``-m "not slow"``.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import corpus

TOLERANCE = 1e-4  # max abs output difference allowed for an exact port (float32)
SLOW = frozenset({
    "tv_resnet50->timm_resnet50",
    "tv_resnet34->tv_resnet18",
})

VISION_PORTS = corpus.VISION_PORTS
ALL = [*corpus.PAIRS, *VISION_PORTS]
EXACT = [p for p in ALL if p.exact]
PARTIAL = [p for p in ALL if not p.exact]
PORTS = corpus.PORTS
RELEASES = [p for p in PORTS if p.release is not None]


def _params(pairs: Iterable[Any]) -> list[Any]:
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW else [])
            for p in pairs]


@cache
def _models(name: str) -> tuple[nn.Module, nn.Module]:
    """One (source, destination) build per pair, shared by the read-only tests."""
    pair = corpus.get_pair(name)
    return pair.make_src(), pair.make_dst()


def _source_state(pair: Any, src: nn.Module) -> Mapping[str, torch.Tensor]:
    """What the pair's truth names: the module's state_dict, or its release's checkpoint state."""
    if pair.release is None:
        return src.state_dict()
    with tempfile.TemporaryDirectory() as folder:
        return corpus.read_release(pair, Path(folder), src)[1]


# --------------------------------------------------------------------------- the corpus itself

def test_pairs_are_named_uniquely_and_found_by_name() -> None:
    assert len(corpus.PAIRS) == 13
    assert len(VISION_PORTS) == 9 and all(p.exact for p in VISION_PORTS)
    names = [p.name for p in (*ALL, *PORTS)]
    assert len(names) == len(set(names))
    for name in names:
        assert corpus.get_pair(name).name == name
    with pytest.raises(KeyError, match="known pairs"):
        corpus.get_pair("no-such-pair")


def test_exact_pairs_have_a_converter_and_partial_pairs_do_not() -> None:
    assert all(p.convert is not None for p in EXACT)
    assert all(p.convert is None for p in PARTIAL)
    assert all(p.note for p in ALL)


@pytest.mark.parametrize("pair", _params(PARTIAL))
def test_partial_pairs_cannot_be_verified(pair: Any) -> None:
    with pytest.raises(ValueError, match="partial"):
        corpus.verify_truth(pair)


# --------------------------------------------------------------------------- truth

@pytest.mark.parametrize("pair", _params(ALL))
def test_truth_is_consistent(pair: Any) -> None:
    """Keys exist on their side, aliases are excluded, exact truths cover every destination key."""
    src, dst = _models(pair.name)
    assert corpus.validate_truth(pair, src, dst) == []


@pytest.mark.parametrize("pair", _params(EXACT))
def test_exact_truth_covers_every_destination_key_but_tied_aliases(pair: Any) -> None:
    src, dst = _models(pair.name)
    truth = pair.truth(src, dst)
    aliases = {alias for alias, _ in pair.tied_dst}
    assert set(truth) == set(dst.state_dict()) - aliases
    assert not aliases & set(truth)


@pytest.mark.parametrize("pair", _params(EXACT))
def test_exact_pairs_use_the_same_norm_epsilons(pair: Any) -> None:
    """eps 1e-5 vs 1e-6 moves outputs by less than the tolerance, so it is checked directly."""
    src, dst = _models(pair.name)
    assert corpus.norm_eps_profile(src) == corpus.norm_eps_profile(dst)


def test_seed_scenario_truths() -> None:
    rename = corpus.get_pair("mlp->mlp_renamed_plus_fc3")
    assert rename.truth(*_models(rename.name)) == {
        "first_layer.weight": ("fc1.weight",), "first_layer.bias": ("fc1.bias",),
        "fc2.weight": ("fc2.weight",), "fc2.bias": ("fc2.bias",)}
    deeper = corpus.get_pair("mlp3->mlp2")
    assert deeper.truth(*_models(deeper.name)) == {"fc2.weight": ("fc3.weight",),
                                                   "fc2.bias": ("fc3.bias",),
                                                   "fc1.weight": ("fc1.weight",),
                                                   "fc1.bias": ("fc1.bias",)}


def test_fused_and_tied_truths() -> None:
    phi3 = corpus.get_pair("hf_llama->hf_phi3")
    truth = phi3.truth(*_models(phi3.name))
    assert truth["model.layers.1.self_attn.qkv_proj.weight"] == tuple(
        f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv")
    assert truth["model.layers.0.mlp.gate_up_proj.weight"] == (
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")
    gpt = corpus.get_pair("hf_gpt2->hf_gpt_bigcode")
    truth = gpt.truth(*_models(gpt.name))
    assert "lm_head.weight" not in truth
    assert truth["transformer.wte.weight"] == ("transformer.wte.weight",)


# --------------------------------------------------------------------------- verification

@pytest.mark.parametrize("pair", _params(EXACT))
def test_exact_pair_converts_to_the_same_function(pair: Any) -> None:
    assert corpus.verify_truth(pair) <= TOLERANCE


def _diff_with(pair: Any, edit: Any) -> float:
    """Max output difference after loading the converted weights edited by ``edit(state)``."""
    src, dst = pair.make_src(), pair.make_dst()
    state = pair.convert(_source_state(pair, src), dst)
    edit(state)
    dst.load_state_dict(state, strict=True)
    inputs = pair.make_inputs()
    return float((corpus.run_model(src, inputs) - corpus.run_model(dst, inputs)).abs().max())


@pytest.mark.parametrize("pair", _params([*EXACT, *PORTS]))
def test_a_wrong_mapping_is_caught(pair: Any) -> None:
    """Swapping two same-shape tensors breaks the port: the verification is not vacuous.

    Sources are decorrelated, so even norm weights and BatchNorm statistics differ between layers.
    """
    def swap_first_same_shape(state: dict[str, torch.Tensor]) -> None:
        seen: dict[tuple[int, ...], str] = {}
        for key, tensor in state.items():
            if not tensor.is_floating_point() or key in dict(pair.tied_dst):
                continue
            other = seen.setdefault(tuple(tensor.shape), key)
            if other != key:
                state[key], state[other] = state[other], tensor
                return
        first = next(k for k, t in state.items() if t.dim() == 2)  # no two shapes agree: flip rows
        state[first] = state[first].flip(0)

    assert _diff_with(pair, swap_first_same_shape) > 100 * TOLERANCE


@pytest.mark.parametrize("pair", _params([*ALL, *PORTS]))
def test_source_output_depends_on_the_input(pair: Any) -> None:
    """A saturated or collapsed source would make every verification vacuous."""
    src, _ = _models(pair.name)
    inputs = pair.make_inputs()
    first = corpus.run_model(src, inputs)
    if isinstance(inputs, dict):
        shifted = {**inputs, "input_ids": inputs["input_ids"].roll(1, dims=-1)}
    else:
        shifted = inputs.flip(0)
    second = corpus.run_model(src, shifted)
    assert float((first - second).abs().max()) > 1e-2 * float(first.abs().max())


def test_gpt_bigcode_needs_the_per_head_regrouping_and_the_transposes() -> None:
    """Both GPT-2 -> GPTBigCode traps fit the shapes and still change the function."""
    pair = corpus.get_pair("hf_gpt2->hf_gpt_bigcode")
    src = pair.make_src().state_dict()

    def undo_regrouping(state: dict[str, torch.Tensor]) -> None:
        for key in state:
            if key.endswith("attn.c_attn.weight"):
                state[key] = src[key].t().contiguous()
            elif key.endswith("attn.c_attn.bias"):
                state[key] = src[key].clone()

    def skip_square_transpose(state: dict[str, torch.Tensor]) -> None:
        for key in state:
            if key.endswith("attn.c_proj.weight"):  # 64 x 64: fits either way
                state[key] = src[key].clone()

    assert _diff_with(pair, undo_regrouping) > 100 * TOLERANCE
    assert _diff_with(pair, skip_square_transpose) > 100 * TOLERANCE


def test_models_are_seeded_and_sources_decorrelated() -> None:
    pair = corpus.get_pair("tv_vit->timm_vit")
    a, b = pair.make_src().state_dict(), pair.make_src().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(pair.make_inputs(), pair.make_inputs())
    for key, tensor in a.items():  # no constant tensors left (ones, zeros, class token)
        flat = tensor.reshape(-1)
        assert not bool((flat == flat[0]).all()) or flat.numel() == 1, key


# --------------------------------------------------------------------------- the vision ports

# A key projection's bias adds one constant to every score of a query: softmax ignores it, so no
# output depends on it (on either side); the rest of every port's truth is checked by the outputs.
SOFTMAX_INVARIANT = r"\.(k_proj|key)\.bias$"
UNUSED_AT_INFERENCE = {"dinov2_vit->hf_dinov2": {"embeddings.mask_token"}}  # used with masks only


@pytest.mark.parametrize("pair", _params(VISION_PORTS))
def test_port_outputs_depend_on_every_converted_tensor(pair: Any) -> None:
    """Rolling any one destination tensor by one element moves the output by > 10x the tolerance.

    A tensor the output ignores (a zero head behind it, a vanishing class token) would make its
    truth unchecked: any mapping of it would pass the output check.
    """
    import re

    src, dst = pair.make_src(), pair.make_dst()
    dst.load_state_dict(pair.convert(src.state_dict(), dst), strict=True)
    inputs = pair.make_inputs()
    reference = corpus.run_model(dst, inputs)
    unused = UNUSED_AT_INFERENCE.get(pair.name, set())
    weak = {}
    for key, tensor in dst.state_dict().items():
        if not tensor.is_floating_point() or tensor.numel() < 2:
            continue
        original = tensor.clone()
        with torch.no_grad():
            tensor.copy_(original.reshape(-1).roll(1).reshape(original.shape))
            diff = float((corpus.run_model(dst, inputs) - reference).abs().max())
            tensor.copy_(original)
        exempt = key in unused or re.search(SOFTMAX_INVARIANT, key) is not None
        if exempt != (diff <= 10 * TOLERANCE):
            weak[key] = diff
    assert weak == {}


@pytest.mark.parametrize("pair", _params(VISION_PORTS))
def test_port_sources_have_no_constant_or_vanishing_tensors(pair: Any) -> None:
    src, _ = _models(pair.name)
    for key, tensor in src.state_dict().items():
        if not tensor.is_floating_point() or tensor.numel() < 2:
            continue
        flat = tensor.reshape(-1)
        assert not bool((flat == flat[0]).all()), key
        assert float(flat.abs().max()) >= 1e-4, key


def _swap(state: dict[str, torch.Tensor], a: str, b: str) -> None:
    state[a], state[b] = state[b], state[a]


def _kv_before_q(state: dict[str, torch.Tensor]) -> None:
    """SigLIP's in_proj built as cat(kv, q) instead of cat(q, kv): same shape, rows [k; v; q]."""
    for key in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
        q, kv = state[key].split([TINY_WIDTH, 2 * TINY_WIDTH])
        state[key] = torch.cat([kv, q])


TINY_WIDTH = 64
TRAPS = {  # a wrong conversion that fits every shape, per port
    "timm_vit->hf_vit": lambda s: _swap(s, "vit.layers.0.attention.q_proj.weight",
                                        "vit.layers.0.attention.k_proj.weight"),
    "timm_deit_distilled->hf_deit_with_teacher": lambda s: _swap(
        s, "deit.embeddings.cls_token", "deit.embeddings.distillation_token"),
    "timm_vit_siglip->hf_siglip_vision": _kv_before_q,
    "dinov2_vit->hf_dinov2": lambda s: _swap(s, "encoder.layer.1.layer_scale1.lambda1",
                                             "encoder.layer.1.layer_scale2.lambda1"),
    "openai_clip_vit->hf_clip_vision": lambda s: _swap(
        s, "vision_model.encoder.layers.0.self_attn.q_proj.bias",
        "vision_model.encoder.layers.0.self_attn.v_proj.bias"),
    "hf_swin->timm_swin": lambda s: _swap(s, "layers.0.blocks.0.attn.relative_position_bias_table",
                                          "layers.0.blocks.1.attn.relative_position_bias_table"),
}


@pytest.mark.parametrize("name", sorted(TRAPS))
def test_port_traps_fit_the_shapes_and_change_the_function(name: str) -> None:
    assert _diff_with(corpus.get_pair(name), TRAPS[name]) > 100 * TOLERANCE


def test_run_model_takes_the_most_downstream_output() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

    hidden, pooled, logits = torch.ones(1, 3, 2), torch.full((1, 2), 2.0), torch.full((1, 4), 3.0)

    class Fixed(nn.Module):
        def __init__(self, out: Any) -> None:
            super().__init__()
            self.out = out

        def forward(self, x: torch.Tensor) -> Any:
            return self.out

    x = torch.zeros(1)
    with_pool = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
    assert corpus.run_model(Fixed(with_pool), x) is pooled
    assert corpus.run_model(Fixed(BaseModelOutputWithPooling(last_hidden_state=hidden)), x) is hidden
    assert corpus.run_model(Fixed(ImageClassifierOutput(logits=logits)), x) is logits
    assert corpus.run_model(Fixed((hidden, pooled)), x) is hidden
    with pytest.raises(TypeError, match="output tensor"):
        corpus.run_model(Fixed(("no tensor",)), x)


# --------------------------------------------------------------------------- ports and releases

def test_ports_are_named_uniquely_found_by_name_and_kept_out_of_the_pairs() -> None:
    names = [p.name for p in (*corpus.PAIRS, *PORTS)]
    assert len(names) == len(set(names))
    assert len(PORTS) >= 12 and len(RELEASES) >= 4
    for pair in PORTS:
        assert corpus.get_pair(pair.name) is pair
        assert pair.exact and pair.convert is not None and pair.note
        assert pair.source_module == (pair.release is None)  # every release pair is checkpoint-only
    assert not {p.name for p in PORTS} & {p.name for p in corpus.PAIRS}
    assert all(p.release is None and p.source_module for p in corpus.PAIRS)


@pytest.mark.parametrize("pair", _params(PORTS))
def test_port_truth_is_consistent_and_complete(pair: Any) -> None:
    """Release pairs are validated against the checkpoint's keys, not the module's."""
    src, dst = _models(pair.name)
    state = _source_state(pair, src)
    assert corpus.validate_truth(pair, state, dst) == []
    assert corpus.validate_truth(pair) == []  # the same through a freshly written release
    assert set(pair.truth(state, dst)) == set(dst.state_dict()) - {a for a, _ in pair.tied_dst}
    assert corpus.norm_eps_profile(src) == corpus.norm_eps_profile(dst)


@pytest.mark.parametrize("pair", _params(PORTS))
def test_port_converts_to_the_same_function(pair: Any) -> None:
    assert corpus.verify_truth(pair) <= TOLERANCE


# tensors that cannot change a softmax attention's output: a key bias adds q . b_k, the same for
# every key of a query (with rotary embeddings it is rotated per position and does matter)
OUTPUT_INVARIANT = {"hf_bert_mlm->hf_electra_mlm": r".*attention\.self\.key\.bias"}


@pytest.mark.parametrize("pair", _params([p for p in PORTS if p.release is None]))
def test_port_output_depends_on_every_source_tensor(pair: Any) -> None:
    """Shuffling any one source tensor's values moves the output: no tensor is a dead end (a
    zero head, an expert no token reaches, a uniform attention), so every check can fail."""
    src, _ = _models(pair.name)
    inputs = pair.make_inputs()
    base = corpus.run_model(src, inputs).clone()
    aliases = corpus.tied_aliases(src)
    invariant = OUTPUT_INVARIANT.get(pair.name, r"(?!)")
    dead = []
    for key, tensor in src.state_dict(keep_vars=True).items():
        if key in aliases or not tensor.is_floating_point() or re.fullmatch(invariant, key):
            continue
        old = tensor.detach().clone()
        order = torch.randperm(old.numel(), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            tensor.copy_(old.reshape(-1)[order].reshape(old.shape))
            moved = float((corpus.run_model(src, inputs) - base).abs().max())
            tensor.copy_(old)
        if moved <= 10 * TOLERANCE:
            dead.append((key, moved))
    assert dead == []


def _edit_keys(pattern: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    def edit(state: dict[str, torch.Tensor]) -> None:
        hits = [k for k in state if re.search(pattern, k)]
        assert hits, pattern
        for key in hits:
            state[key] = change(state[key]).contiguous()
    return edit


def _unpermute(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The inverse of `permute_for_rope`: back to the interleaved rows the source had."""
    def undo(w: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
    return undo


@pytest.mark.parametrize("name", ["meta_llama->hf_llama", "mistral_moe->hf_mixtral",
                                  "meta_llama_tp2_release->hf_llama"])
def test_rotary_ports_need_the_per_head_permutation(name: str) -> None:
    """Copying wq / wk unpermuted fits every shape and changes the function."""
    pair = corpus.get_pair(name)
    llama = corpus.lm_ports.LLAMA
    assert _diff_with(pair, _edit_keys(r"q_proj\.weight$", _unpermute(llama["n_heads"]))) > 1e-2
    assert _diff_with(pair, _edit_keys(r"k_proj\.weight$", _unpermute(llama["n_kv_heads"]))) > 1e-2


def test_permute_for_rope_matches_the_rotary_conventions() -> None:
    """Rotating interleaved pairs == rotating halves of the permuted rows (one head of 8)."""
    from corpus.reference import meta_llama, qwen2_moe_v4

    torch.manual_seed(0)
    x = torch.randn(1, 5, 1, 8)
    freqs = meta_llama.precompute_freqs_cis(8, 5)
    interleaved, _ = meta_llama.apply_rotary_emb(x, x, freqs)
    order = corpus.lm_ports.permute_for_rope(torch.arange(8.0)[:, None], 1).reshape(-1).long()
    cos, sin = qwen2_moe_v4.Qwen2MoeRotaryEmbedding(8, 10000.0)(torch.arange(5))
    halves = x[..., order] * cos[None, :, None] + qwen2_moe_v4.rotate_half(x[..., order]) * sin[
        None, :, None]
    assert torch.allclose(interleaved[..., order], halves, atol=1e-6)


@pytest.mark.parametrize("name", ["mistral_moe->hf_mixtral", "qwen2_moe_v4->hf_qwen2_moe"])
def test_stacked_experts_need_their_order_and_layout(name: str) -> None:
    """gate/up halves swapped, or experts in another order, fit the 3-D shape and are wrong; so is
    Qwen's square [E, 2I, H] = [4, 64, 64] gate_up_proj transposed."""
    pair = corpus.get_pair(name)
    swap_halves = _edit_keys(r"gate_up_proj$", lambda t: t.roll(t.shape[1] // 2, dims=1))
    assert _diff_with(pair, swap_halves) > 1e-2
    assert _diff_with(pair, _edit_keys(r"down_proj$", lambda t: t.roll(1, dims=0))) > 1e-2
    if name.startswith("qwen"):
        assert _diff_with(pair, _edit_keys(r"gate_up_proj$", lambda t: t.transpose(1, 2))) > 1e-2


def test_nanogpt_needs_every_transpose_the_square_one_too() -> None:
    pair = corpus.get_pair("nanogpt->hf_gpt2")
    assert _diff_with(pair, _edit_keys(r"attn\.c_proj\.weight$", lambda t: t.t())) > 1e-2


def test_mixtral_release_w2_is_transposed_per_expert() -> None:
    """w2 [E*I, H] viewed as [E, H, I] without the per-expert transpose has down_proj's shape."""
    pair = corpus.get_pair("mixtral_release->hf_mixtral")
    src, dst = _models(pair.name)
    state = _source_state(pair, src)
    w2 = state["layers.0.block_sparse_moe.w2"]
    assert w2.shape == (4 * 128, 64)
    assert w2.reshape(4, 64, 128).shape == dst.state_dict()["model.layers.0.mlp.experts.down_proj"].shape

    def untransposed(conv: dict[str, torch.Tensor]) -> None:
        for i in range(2):
            conv[f"model.layers.{i}.mlp.experts.down_proj"] = state[
                f"layers.{i}.block_sparse_moe.w2"].reshape(4, 64, 128).clone()

    assert _diff_with(pair, untransposed) > 1e-2


def test_tensor_parallel_shards_fit_nothing_alone_and_hold_the_same_keys(tmp_path: Path) -> None:
    pair = corpus.get_pair("meta_llama_tp2_release->hf_llama")
    path, merged = corpus.read_release(pair, tmp_path)
    shards = [torch.load(p, weights_only=True) for p in sorted(path.glob("consolidated.*.pth"))]
    assert len(shards) == 2 and list(shards[0]) == list(shards[1]) == list(merged)
    assert shards[0]["layers.0.attention.wq.weight"].shape == (32, 64)  # rows split
    assert shards[0]["layers.0.attention.wo.weight"].shape == (64, 32)  # columns split
    assert torch.equal(shards[0]["norm.weight"], shards[1]["norm.weight"])  # replicated
    assert "rope.freqs" in merged and "rope.freqs" not in {
        s for v in pair.truth(merged, pair.make_dst()).values() for s in v}


def test_the_ema_entry_is_the_one_to_load(tmp_path: Path) -> None:
    """The raw 'model' entry has the same names (unprefixed) and shapes, and other values."""
    pair = corpus.get_pair("hf_bert_mlm_ema_ckpt->hf_electra_mlm")
    assert pair.release is not None and pair.release.entry == "model_ema"
    path, _ = corpus.read_release(pair, tmp_path)
    raw = torch.load(path, weights_only=True)["model"]
    src, dst = pair.make_src(), pair.make_dst()
    base = corpus.get_pair("hf_bert_mlm->hf_electra_mlm")
    dst.load_state_dict(base.convert(raw, dst), strict=True)
    inputs = pair.make_inputs()
    assert float((corpus.run_model(src, inputs) - corpus.run_model(dst, inputs)).abs().max()) > 1e-2


@pytest.mark.parametrize("pair", _params(RELEASES))
def test_release_files_load_without_unpickling_code(pair: Any, tmp_path: Path) -> None:
    """Every pickle of a release loads with weights_only=True, as archalign reads files."""
    path, _ = corpus.read_release(pair, tmp_path)
    files = [path] if path.is_file() else sorted(path.iterdir())
    for file in files:
        if file.suffix in {".pt", ".pth", ".ckpt", ".bin"}:
            torch.load(file, weights_only=True)


def test_opt_needs_the_split_order_and_the_position_offset() -> None:
    pair = corpus.get_pair("hf_gpt2->hf_opt")
    src = pair.make_src().state_dict()

    def q_from_k_columns(state: dict[str, torch.Tensor]) -> None:  # [q | k | v] read as [k | q | v]
        for i in range(2):
            k, q = f"model.decoder.layers.{i}.self_attn.k_proj", f"model.decoder.layers.{i}.self_attn.q_proj"
            for t in ("weight", "bias"):
                state[f"{q}.{t}"], state[f"{k}.{t}"] = state[f"{k}.{t}"], state[f"{q}.{t}"]

    def positions_unshifted(state: dict[str, torch.Tensor]) -> None:  # wpe copied to rows 0..63
        wpe = src["transformer.wpe.weight"]
        state["model.decoder.embed_positions.weight"] = torch.cat([wpe, wpe[-2:]])

    assert _diff_with(pair, q_from_k_columns) > 1e-2
    assert _diff_with(pair, positions_unshifted) > 1e-2
