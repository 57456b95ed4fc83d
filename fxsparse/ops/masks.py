"""Facts about an attention mask that every layer shares, computed once per mask object.

HuggingFace builds one mask per forward and passes it to every layer; when traced (Dynamo, export)
it materialises even a plain causal mask. Both backends ask the questions here instead of
re-reading the L×L mask per layer.
"""

from __future__ import annotations

import weakref

import torch

_CACHE: dict = {}


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


def is_causal_mask(attn_mask: torch.Tensor, query_len: int, kv_len: int) -> bool:
    """Whether the mask says exactly "bottom-right causal": then it can be dropped for
    ``is_causal=True``, whose loop bounds skip the empty tiles and mask only diagonal ones."""

    def compute() -> bool:
        mask4 = as_4d(attn_mask)
        if mask4.shape[2] != query_len:
            return False
        rows = torch.arange(query_len, device=mask4.device)[:, None] + (kv_len - query_len)
        causal = torch.arange(kv_len, device=mask4.device)[None, :] <= rows
        if mask4.dtype == torch.bool:
            return bool(torch.equal(mask4, causal.expand_as(mask4)))
        attend = mask4 > torch.finfo(mask4.dtype).min
        return bool(torch.equal(attend, causal.expand_as(attend)) and not mask4.masked_fill(~attend, 0).any())

    return per_mask(attn_mask, ("causal", query_len, kv_len), compute)


def drop_causal_mask(attn_mask, is_causal: bool, query_len: int, kv_len: int):
    """(mask, is_causal) with an exactly-causal mask replaced by ``is_causal=True``."""
    if attn_mask is not None and query_len > 1 and is_causal_mask(attn_mask, query_len, kv_len):
        return None, True
    return attn_mask, is_causal
