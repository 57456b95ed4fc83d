"""Find attention subgraphs in FX graphs (Dynamo's torch-level IR and torch.export's ATen IR).

Two forms are recognised, each described once, next to the checks that guard it:

    eager chain   s = matmul(q, kᵀ) [* scale | / d] [+ mask]    (or view ∘ bmm ∘ view/expand; ``/=`` too)
                  p = softmax(s, dim=-1 [, dtype]) [.to()] [dropout(p=0 | eval)] [.to()]
                  out = matmul(p, v)                              (or view ∘ bmm ∘ view/expand)
                  SDPA's decomposed math form is this chain too: q and kᵀ each scaled by √scale,
                  and a safe softmax (all −inf rows → 0, as in the op)
    fused         out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal,
                  scale, enable_gqa) and its flash / efficient / cuDNN / CPU-flash ATen variants

HuggingFace's ``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``, or ``repeat_interleave``)
is peeled from K and V so the op receives the KV heads un-repeated (it does GQA natively).

A detector returns an ``AttentionMatch`` or ``None`` and never touches the graph. When a node is
clearly an attention but the op cannot represent it exactly, the detector raises ``LeftDense``
with the reason; the rewriter reports it and leaves the subgraph alone.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .names import site_name
from .patterns import (
    ADD,
    CASTS,
    DIVIDES,
    DROPOUTS,
    MATMULS,
    METADATA_ASSERTS,
    SCALES,
    SDPA_ARGUMENTS,
    SOFTMAXES,
    VIEWS,
    WHERES,
    arguments,
    is_op,
    op_name,
    same_size,
    users_of,
    value_of,
)

aten = torch.ops.aten
EVAL_HINT = " (for inference, call model.eval() first)"  # HF models built by from_config start in training mode


@dataclass
class AttentionMatch:
    """One attention subgraph the op can replace exactly.

    ``output`` is the node whose value the op produces (B, Hq, Lq, Dv); ``pattern`` lists the
    nodes computing it from q/k/v/mask, which the rewriter erases once they are dead.
    """

    site: str
    output: Node
    query: Node
    key: Node
    value: Node
    mask: Node | None
    is_causal: bool
    scale: float | Node  # a Node when Dynamo made the Python float symbolic
    kind: str
    pattern: list[Node] = field(default_factory=list)


class LeftDense(Exception):
    """An attention the op cannot represent exactly; it stays dense, reported with the reason."""

    def __init__(self, site: str, node: Node, reason: str):
        super().__init__(f"{site} ({node.name}): {reason}")
        self.site, self.reason = site, reason


# -- K/V un-repeating --


def peel_repeat_kv(node: Node, pattern: list[Node]) -> Node:
    """K or V before HF ``repeat_kv``: ``x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv·n, L, D)``
    (torch or ATen spelling, with export's clone) or ``x.repeat_interleave(n, dim=1)``."""
    if is_op(node, {torch.repeat_interleave, "repeat_interleave", aten.repeat_interleave.self_int}):
        args = arguments(node, ("self", "repeats", "dim"))
        if args.get("dim") == 1 and isinstance(args.get("repeats"), int):
            pattern.append(node)
            return args["self"]
        return node
    if not is_op(node, {"reshape", "view", torch.reshape, aten.reshape.default, aten.view.default, aten._unsafe_view.default}):
        return node
    chain, expanded = [node], node.args[0]
    while is_op(expanded, {aten.clone.default, "contiguous"}):
        chain.append(expanded)
        expanded = expanded.args[0]
    if not is_op(expanded, {"expand", aten.expand.default}):
        return node
    unsqueezed = expanded.args[0]
    source = _unsqueezed_at_2(unsqueezed)
    repeated, original = value_of(node), value_of(source) if source is not None else None
    if original is None or repeated is None or original.dim() != 4 or repeated.dim() != 4:
        return node
    if not all(same_size(repeated.shape[d], original.shape[d]) for d in (0, 2, 3)):
        return node  # not a head repeat: only dim 1 may grow
    pattern.extend(chain + [expanded, unsqueezed])
    return source


def _unsqueezed_at_2(node) -> Node | None:
    if is_op(node, {"unsqueeze", aten.unsqueeze.default, torch.unsqueeze}) and node.args[1] == 2:
        return node.args[0]
    if is_op(node, {operator.getitem}) and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None, None, None)
        if len(index) == 5 and index[2] is None and all(i == full for i in index[:2] + index[3:]):
            return node.args[0]
    return None


