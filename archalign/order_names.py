"""Names as tie-breaks of the order fit: where children cost the same in any order, what names say.

A checkpoint's key tree leaves some sibling orders open, and equal children (q, k, v and o: four
equal linears; two equal norms) cost the same wherever they stand. The names then decide, by the
conventions of how models are written: children named as in the destination in its order
(`name_inversions`); the steps names claim (`role_inversions`: q, k, v before o; gate and up
before down; before/pre before after/post; a language model's embedding before its head) and the
steps of attention or of a gated MLP back to back (`role_spread`); numbered
siblings in their numbers' order (`ordinal_inversions`) and together (`ordinal_spread`).

Pure functions of names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["ORDINAL", "name_inversions", "ordinal_inversions", "ordinal_spread", "role_inversions",
           "role_of", "role_spread", "roles_of"]

ORDINAL = re.compile(r"(.*?)_?(\d+)")  # "norm2" -> ("norm", 2); "ln_1" -> ("ln", 1); "3" -> ("", 3)


def name_inversions(order: list[str], names_at: dict[str, int]) -> int:
    """Pairs of children named as destination modules that run in the other order."""
    at = [names_at[n] for n in order if n in names_at]
    return sum(a > b for i, a in enumerate(at) for b in at[i + 1:])


def role_inversions(order: list[str]) -> int:
    """Pairs of children named for their step (``_ROLES``: ``q_proj``, ``key``, ``wo``,
    ``down_proj``; ``layernorm_before``, ``post_attention_layernorm``; ``tok_embeddings``,
    ``output``) that stand against the order attention, gated MLPs and language models compute
    them in, or against what their names say."""
    at = [roles_of(n) for n in order]
    return sum(any(g in b and a[g] > b[g] for g in a)
               for i, a in enumerate(at) for b in at[i + 1:])


def role_spread(order: list[str]) -> int:
    """How far apart children claiming steps of attention or of a gated MLP stand (`_ADJACENT`:
    their steps hold all the parameters of the computation, so they run back to back): 0 when
    each computation's children are adjacent (``q``, ``kv`` together, not ``q``, ``proj``,
    ``norm``, ``kv``)."""
    at: dict[int, list[int]] = {}
    for i, name in enumerate(order):
        for group in roles_of(name).keys() & _ADJACENT:
            at.setdefault(group, []).append(i)
    return _apart(at.values())


def roles_of(name: str) -> dict[int, int]:
    """The steps a child's name claims, per computation (the first word that claims one)."""
    out: dict[int, int] = {}
    for word in _WORDS.findall(name.lower()):
        for group, step in _ROLES.get(word, _fused_roles(word)):
            out.setdefault(group, step)
    return out


def _fused_roles(word: str) -> tuple[tuple[int, int], ...]:
    """The step of a fused projection's name: ``qkv``, ``kv``, ``wqkv`` are computed where
    their first part is (``kv`` after ``q``, as cross-attention and pooling heads do)."""
    letters = word[1:] if word.startswith("w") else word
    if len(letters) < 2 or not set(letters) <= set("qkv"):
        return ()
    if letters != "".join(sorted(set(letters), key="qkv".index)):  # each once, in q, k, v order
        return ()
    return ((0, "qkv".index(letters[0])),)


def role_of(name: str) -> tuple[int, int] | None:
    """The first step a child's name claims (a sort key)."""
    roles = roles_of(name)
    return min(roles.items()) if roles else None


_WORDS = re.compile(r"[a-z]+")
# the conventions of names: word -> (which computation, the step it is computed at)
_ROLES: dict[str, tuple[tuple[int, int], ...]] = {
    **{w: ((0, 0),) for w in ("q", "query", "wq")}, **{w: ((0, 1),) for w in ("k", "key", "wk")},
    **{w: ((0, 2),) for w in ("v", "value", "wv")},
    **{w: ((0, 3),) for w in ("o", "out", "wo")}, "output": ((0, 3), (3, 1)),
    "gate": ((1, 0),), "up": ((1, 1),), "down": ((1, 2),),
    **{w: ((2, 0),) for w in ("before", "pre", "input")}, **{w: ((2, 1),) for w in ("after", "post")},
    # a language model's input embedding runs first, its output head last
    **{w: ((3, 0),) for w in ("embed", "embeddings", "embedding", "tok", "wte", "tokens")},
    **{w: ((3, 1),) for w in ("head", "lm", "logits", "unembed")},
}


_ADJACENT = frozenset({0, 1})  # computations whose named steps run back to back (attention, MLP)


def ordinal_inversions(order: list[str]) -> int:
    """Pairs of numbered siblings of one stem against their numbers' order (``w2`` before ``w1``)."""
    at = [(m.group(1), int(m.group(2))) for m in map(ORDINAL.fullmatch, order)
          if m and m.group(1)]
    return sum(a[0] == b[0] and a[1] > b[1] for i, a in enumerate(at) for b in at[i + 1:])


def ordinal_spread(order: list[str]) -> int:
    """How far apart siblings of one number are (``conv1``, ``bn1``): 0 when each number's
    siblings are adjacent."""
    at: dict[str, list[int]] = {}
    for i, name in enumerate(order):
        match = ORDINAL.fullmatch(name)
        if match and match.group(1):
            at.setdefault(match.group(2), []).append(i)
    return _apart(at.values())


def _apart(groups: Iterable[list[int]]) -> int:
    """How many places in all lie between the members of each group (by their places in an
    order): 0 when every group stands together."""
    return sum(max(p) - min(p) - (len(p) - 1) for p in groups)
