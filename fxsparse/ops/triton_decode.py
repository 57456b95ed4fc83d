"""Triton split-K kernels for short queries: decode (Lq = 1) and small Lq (speculative or chunked steps).

A query of Lq ≤ br rows is one query tile per head (SPEC §4), so each head votes over its own Lq rows. The
G = Hq/Hkv query heads of one KV head and their Lq positions are packed as the rows of one program (row
ρ = g·BLOCK_T + t), so one K/V read serves them all; a head's skipped tile is masked out of that head's rows
only, and V is read only for tiles some head keeps.

The vote needs m = max over *all* earlier key tiles, which a split of the KV range does not see, so the
kernels run in three launches (scores are Lq·Lk values per head, small beside K and V)::

    1. scores:  per split, s = q·kᵀ (exp2 space) → scratch, and the row max m̃ of every key tile. For
                16-bit inputs the scratch holds s − m̃ in fp16 (≤ 0, so 11 bits of mantissa where exp2 is
                not negligible; bf16 outputs stay within their own rounding) at half the bytes
    2. attend:  per split, m = max of m̃ over earlier tiles (a short prefix scan), then two loops:
                  decide  the split's tiles DECIDE_CHUNK at a time ([rows, chunk] maxima, a prefix
                          max within the chunk): each head's vote (max of its rows' gaps) → keep_heads,
                          the tiles some head keeps → a compacted kept list; per row m_ref = max of m̃
                          over the tiles its head keeps
                  attend  the kept list only: p = exp2(s − m_ref) where the row's head keeps the tile,
                          else 0; V load; P·V. Partial (acc, l, m_ref) per split
    3. combine: rescale the partials to one max and normalise (empty rows → 0)

Why decide first: with the vote inside the P·V loop, the V load sat behind a data-dependent ``if`` and
the loop carried an online-softmax rescale, and Triton's software pipeliner gave up on it. Deciding
first fixes each row's reference max before the second loop, so that loop has no branch and no rescale
(p ≤ 1, and l ≥ 1 for a row that keeps anything), and the pipeliner overlaps the V loads of the next
kept tiles with this one's P·V.

On sm_90 and later the attend and combine kernels are launched as programmatic dependents
(``launch_pdl``): their programs take multiprocessors as the kernel before drains and wait in
``gdc_wait`` for its writes, which hides a launch gap and the ramp of each wave (H200, B = 1: 5 %).
A fourth kernel that decides apart from the attend loop, and an attend loop over every tile of the split
with predicated V loads in place of the kept list, were both slower; TMA copies of the K and V tiles were no
faster (bench/RESULTS.md, "Thirteenth session").
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .triton_prefill import log2_threshold, row_gap


@triton.jit
def packed_rows(group, query_len, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    """Row ρ of a program → (query head within the group, query position, whether the row exists)."""
    offs_r = tl.arange(0, BLOCK_G * BLOCK_T)
    g = offs_r // BLOCK_T
    t = offs_r % BLOCK_T
    return g, t, (g < group) & (t < query_len)


@triton.jit
def per_head(x, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr):
    """[rows, CHUNK] → [BLOCK_G, CHUNK]: the max over each head's BLOCK_T rows."""
    return tl.max(tl.reshape(x, [BLOCK_G, BLOCK_T, CHUNK]), 1)


@triton.jit
def to_rows(x, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr):
    """[BLOCK_G, CHUNK] → [rows, CHUNK]: each head's value repeated on its BLOCK_T rows."""
    return tl.reshape(tl.broadcast_to(tl.expand_dims(x, 1), [BLOCK_G, BLOCK_T, CHUNK]), [BLOCK_G * BLOCK_T, CHUNK])