def _strip_views(node: Node, want_dim: int, pattern: list[Node]) -> Node:
    """Undo ATen's matmul lowering (``expand`` → ``clone`` → ``view`` to 3-D around ``bmm``): the
    deepest node of the view chain that still has ``want_dim`` dims."""
    found, chain = node, []
    while is_op(node, VIEWS):
        chain.append(node)
        node = node.args[0]
        value = value_of(node)
        if value is not None and value.dim() == want_dim:
            found = node
            pattern.extend(chain)
            chain = []
    return found


# -- the eager chain --


def _transposed_key(node: Node, pattern: list[Node]) -> Node | None:
    """k from kᵀ: ``k.transpose(-2, -1)`` / ``transpose(2, 3)`` / ``permute(0, 1, 3, 2)``."""
    value = value_of(node)
    if value is None or value.dim() != 4:
        return None
    if is_op(node, {"transpose", torch.transpose, aten.transpose.int}):
        dims = {d % 4 for d in node.args[1:3]}
        if dims == {2, 3}:
            pattern.append(node)
            return node.args[0]
    if is_op(node, {"permute", aten.permute.default}):
        order = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if [d % 4 for d in order] == [0, 1, 3, 2]:
            pattern.append(node)
            return node.args[0]
    return None


def _matmul_operands(node: Node, pattern: list[Node]) -> tuple[Node, Node] | None:
    """(a, b) of a 4-D ``a @ b``, written as matmul or as ATen's view(bmm(view(a), view(b)))."""
    if is_op(node, MATMULS):
        return node.args[0], node.args[1]
    if is_op(node, VIEWS) and is_op(node.args[0], {aten.bmm.default}):
        bmm = node.args[0]
        if len(users_of(bmm)) != 1:
            return None
        pattern.append(bmm)
        return _strip_views(bmm.args[0], 4, pattern), _strip_views(bmm.args[1], 4, pattern)
    return None


def _scale_factor(node: Node) -> float | Node | None:
    """What a scale node multiplies scores by: a constant, or a symbolic float (a SymFloat node,
    as Dynamo makes of Python floats under ``dynamic=True``); None when it is a tensor."""
    args = list(node.args[:2])
    factor = next((a for a in args if not isinstance(a, Node) or _is_symbolic_float(a)), None)
    if factor is None:  # a 0-dim ``torch.full([], c)`` divisor, as older GPT-2 code writes it
        factor = next((a.args[1] for a in args[1:] if is_op(a, {torch.full}) and a.args[0] in ([], ())), None)
    divides = is_op(node, DIVIDES)
    if isinstance(factor, Node):
        return None if divides else factor
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        return None
    return 1.0 / factor if divides else float(factor)


def _is_symbolic_float(node: Node) -> bool:
    return isinstance(value_of(node), (float, torch.SymFloat))


