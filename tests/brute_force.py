"""An independent float64 oracle for skip-softmax attention, written straight from SPEC §4.

It shares no code with ``fxsparse.ops.reference``: it builds the full (Lq, Lk) score matrix of one
head, then walks query tiles, key tiles and rows in plain Python loops, voting and normalising
exactly as the spec words it. It is slow on purpose; keep shapes small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

NEG_INF = -math.inf


@dataclass
class BruteForceResult:
    out: np.ndarray  # (B, Hq, Lq, Dv) float64
    skipped: np.ndarray  # (B, Hq, nI, nJ) bool: tile (i, j) skipped
    valid: np.ndarray  # (B, Hq, nI, nJ) bool: tile (i, j) has an unmasked (existing row, column) pair

    @property
    def counts(self) -> tuple[int, int]:
        """(valid tiles, valid tiles skipped), as the op's stats count them."""
        return int(self.valid.sum()), int((self.valid & self.skipped).sum())


def allowed_and_bias(attn_mask, shape, is_causal) -> tuple[np.ndarray, np.ndarray]:
    """Per (b, h, r, c): whether the pair is unmasked, and the additive bias added to its score."""
    batch, num_heads, query_len, kv_len = shape
    allowed = np.ones(shape, dtype=bool)
    bias = np.zeros(shape, dtype=np.float64)
    if attn_mask is not None:
        mask = torch.broadcast_to(attn_mask, shape)
        if mask.dtype == torch.bool:
            allowed &= mask.numpy()
        else:
            # additive: −inf and the mask dtype's most negative finite value both mean "masked"
            values = mask.double().numpy()
            allowed &= (values != NEG_INF) & (values != torch.finfo(mask.dtype).min)
            bias = np.where(allowed, values, 0.0)
    if is_causal:
        for r in range(query_len):
            last_visible = r + (kv_len - query_len)  # bottom-right aligned: c > last_visible is masked
            allowed[:, :, r, max(0, last_visible + 1) :] = False
    return allowed, bias


def brute_force_attention(q, k, v, attn_mask, is_causal, scale, lam, br, bc) -> BruteForceResult:
    """Skip-softmax attention of (B, Hq, Lq, D) q against (B, Hkv, Lk, D) k and (B, Hkv, Lk, Dv) v."""
    batch, num_heads, query_len, _ = q.shape
    num_kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = (t.double().numpy() for t in (q, k, v))
    allowed, bias = allowed_and_bias(attn_mask, (batch, num_heads, query_len, kv_len), is_causal)
    log_lam = math.log(lam) if lam > 0 else NEG_INF
    num_row_tiles, num_col_tiles = -(-query_len // br), -(-kv_len // bc)

    out = np.zeros((batch, num_heads, query_len, value_dim))
    skipped = np.zeros((batch, num_heads, num_row_tiles, num_col_tiles), dtype=bool)
    valid = np.zeros_like(skipped)
    for b in range(batch):
        for h in range(num_heads):
            kv_head = h // (num_heads // num_kv_heads)
            scores = scale * q[b, h] @ k[b, kv_head].T + bias[b, h]
            scores = np.where(allowed[b, h], scores, NEG_INF)
            for i in range(num_row_tiles):
                rows = range(i * br, min((i + 1) * br, query_len))  # rows past Lq do not exist
                running_max = {r: NEG_INF for r in rows}  # m[r, j]: max of m̃ over earlier tiles
                kept_cols = []
                for j in range(num_col_tiles):
                    cols = slice(j * bc, (j + 1) * bc)
                    votes_skip = []
                    for r in rows:
                        tile_max = scores[r, cols].max()  # m̃[r, j], −inf if all masked
                        if tile_max == NEG_INF:
                            votes_skip.append(True)
                        elif running_max[r] == NEG_INF:
                            votes_skip.append(False)
                        else:
                            votes_skip.append(tile_max - running_max[r] < log_lam)
                        running_max[r] = max(running_max[r], tile_max)
                    valid[b, h, i, j] = any(allowed[b, h, r, cols].any() for r in rows)
                    skipped[b, h, i, j] = lam > 0 and all(votes_skip)  # λ = 0 never skips
                    if not skipped[b, h, i, j]:
                        kept_cols.extend(range(kv_len)[cols])
                for r in rows:
                    row_scores = scores[r, kept_cols]
                    if not np.isfinite(row_scores).any():
                        continue  # nothing unmasked in the kept tiles: the row stays 0
                    weights = np.exp(row_scores - row_scores.max())
                    out[b, h, r] = weights @ v[b, kv_head, kept_cols] / weights.sum()
    return BruteForceResult(out, skipped, valid)
