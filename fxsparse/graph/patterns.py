"""The vocabulary of attention patterns: which FX targets spell each step, in both IRs.

A target set mixes torch-level callables (Dynamo's IR: ``torch.matmul``, ``operator.mul``,
``F.softmax``), ``Tensor`` method names (Dynamo's ``call_method`` nodes: ``"softmax"``, ``"to"``)
and ATen overloads (torch.export's IR: ``aten.bmm.default``). ``is_op`` tests a node against one.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

MATMULS = {torch.matmul, operator.matmul, "matmul", aten.matmul.default}
SCALES = {
    operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div",
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
    # in place (Falcon's ``scores /= √d``): a node of its own in both IRs, read through its result
    operator.imul, operator.itruediv, aten.mul_.Tensor, aten.div_.Tensor,
}
DIVIDES = {operator.truediv, operator.itruediv, torch.div, "div", aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor}
ADD = {operator.add, torch.add, "add", aten.add.Tensor}
WHERES = {torch.where, "where", aten.where.self}
SOFTMAXES = {
    F.softmax, torch.softmax, "softmax",
    aten.softmax.int, aten._softmax.default, aten._safe_softmax.default,
}
# value-preserving steps between softmax and P·V (a cast back to the query dtype, a copy)
CASTS = {
    "to", "type", "float", "half", "bfloat16", "contiguous", "clone",
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
    aten.alias.default, aten.contiguous.default,
}
DROPOUTS = {F.dropout, torch.dropout, aten.dropout.default}
# ATen's lowering of a 4-D matmul to bmm: expand, (clone,) view to 3-D, and back
VIEWS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.clone.default, "view", "reshape", "expand",
}
METADATA_ASSERTS = {aten._assert_tensor_metadata.default}

_SDPA = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# (targets, argument names in positional order) for every spelling of fused attention
SDPA_ARGUMENTS = (
    ({F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}, _SDPA),
    ({aten._scaled_dot_product_flash_attention.default},
     ("query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale")),
    ({aten._scaled_dot_product_flash_attention_for_cpu.default},
     ("query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale")),
    ({aten._scaled_dot_product_efficient_attention.default},
     ("query", "key", "value", "attn_mask", "compute_log_sumexp", "dropout_p", "is_causal", "scale")),
    ({aten._scaled_dot_product_cudnn_attention.default},
     ("query", "key", "value", "attn_mask", "compute_log_sumexp", "dropout_p", "is_causal",
      "return_debug_mask", "scale")),
)
# the fused kernels call the mask argument attn_bias
_ALIASES = {"attn_bias": "attn_mask"}


def is_op(node, targets) -> bool:
    """Whether ``node`` calls one of ``targets`` (a callable, an ATen overload or a method name)."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return node.target in targets
    return node.op == "call_function" and node.target in targets


def op_name(node: Node) -> str:
    """A short name for messages: ``Tensor.float``, ``cat``, ``aten.slice.Tensor``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def arguments(node: Node, names, defaults: dict | None = None) -> dict:
    """Positional and keyword arguments of ``node`` by name, with ``defaults`` for absent ones."""
    found = dict(defaults or {})
    found.update(zip(names, node.args))
    for key, value in node.kwargs.items():
        found[_ALIASES.get(key, key)] = value
    return found


def value_of(node) -> torch.Tensor | None:
    """The (fake) tensor a node computes: ``val`` in torch.export IR, ``example_value`` in Dynamo's."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def users_of(node: Node) -> list[Node]:
    """Users that consume the value; export's ``_assert_tensor_metadata`` checks do not count."""
    return [u for u in node.users if not is_op(u, METADATA_ASSERTS)]


def same_size(a, b) -> bool:
    return statically_known_true(a == b)