def _probs_to_output(softmax: Node, pattern: list[Node]) -> tuple[Node, Node] | None:
    """Follow softmax through casts/dropout to ``p @ v``; (output, v) or None when p feeds no matmul."""
    node = softmax
    while True:
        users = users_of(node)
        if not users:
            return None
        safe = _safe_softmax_select(node, users, pattern) if len(users) == 2 else None
        if safe is not None:
            node = safe
            continue
        if len(users) > 1:
            if any(_probs_to_output(u, []) is not None or is_op(u, MATMULS) for u in users):
                raise ValueError("the attention probabilities are also used elsewhere (e.g. output_attentions)")
            return None
        pattern.extend(u for u in node.users if is_op(u, METADATA_ASSERTS))
        user = users[0]
        if is_op(user, DROPOUTS):
            _check_dropout(user)
        elif is_op(user, MATMULS) and user.args[0] is node:
            return user, user.args[1]
        elif is_op(user, {aten.bmm.default}) and user.args[0] is node:
            view = users_of(user)
            if len(view) != 1 or not is_op(view[0], VIEWS):
                return None
            pattern.append(user)
            return view[0], _strip_views(user.args[1], 4, pattern)
        elif not is_op(user, CASTS | VIEWS):
            if is_op(user, {torch.bmm}) or _feeds_probs_matmul(user):
                raise ValueError(f"{_unrepresentable_probs_step(user)} between softmax and P·V is not representable")
            return None
        pattern.append(user)
        node = user


def _feeds_probs_matmul(node: Node, steps: int = 4) -> bool:
    """Whether ``node`` reaches the left operand of a matmul through single-use steps: the softmax
    is attention even though a step on the way is not one the op can absorb."""
    for _ in range(steps):
        users = users_of(node)
        if len(users) != 1 or not users[0].args or users[0].args[0] is not node:
            return False
        node = users[0]
        if is_op(node, MATMULS | {torch.bmm, aten.bmm.default}):
            return True
    return False


def _unrepresentable_probs_step(node: Node) -> str:
    if is_op(node, {operator.getitem, aten.slice.Tensor}):
        return "slicing the probabilities (attention sinks: extra logits in the softmax)"
    if is_op(node, {torch.bmm}):
        return "a 3-D bmm (heads folded into the batch)"
    return op_name(node)


def _safe_softmax_select(softmax: Node, users: list[Node], pattern: list[Node]) -> Node | None:
    """The decomposed ``_safe_softmax`` of SDPA's math form: rows whose scores are all −inf get 0,
    as the op's do: ``where(~any(s != -inf, -1), full_like(p, 0), p)``. Returns the ``where``."""
    fill = next((u for u in users if is_op(u, {aten.full_like.default}) and u.args[1] == 0), None)
    select = next((u for u in users if is_op(u, {aten.where.self})), None)
    if fill is None or select is None or select.args[1:] != (fill, softmax):
        return None
    row_check, checks = select.args[0], []
    while is_op(row_check, {aten.logical_not.default, aten.any.dim, aten.eq.Scalar}):
        checks.append(row_check)
        if is_op(row_check, {aten.eq.Scalar}):
            if row_check.args[0] is not softmax.args[0] or row_check.args[1] != float("-inf"):
                return None
            pattern.extend([fill, select, *checks])
            return select
        row_check = row_check.args[0]
    return None


def _check_dropout(node: Node) -> None:
    args = arguments(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True})
    if is_op(node, {aten.dropout.default}):
        args = arguments(node, ("input", "p", "train"))
        args["training"] = args["train"]
    if args["p"] != 0 and args["training"] is not False:
        raise ValueError(f"dropout p={args['p']} in training mode is random; the op has no dropout{EVAL_HINT}")


def match_eager_attention(softmax: Node) -> AttentionMatch | None:
    """The unfused chain anchored at its softmax (see module docstring)."""
    if not is_op(softmax, SOFTMAXES):
        return None
    site, pattern = site_name(softmax), [softmax]
    try:
        found = _probs_to_output(softmax, pattern)
    except ValueError as error:
        raise LeftDense(site, softmax, str(error)) from None
    if found is None:
        return None  # a softmax that is not attention (router, classifier head)
    output, value = found
    scores_value = value_of(softmax.args[0])
    dim = arguments(softmax, ("input", "dim"), {"dim": None})["dim"]
    if scores_value is None or scores_value.dim() != 4:
        raise LeftDense(site, softmax, "scores are not 4-D (B, H, Lq, Lk)")
    if dim is None or dim % 4 != 3:
        raise LeftDense(site, softmax, f"softmax over dim {dim}, not the last (key) dim")
    return _scores_chain(site, softmax, output, value, pattern)


