"""Exact PyTorch skip-softmax attention: the oracle, the CPU path, and the CPU calibration counter.

It walks key tiles left to right exactly like a flash-attention kernel, so memory stays
O(Lq·bc) per head instead of O(Lq·Lk). For query row r and key tile j::

    m̃[r, j] = max of the unmasked scores of row r in tile j      (−inf if none)
    m[r, j]  = max of m̃[r, j'] over j' < j                        (−inf if none)
    gap[r, j] = m̃ − m     (−inf when m̃ = −inf, +inf when only m = −inf)

    tile (i, j) is skipped  ⇔  max over the existing rows r of query tile i of gap[r, j] < ln λ

            key tiles j →
          ┌────┬────┬────┬────┐
     i=0  │keep│ ·  │ ·  │ ·  │   ·  = causally empty: gap = −inf, skipped and not counted valid
          ├────┼────┼────┼────┤
     i=1  │keep│skip│ ·  │ ·  │   a skipped tile adds nothing to the softmax numerator or
          ├────┼────┼────┼────┤   denominator, and its V tile is never read
     i=2  │keep│skip│keep│ ·  │
          └────┴────┴────┴────┘

GQA: query head h reads KV head h // (Hq / Hkv) through a reshape of q, never a repeat of K/V.
"""

from __future__ import annotations

import torch

from .masks import as_4d, attended, drop_causal_mask
from .threshold import log_threshold, phase_of

NEG_INF = float("-inf")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_mask(attn_mask: torch.Tensor | None, num_kv_heads: int, group: int, query_len: int, kv_len: int):
    """Split a mask into (allowed bool, additive bias or None), shaped (B|1, Hkv|1, G|1, Lq|1, Lk).

    Boolean masks: True = attend. Additive masks: −inf, or the dtype's most negative finite value
    (HuggingFace's convention for masked positions), mean masked; other values are added to scores.
    """
    if attn_mask is None:
        return None, None
    mask = as_4d(attn_mask)
    batch, heads = mask.shape[0], mask.shape[1]
    if heads == 1:
        mask = mask.unsqueeze(2)
    else:
        mask = mask.reshape(batch, num_kv_heads, group, mask.shape[-2], mask.shape[-1])
    return attended(mask), (None if mask.dtype == torch.bool else mask)


def _masked_scores(q_grouped, k_tile, allowed, bias, is_causal, rows, cols, query_len, kv_len, scale):
    """Scores of query rows ``rows`` (a slice) against one key tile, (B, Hkv, G, rows, n), masked = −inf."""
    b, hkv, g, _, d = q_grouped.shape
    q_rows = q_grouped[..., rows, :]
    scores = torch.matmul(q_rows.reshape(b, hkv, -1, d), k_tile.transpose(-1, -2)) * scale
    scores = scores.view(b, hkv, g, q_rows.shape[-2], -1)
    if bias is not None:
        scores = scores + _mask_rows(bias, rows)[..., cols].to(scores.dtype)
    keep = None if allowed is None else _mask_rows(allowed, rows)[..., cols]
    if is_causal:
        row_ids = torch.arange(query_len, device=scores.device)[rows, None]
        causal = cols[None, :] <= row_ids + (kv_len - query_len)  # bottom-right aligned
        keep = causal if keep is None else keep & causal
    if keep is not None:
        scores = scores.masked_fill(~keep, NEG_INF)
    return scores


def _mask_rows(mask, rows):
    """Rows of a (…, Lq|1, Lk) mask; a broadcast row dim stays as is."""
    return mask if mask.shape[-2] == 1 else mask[..., rows, :]