@triton.jit
def decode_scores_kernel(
    q_ptr, k_ptr, mask_ptr, scores_ptr, tile_max_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kn, stride_mb, stride_mh, stride_mt, stride_mn,
    stride_sb, stride_sh, stride_st, stride_tb, stride_th, stride_tt,
    num_kv_heads, group, query_len, kv_len, tiles_per_split, num_tiles, scale, mask_min,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr, SCORES_FP16: tl.constexpr,
):
    """Grid (splits, B·Hkv): scores and per-tile row maxima of the packed (query head, position) rows."""
    if PDL:  # the attend kernel may take free multiprocessors once every program here has started
        gdc_launch_dependents()
    split = tl.program_id(0)
    b = (tl.program_id(1) // num_kv_heads).to(tl.int64)  # 64-bit offsets: B·Hkv·Lk·D passes 2^31
    h_kv = (tl.program_id(1) % num_kv_heads).to(tl.int64)
    g, t, row_ok = packed_rows(group, query_len, BLOCK_G, BLOCK_T)
    heads = h_kv * group + g
    offs_d = tl.arange(0, D_PAD)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    qk_scale = scale * 1.4426950408889634  # 1/ln 2
    causal_off = kv_len - query_len  # bottom-right aligned: key c visible to row t iff c <= t + causal_off
    k_base = k_ptr + b * stride_kb + h_kv * stride_kh
    row_scores = scores_ptr + b * stride_sb + heads[:, None] * stride_sh + t[:, None] * stride_st
    row_tile_max = tile_max_ptr + b * stride_tb + heads * stride_th + t * stride_tt
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_len
        attend = row_ok[:, None] & n_ok[None, :]
        if IS_CAUSAL:
            attend = attend & (offs_n[None, :] <= t[:, None] + causal_off)
        # -- explicit mask rows (per-sequence KV lengths arrive this way) --
        if MASK_KIND != 0:
            mask_ptrs = (mask_ptr + b * stride_mb + heads[:, None] * stride_mh + t[:, None] * stride_mt
                         + offs_n[None, :] * stride_mn)
            if MASK_KIND == 1:
                attend = attend & (tl.load(mask_ptrs, mask=attend, other=0) != 0)
                bias = tl.zeros([BLOCK_G * BLOCK_T, BLOCK_N], tl.float32)
            else:
                bias = tl.load(mask_ptrs, mask=attend, other=float("-inf")).to(tl.float32)
                attend = attend & (bias > mask_min)
        # -- compute qk; keys no row attends are not read (a predicated load, not a branch, so the
        #    pipeliner still prefetches: a padded sequence's masked tail costs no K bytes) --
        key_live = n_ok
        store_ok = row_ok[:, None] & n_ok[None, :]
        if MASK_KIND != 0:
            key_live = tl.max(attend.to(tl.int32), 0) > 0
            tile_live = tl.max(key_live.to(tl.int32), 0) > 0
            store_ok = tl.where(tile_live, store_ok, False)  # a tile nobody attends is never read
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=key_live[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK_KIND == 2:
            qk = qk + bias * 1.4426950408889634
        qk = tl.where(attend, qk, float("-inf"))
        qk_max = tl.max(qk, 1)
        if SCORES_FP16:  # s − m̃ ≤ 0 of the tile: fp16 keeps 11 bits where exp2 is not negligible
            rel = tl.where(qk_max[:, None] == float("-inf"), float("-inf"), qk - qk_max[:, None])
            tl.store(row_scores + offs_n[None, :], rel.to(tl.float16), mask=store_ok)
        else:
            tl.store(row_scores + offs_n[None, :], qk, mask=store_ok)
        tl.store(row_tile_max + tile, qk_max, mask=row_ok)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def decode_attend_kernel(
    v_ptr, scores_ptr, tile_max_ptr, state_ptr, trials_ptr, stats_ptr, dec_ptr, keep_heads_ptr, kept_ptr,
    part_acc_ptr, part_l_ptr, part_m_ptr,
    stride_vb, stride_vh, stride_vn, stride_sb, stride_sh, stride_st, stride_tb, stride_th, stride_tt,
    stride_kb, stride_kh, stride_db, stride_dh, stride_pb, stride_ph, stride_pt, stride_ps,
    num_kv_heads, group, query_len, kv_len, tiles_per_split, num_tiles, phase, num_trials, stats_cols,
    VALUE_DIM: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, PREFIX_CHUNK: tl.constexpr, DECIDE_CHUNK: tl.constexpr, T_PAD: tl.constexpr,
    COUNT_MODE: tl.constexpr, DEBUG: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    SCORES_FP16: tl.constexpr,
):
    """Grid (splits, B·Hkv): per-head votes, then the partial softmax of the kept tiles.

    Scratch: keep_heads int32 (B, Hq, num_tiles), each head's keep flag per tile (int32: 4-byte loads are
    the narrowest the pipeliner copies asynchronously); kept int32 (B·Hkv, num_tiles), per split the
    tiles some head keeps, in order, from the split's first tile on.
    """
    ROWS: tl.constexpr = BLOCK_G * BLOCK_T
    split = tl.program_id(0)
    b = (tl.program_id(1) // num_kv_heads).to(tl.int64)  # 64-bit offsets: B·Hkv·Lk·D passes 2^31
    h_kv = (tl.program_id(1) % num_kv_heads).to(tl.int64)
    g, t, row_ok = packed_rows(group, query_len, BLOCK_G, BLOCK_T)
    heads = h_kv * group + g
    offs_h = tl.arange(0, BLOCK_G)
    head_ok = offs_h < group
    offs_dv = tl.arange(0, DV_PAD)
    row_scores = scores_ptr + b * stride_sb + heads[:, None] * stride_sh + t[:, None] * stride_st
    row_tile_max = tile_max_ptr + b * stride_tb + heads * stride_th + t * stride_tt
    head_keep = keep_heads_ptr + b * stride_kb + (h_kv * group + offs_h) * stride_kh
    row_keep = keep_heads_ptr + b * stride_kb + heads * stride_kh
    v_base = v_ptr + b * stride_vb + h_kv * stride_vh

    log_lam2 = log2_threshold(state_ptr, phase, kv_len)
    offs_trial = tl.arange(0, T_PAD)
    if COUNT_MODE == 2:  # measuring: count every trial λ (the output still follows the state's λ)
        trials2 = tl.load(trials_ptr + offs_trial, mask=offs_trial < num_trials, other=float("-inf"))
    else:
        trials2 = tl.where(offs_trial == 0, log_lam2, float("-inf"))
    if PDL:  # launched while the scores kernel drains: wait here for its writes
        gdc_wait()
        gdc_launch_dependents()

    # -- m over the tiles of earlier splits: a short scan of their row maxima --
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    for chunk in range(0, tile_lo, PREFIX_CHUNK):
        offs_c = chunk + tl.arange(0, PREFIX_CHUNK)
        prev = tl.load(row_tile_max[:, None] + offs_c[None, :], mask=row_ok[:, None] & (offs_c[None, :] < tile_lo), other=float("-inf"))
        m_i = tl.maximum(m_i, tl.max(prev, 1))
    # (keep m_i's use after this loop single: Triton 3.6 asserts that when it makes this max thread-local)

    # -- decide, DECIDE_CHUNK tiles at a time: votes from the tile maxima alone; keep flags per head, kept
    #    tiles compacted. Vectorised over the chunk (a prefix max within it) because a tile-by-tile loop
    #    is a chain of dependent small loads that delays the first V load of the split --
    kept_base = kept_ptr + tl.program_id(1).to(tl.int64) * num_tiles + tile_lo
    m_ref = tl.full([ROWS], float("-inf"), tl.float32)  # per row: max of m̃ over the tiles its head keeps
    n_kept = tl.zeros([], tl.int32)
    n_valid = tl.zeros([], tl.int32)
    counts = tl.zeros([T_PAD], tl.int32)
    for chunk in range(tile_lo, tile_hi, DECIDE_CHUNK):
        offs_c = chunk + tl.arange(0, DECIDE_CHUNK)
        c_ok = offs_c < tile_hi
        in_chunk = row_ok[:, None] & c_ok[None, :]
        m_tiles = tl.load(row_tile_max[:, None] + offs_c[None, :], mask=in_chunk, other=float("-inf"))
        # m before each tile: the running max carried in, then the chunk's earlier tiles as an exclusive
        # prefix max (a scan over the maxima shifted by one tile)
        earlier = tl.load(row_tile_max[:, None] + offs_c[None, :] - 1, mask=in_chunk & (offs_c > chunk)[None, :],
                          other=float("-inf"))
        m_before = tl.maximum(m_i[:, None], tl.associative_scan(earlier, 1, _maximum))
        # each head's tile is skipped iff every existing row of it votes skip (padding rows vote −inf)
        gap = per_head(row_gap(m_tiles, m_before), BLOCK_G, BLOCK_T, DECIDE_CHUNK)
        valid = head_ok[:, None] & c_ok[None, :] & (gap > float("-inf"))
        keep = valid & (gap >= log_lam2)
        if COUNT_MODE != 0:
            n_valid += tl.sum(tl.sum(valid.to(tl.int32), 1), 0)
            below = valid[:, :, None] & (gap[:, :, None] < trials2[None, None, :])
            counts += tl.sum(tl.sum(below.to(tl.int32), 1), 0)
        head_in_chunk = head_ok[:, None] & c_ok[None, :]
        if DEBUG:
            dec = dec_ptr + b * stride_db + (h_kv * group + offs_h)[:, None] * stride_dh + offs_c[None, :]
            tl.store(dec, keep.to(tl.int8), mask=head_in_chunk)
        tl.store(head_keep[:, None] + offs_c[None, :], keep.to(tl.int32), mask=head_in_chunk)
        any_keep = tl.max(keep.to(tl.int32), 0)
        slot = n_kept + tl.cumsum(any_keep, 0) - any_keep  # branch-free append, in tile order
        tl.store(kept_base + slot, offs_c, mask=any_keep > 0)
        n_kept += tl.sum(any_keep, 0)
        keep_rows = to_rows(keep, BLOCK_G, BLOCK_T, DECIDE_CHUNK)
        m_ref = tl.maximum(m_ref, tl.max(tl.where(keep_rows, m_tiles, float("-inf")), 1))
        m_i = tl.maximum(m_i, tl.max(m_tiles, 1))  # skipped tiles move the running max too (SPEC §4's m)
    tl.debug_barrier()  # the CTA's keep flags and kept list are visible to all its threads

    # -- attend: the kept tiles only; m_ref is fixed, so no rescale and no branch --
    m_safe = tl.where(m_ref == float("-inf"), 0.0, m_ref)
    l_tile = tl.zeros([ROWS, BLOCK_N], tl.float32)  # row sums taken once, after the loop
    acc = tl.zeros([ROWS, DV_PAD], tl.float32)
    # The kept list is read one trip ahead: no address in a trip then depends on a load of the same trip,
    # so the pipeliner issues the flag, score and V loads num_stages − 1 trips ahead (an index loaded in
    # the trip would halve that depth).
    tile = tl.load(kept_base, mask=n_kept > 0, other=0)
    for idx in range(0, n_kept):
        next_tile = tl.load(kept_base + idx + 1, mask=idx + 1 < n_kept, other=0)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_len
        keeps = tl.load(row_keep + tile, mask=row_ok, other=0) != 0
        s = tl.load(row_scores + offs_n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=float("-inf"))
        if SCORES_FP16:
            s = s.to(tl.float32) + tl.load(row_tile_max + tile, mask=row_ok, other=0.0)[:, None]
        p = tl.where(keeps[:, None], tl.math.exp2(s - m_safe[:, None]), 0.0)
        l_tile += p
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=n_ok[:, None] & (offs_dv[None, :] < VALUE_DIM), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        tile = next_tile
    l_i = tl.sum(l_tile, 1)

    # -- partial result of this split, relative to its own reference max --
    part = b * stride_pb + heads * stride_ph + t * stride_pt + split * stride_ps
    tl.store(part_acc_ptr + part[:, None] * DV_PAD + offs_dv[None, :], acc, mask=row_ok[:, None])
    tl.store(part_l_ptr + part, l_i, mask=row_ok)
    # −inf: this row keeps nothing in this split (a kept row has l ≥ 1; m_ref is used once after its loop,
    # as Triton 3.6's thread-locality pass requires)
    tl.store(part_m_ptr + part, tl.where(l_i > 0, m_safe, float("-inf")), mask=row_ok)
    if COUNT_MODE != 0:
        stats_row = stats_ptr + phase * stats_cols
        tl.atomic_add(stats_row, n_valid.to(tl.int64))
        tl.atomic_add(stats_row + 1 + offs_trial, counts.to(tl.int64), mask=offs_trial < num_trials)


@triton.jit
def decode_combine_kernel(
    part_acc_ptr, part_l_ptr, part_m_ptr, out_ptr,
    stride_pr, stride_ps, stride_or,
    num_splits,
    VALUE_DIM: tl.constexpr, DV_PAD: tl.constexpr, S_PAD: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (B·Hq·Lq,): out = Σ_s 2^(m_s − M)·acc_s / Σ_s 2^(m_s − M)·l_s, 0 for rows that attend nothing."""
    if PDL:
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    s_ok = offs_s < num_splits
    part = row * stride_pr + offs_s * stride_ps
    m = tl.load(part_m_ptr + part, mask=s_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * DV_PAD + offs_dv[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_max))
    den = tl.sum(w * l, 0)
    num = tl.sum(w[:, None] * acc, 0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(out_ptr + row * stride_or + offs_dv, out.to(out_ptr.dtype.element_ty), mask=offs_dv < VALUE_DIM)