def _scores_chain(site, softmax, output, value, pattern) -> AttentionMatch:
    """Walk back from the softmax input over [+ mask] and [* scale] to ``q @ kᵀ``."""
    node, mask, scale = softmax.args[0], None, 1.0
    while True:
        node = _through_view_round_trip(node, pattern)
        if any(user not in pattern for user in users_of(node)):  # consumers so far: softmax, chain
            raise LeftDense(site, softmax, f"intermediate {node.name} is used elsewhere")
        pattern.append(node)
        if is_op(node, ADD) and mask is None and "alpha" not in node.kwargs:
            if isinstance(scale, Node) or scale != 1.0:  # softmax((QKᵀ + mask)·c): the op would not scale the mask
                raise LeftDense(site, softmax, "the scale multiplies the mask too (mask added before scaling)")
            a, b = node.args[:2]
            chain_arg = a if _leads_to_scores(a) else b
            mask = b if chain_arg is a else a
            if not isinstance(mask, Node):
                raise LeftDense(site, softmax, "a constant is added to the scores")
            node = chain_arg
        elif is_op(node, SCALES) and _scale_factor(node) is not None:
            factor = _scale_factor(node)
            if isinstance(factor, Node) and scale != 1.0 or isinstance(scale, Node):
                raise LeftDense(site, softmax, "several scale factors, one of them symbolic")
            scale = factor if isinstance(factor, Node) else scale * factor
            node = next(a for a in node.args[:2] if _is_score_tensor(a))
        else:
            break
    operands = _matmul_operands(node, pattern)
    if operands:  # SDPA's math form scales q and kᵀ by √scale each
        (query, q_factor), (key_t, k_factor) = (_peel_constant_scale(o, pattern) for o in operands)
        if isinstance(scale, Node) and q_factor * k_factor != 1.0:
            raise LeftDense(site, softmax, "several scale factors, one of them symbolic")
        scale = scale if isinstance(scale, Node) else scale * q_factor * k_factor
        operands = query, key_t
    key_t = operands and _transposed_key(operands[1], pattern)
    if not key_t:
        what = op_name(node)
        reason = next((known for name, known in _UNREPRESENTABLE.items() if name in what), what)
        raise LeftDense(site, softmax, f"{reason} between QKᵀ and softmax is not representable")
    query = operands[0]
    key, value = peel_repeat_kv(key_t, pattern), peel_repeat_kv(value, pattern)
    _check_dtypes(site, softmax, query, key, value, output)
    if mask is not None and value_of(mask) is not None and value_of(mask).dim() > 4:
        raise LeftDense(site, softmax, "mask has more than 4 dims")
    pattern.append(output)
    return AttentionMatch(site, output, query, key, value, mask, False, scale, "eager", pattern)


_UNREPRESENTABLE = {"tanh": "logit soft-capping (tanh)", "where": "a mask applied by where() (GPT-Neo's causal mask)"}


def _through_view_round_trip(node, pattern: list[Node]) -> Node:
    """x from ``view(view(x, 3-D), x.shape)``, single-use: how functionalization replays an in-place
    op on the 4-D view of a bmm (Falcon's ``scores /= √d`` after ``run_decompositions``)."""
    chain, source = [], node
    while is_op(source, {aten.view.default, aten._unsafe_view.default}) and len(users_of(source)) == 1:
        chain.append(source)
        source = source.args[0]
        if _same_shape(source, node):
            pattern.extend(chain)
            return source
    return node


def _same_shape(a: Node, b: Node) -> bool:
    a, b = value_of(a), value_of(b)
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim()
            and all(same_size(x, y) for x, y in zip(a.shape, b.shape)))