def _tile_gaps(tile_max, running_max, block_m):
    """max over the existing rows of each query tile of m̃ − m, with the −inf/+inf conventions."""
    gap = torch.where(
        tile_max == NEG_INF,
        NEG_INF,
        torch.where(running_max == NEG_INF, float("inf"), tile_max - running_max),
    )
    query_len = gap.shape[-1]
    num_row_tiles = -(-query_len // block_m)
    pad = num_row_tiles * block_m - query_len  # padding rows vote skip: they never block one
    gap = torch.nn.functional.pad(gap, (0, pad), value=NEG_INF)
    return gap.view(*gap.shape[:-1], num_row_tiles, block_m).amax(-1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    threshold_state: torch.Tensor,
    br: int,
    bc: int,
    stats: torch.Tensor | None = None,
    trial_thresholds: torch.Tensor | None = None,
    tile_gaps_out: list | None = None,
) -> torch.Tensor:
    """Skip-softmax attention, exactly as SPEC §4.

    Args:
        q, k, v: (B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv).
        threshold_state: (2, 14) state (see ``threshold.py``), read for this call's phase.
        stats: int64 (2, 1 + T) accumulator or None: column 0 += valid tiles, column 1 + t += valid
            tiles skipped under threshold t (the state's λ when no trials are given).
        trial_thresholds: float (T,) trial λ values; when given the counts use the trials instead of
            the state's λ (calibration's measuring mode); the output still follows the state.
        tile_gaps_out: if a list, receives the (B, Hq, nI) tile gaps of every key tile (tests).
    Returns:
        (B, Hq, Lq, Dv) in q's dtype; rows with nothing unmasked are 0.
    """
    batch, num_heads, query_len, head_dim = q.shape
    num_kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = num_heads // num_kv_heads
    dtype = _compute_dtype(q.dtype)
    phase = phase_of(query_len)

    log_lam = log_threshold(threshold_state, phase, kv_len).to(q.device)
    measuring = trial_thresholds is not None and trial_thresholds.numel() > 0
    count_log_lams = torch.log(trial_thresholds.float().to(q.device)) if measuring else log_lam.reshape(1)

    attn_mask, is_causal = drop_causal_mask(attn_mask, is_causal, query_len, kv_len)
    q_grouped = q.to(dtype).reshape(batch, num_kv_heads, group, query_len, head_dim)
    allowed, bias = normalize_mask(attn_mask, num_kv_heads, group, query_len, kv_len)
    row_shape = (batch, num_kv_heads, group, query_len)
    running_max = torch.full(row_shape, NEG_INF, dtype=dtype, device=q.device)
    row_sum = torch.zeros(row_shape, dtype=dtype, device=q.device)
    acc = torch.zeros(*row_shape, value_dim, dtype=dtype, device=q.device)
    valid_count = torch.zeros((), dtype=torch.int64, device=q.device)
    skip_counts = torch.zeros(count_log_lams.shape, dtype=torch.int64, device=q.device)

    num_row_tiles = -(-query_len // br)
    for start in range(0, kv_len, bc):
        # causal: query tiles that end before the first row seeing this key tile have nothing here
        first_row = max(0, start - (kv_len - query_len)) if is_causal else 0
        if first_row >= query_len:
            break  # neither this key tile nor any later one is seen by any row
        first_tile = first_row // br
        rows = slice(first_tile * br, query_len)
        cols = torch.arange(start, min(start + bc, kv_len), device=q.device)
        scores = _masked_scores(
            q_grouped, k[:, :, start : start + bc].to(dtype), allowed, bias, is_causal, rows, cols, query_len, kv_len, scale
        )
        # -- vote: compare this tile's row maxima with the running maxima of earlier tiles --
        tile_max = scores.amax(-1)
        gaps = _tile_gaps(tile_max, running_max[..., rows], br)  # (B, Hkv, G, nI - first_tile)
        if tile_gaps_out is not None:
            unseen = gaps.new_full((*gaps.shape[:-1], first_tile), NEG_INF)
            tile_gaps_out.append(torch.cat([unseen, gaps], -1).reshape(batch, num_heads, num_row_tiles))
        valid = gaps > NEG_INF
        valid_count += valid.sum()
        skip_counts += (valid[..., None] & (gaps[..., None] < count_log_lams)).flatten(0, -2).sum(0)
        keep_rows = (gaps >= log_lam).repeat_interleave(br, dim=-1)[..., : scores.shape[-2]]

        # -- online softmax over kept tiles; the running max also moves on skipped tiles, which
        #    only rescales (exact) and keeps m equal to the spec's max over all earlier tiles --
        new_max = torch.maximum(running_max[..., rows], tile_max)
        safe_max = torch.where(new_max == NEG_INF, 0.0, new_max)
        alpha = torch.exp(running_max[..., rows] - safe_max)
        probs = torch.exp(scores - safe_max[..., None]) * keep_rows[..., None]
        row_sum[..., rows] = row_sum[..., rows] * alpha + probs.sum(-1)
        pv = torch.matmul(probs.reshape(batch, num_kv_heads, -1, probs.shape[-1]), v[:, :, start : start + bc].to(dtype))
        acc[..., rows, :] = acc[..., rows, :] * alpha[..., None] + pv.view(*probs.shape[:-1], value_dim)
        running_max[..., rows] = new_max

    if stats is not None:
        stats[phase, 0] += valid_count.to(stats.device)
        stats[phase, 1 : 1 + skip_counts.numel()] += skip_counts.to(stats.device)
    out = torch.where(row_sum[..., None] > 0, acc / row_sum.clamp_min(torch.finfo(dtype).tiny)[..., None], 0.0)
    return out.reshape(batch, num_heads, query_len, value_dim).to(q.dtype)
