"""Facts about an attention mask that every layer shares, computed once per mask object.

HuggingFace builds one mask per forward and passes it to every layer; when traced (Dynamo, export)
it materialises even a plain causal mask. Both backends ask the questions here instead of
re-reading the L×L mask per layer.
"""

from __future__ import annotations

import weakref

import torch

_CACHE: dict = {}
ROWS_PER_CHUNK = 2048  # mask rows a check or summary touches at once: bounds its temporaries to 2048 × Lk


def per_mask(attn_mask: torch.Tensor, key: tuple, compute):
    """``compute()`` once per mask object, version counter and ``key``."""
    full_key = (id(attn_mask), *key)
    hit = _CACHE.get(full_key)
    if hit is not None and hit[0]() is attn_mask and hit[1] == attn_mask._version:
        return hit[2]
    value = compute()
    for stale in [k for k, v in _CACHE.items() if v[0]() is None]:
        del _CACHE[stale]
    _CACHE[full_key] = (weakref.ref(attn_mask), attn_mask._version, value)
    return value


def as_4d(attn_mask: torch.Tensor) -> torch.Tensor:
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def attended(mask: torch.Tensor) -> torch.Tensor:
    """Where a mask lets a query attend: True entries of a bool mask; entries of an additive mask above the
    dtype's most negative finite value (HuggingFace's "masked", which −inf also is)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min


def is_causal_mask(attn_mask: torch.Tensor, query_len: int, kv_len: int) -> bool:
    """Whether the mask says exactly "bottom-right causal": then it can be dropped for
    ``is_causal=True``, whose loop bounds skip the empty tiles and mask only diagonal ones.

    Compares row chunks, so checking an L×L mask allocates no second L×L tensor."""

    def compute() -> bool:
        mask4 = as_4d(attn_mask)
        if mask4.shape[2] != query_len:
            return False
        cols = torch.arange(kv_len, device=mask4.device)
        for r0 in range(0, query_len, ROWS_PER_CHUNK):
            part = mask4[:, :, r0 : r0 + ROWS_PER_CHUNK]
            rows = torch.arange(r0, r0 + part.shape[2], device=mask4.device)[:, None] + (kv_len - query_len)
            causal = (cols[None, :] <= rows).expand_as(part)
            attend = attended(part)
            if not torch.equal(attend, causal):
                return False
            if part.dtype != torch.bool and part.masked_fill(~attend, 0).any():
                return False  # a bias on attended keys
        return True

    return per_mask(attn_mask, ("causal", query_len, kv_len), compute)


def drop_causal_mask(attn_mask, is_causal: bool, query_len: int, kv_len: int):
    """(mask, is_causal) with an exactly-causal mask replaced by ``is_causal=True``."""
    if attn_mask is not None and query_len > 1 and is_causal_mask(attn_mask, query_len, kv_len):
        return None, True
    return attn_mask, is_causal