def _is_score_tensor(node) -> bool:
    return isinstance(node, Node) and isinstance(value_of(node), torch.Tensor) and not is_op(node, {torch.full})


def _peel_constant_scale(node: Node, pattern: list[Node]) -> tuple[Node, float]:
    """(x, c) for a single-use ``x * c`` with constant c, else (node, 1)."""
    factor = _scale_factor(node) if is_op(node, SCALES) and len(users_of(node)) == 1 else None
    if not isinstance(factor, float):
        return node, 1.0
    pattern.append(node)
    return next(a for a in node.args[:2] if _is_score_tensor(a)), factor


def _leads_to_scores(node) -> bool:
    """Whether ``node`` is the scores side of ``scores + mask`` (a scale or the QKᵀ matmul)."""
    node = _through_view_round_trip(node, [])
    if is_op(node, WHERES) and len(node.args) == 3:  # where(mask, scores, fill): named as not representable later
        return _leads_to_scores(node.args[1])
    return isinstance(node, Node) and (
        is_op(node, SCALES | MATMULS) or (is_op(node, VIEWS) and is_op(node.args[0], {aten.bmm.default}))
    )


def _check_dtypes(site, anchor, query, key, value, output) -> None:
    values = [value_of(n) for n in (query, key, value, output)]
    if any(v is None for v in values):
        raise LeftDense(site, anchor, "no shape/dtype metadata on q/k/v")
    q, k, v, out = values
    if not (q.dtype == k.dtype == v.dtype == out.dtype):
        raise LeftDense(site, anchor, f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}, out {out.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise LeftDense(site, anchor, "q/k/v are not 4-D (B, H, L, D)")


# -- the fused form --


def match_sdpa(node: Node) -> AttentionMatch | None:
    """``scaled_dot_product_attention`` in any spelling; tuple-returning variants via ``[0]``."""
    names = next((names for targets, names in SDPA_ARGUMENTS if is_op(node, targets)), None)
    if names is None:
        return None
    site, pattern = site_name(node), [node]
    args = arguments(node, names, {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
    output = node
    if isinstance(value_of(node), (tuple, list)):
        outputs = [u for u in node.users if is_op(u, {operator.getitem})]
        if len(outputs) != len(node.users) or any(u.args[1] != 0 and u.users for u in outputs):
            raise LeftDense(site, node, "log-sum-exp or other side outputs of the fused kernel are used")
        firsts = [u for u in outputs if u.args[1] == 0]
        if len(firsts) != 1:
            return None
        output = firsts[0]
        pattern.extend(outputs)
    if args["dropout_p"] not in (0, 0.0):
        raise LeftDense(site, node, f"dropout_p={args['dropout_p']}: the op has no dropout{EVAL_HINT}")
    query = args["query"]
    key, value = peel_repeat_kv(args["key"], pattern), peel_repeat_kv(args["value"], pattern)
    _check_dtypes(site, node, query, key, value, output)
    q, k = value_of(query), value_of(key)
    if args["is_causal"] and not same_size(q.shape[2], k.shape[2]):
        # SDPA's is_causal is top-left aligned, the op's bottom-right: equal only when Lq == Lk.
        raise LeftDense(site, node, "is_causal with Lq != Lk (top-left causal) is not representable")
    scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    scale = scale if isinstance(scale, Node) else float(scale)
    return AttentionMatch(site, output, query, key, value, args["attn_mask"], bool(args["is_causal"]),
                          scale, "sdpa", pattern)


def find_attention(graph: torch.fx.Graph) -> tuple[list[AttentionMatch], list[LeftDense]]:
    """All attention subgraphs of ``graph``: those the op represents, and those left dense (why)."""
    matches, left_dense = [], []
    for node in graph.nodes:
        try:
            found = match_sdpa(node) or match_eager_attention(node)
        except LeftDense as reason:
            left_dense.append(reason)
            continue
        if found is not None:
            matches.append(found)
    return matches, left_dense
