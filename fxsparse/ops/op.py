"""``torch.ops.fxsparse.skip_softmax_attention``: schema, fake kernel, validation and dispatch.

This module imports only torch; the Triton backend is imported lazily on first CUDA use.
The op is a ``torch.library.custom_op`` so that Dynamo, Inductor and torch.export treat it as one
opaque node (``stats`` is declared mutated, so functionalization keeps the counting). ``stats`` is
a required tensor — an empty one means "don't count" — because Inductor cannot lower an optional
mutated argument that is None (it emits a bare ``getitem``).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .reference import reference_attention
from .threshold import make_threshold_state, validate_threshold_state

BACKENDS = ("auto", "pytorch", "triton")


def _validate(q, k, v, attn_mask, scale, threshold_state, br, bc, backend, stats, trial_thresholds) -> None:
    """Clear ValueErrors for every input the op cannot represent."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (batch, num_heads, query_len, head_dim), num_kv_heads = q.shape, k.shape[1]
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k head dims differ: {head_dim} vs {k.shape[-1]}")
    if v.shape[1] != num_kv_heads or v.shape[2] != k.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share heads and length")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}")
    if attn_mask is not None:
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, q on {q.device}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise ValueError(f"attn_mask must be bool or floating, got {attn_mask.dtype}")
        shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        target = (batch, num_heads, query_len, k.shape[2])
        if attn_mask.dim() > 4 or any(s not in (1, t) for s, t in zip(shape, target)) or shape[1] not in (1, num_heads):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}")
        if shape[-1] != target[-1]:
            raise ValueError(f"attn_mask last dim must be Lk={target[-1]}, got {shape[-1]}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    validate_threshold_state(threshold_state)
    for name, size in (("br", br), ("bc", bc)):
        if size < 1 or size & (size - 1):
            raise ValueError(f"{name} must be a positive power of two, got {size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if stats.numel():
        columns = 1 + max(1, 0 if trial_thresholds is None else trial_thresholds.numel())
        if stats.dtype != torch.int64 or tuple(stats.shape) != (2, columns):
            raise ValueError(f"stats must be int64 of shape (2, {columns}), got {stats.dtype} {tuple(stats.shape)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` → triton on CUDA, pytorch elsewhere; ``triton`` off CUDA is an error."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "pytorch"
    if backend == "triton" and device.type != "cuda":
        raise ValueError(f"backend='triton' needs a CUDA device, got tensors on {device}; use backend='pytorch'")
    return backend


@torch.library.custom_op("fxsparse::skip_softmax_attention", mutates_args=("stats",))
def skip_softmax_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    threshold_state: torch.Tensor,
    br: int,
    bc: int,
    backend: str,
    stats: torch.Tensor,
    trial_thresholds: torch.Tensor | None,
) -> torch.Tensor:
    _validate(q, k, v, attn_mask, scale, threshold_state, br, bc, backend, stats, trial_thresholds)
    stats = stats if stats.numel() else None
    if resolve_backend(backend, q.device) == "triton":
        from . import triton_attention  # lazy: Triton is only needed on CUDA

        return triton_attention.skip_softmax_attention(
            q, k, v, attn_mask, is_causal, scale, threshold_state, br, bc, stats, trial_thresholds
        )
    return reference_attention(
        q, k, v, attn_mask, is_causal, scale, threshold_state, br, bc, stats, trial_thresholds
    )


@skip_softmax_attention_op.register_fake
def _(q, k, v, attn_mask, is_causal, scale, threshold_state, br, bc, backend, stats, trial_thresholds):
    _validate(q, k, v, attn_mask, scale, threshold_state, br, bc, backend, stats, trial_thresholds)
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def as_threshold_state(threshold, device) -> torch.Tensor:
    """A float λ, a per-phase dict, or a ready (2, 14) state tensor → a state tensor on ``device``."""
    if isinstance(threshold, torch.Tensor):
        validate_threshold_state(threshold)
        return threshold
    if isinstance(threshold, (int, float, Mapping)) and not isinstance(threshold, bool):
        return make_threshold_state(threshold, device=device)
    raise ValueError(f"threshold must be a float λ, a per-phase dict or a (2, 14) state tensor, got {threshold!r}")


def skip_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    threshold: float | Mapping[str, float] | torch.Tensor = 0.0,
    br: int = 128,
    bc: int = 128,
    backend: str = "pytorch",
    return_stats: bool = False,
):
    """Skip-softmax attention (SPEC §4).

    Args:
        q, k, v: (B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv); Hq a multiple of Hkv.
        attn_mask: bool (True = attend) or additive, broadcastable to (B, Hq, Lq, Lk).
        is_causal: bottom-right aligned causal mask (key c masked for row r iff c > r + Lk − Lq).
        scale: score scale, default 1/sqrt(D).
        threshold: λ ≥ 0 (0 never skips), ``{"prefill": .., "decode": ..}``, or a (2, 14) state tensor.
        br, bc: query / key tile sizes of the skip decision.
        backend: ``"pytorch"``, ``"triton"`` or ``"auto"``.
        return_stats: also return int64 (2, 2) ``[[valid, skipped] prefill, [valid, skipped] decode]``.

    Example::

        out, stats = skip_softmax_attention(q, k, v, is_causal=True, threshold=1e-2, return_stats=True)
        sparsity = stats[0, 1] / stats[0, 0]
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    state = as_threshold_state(threshold, q.device)
    stats = torch.zeros(2 if return_stats else 0, 2, dtype=torch.int64, device=q.device)
    out = torch.ops.fxsparse.skip_softmax_attention(
        q, k, v, attn_mask, is_causal, scale, state, br, bc, backend, stats, None
    )
    return (out, stats) if return_stats else out
