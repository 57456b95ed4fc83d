"""Triton prefill kernel of skip-softmax attention: flash-attention forward with a per-tile skip vote.

One program owns query tile i = rows ``[i·BLOCK_M, (i+1)·BLOCK_M)`` of one (batch, query head) and walks
the key tiles left to right (BLOCK_M = br, BLOCK_N = bc, so every decision is exactly one (br, bc) tile of
SPEC §4). Scores live in exp2 space (``qk · scale · log2 e``), so the vote compares tile gaps with log2 λ::

          key tiles →        full tiles: no causal mask       diagonal tiles: causal + length mask
        ┌────┬────┬────┬────┬────┐
   i    │full│full│full│diag│ ·  │   · = never visited (causally empty: not valid, skipped, no work)
        └────┴────┴────┴────┴────┘
              per visited tile:  qk → row max m̃ → gap = m̃ − m → vote over existing rows
                                 skip: m ← max(m, m̃), acc and l rescaled; no exp, no P·V (no V load
                                 when SKIP_V_LOAD)        keep: the usual online-softmax step

The same kernel counts (COUNT_MODE 1: the state's λ; 2: a vector of trial λ, the calibration's measuring
mode, while the output still follows the state's λ). λ is read from the (2, 14) threshold state in the kernel, never a constexpr:
each program picks at run time between the voting loop and a branch-free dense loop (λ = 0, and at most
a count of valid tiles without an explicit mask), because the data-dependent skip branch costs the dense
path ~16 % on H200 (the pipeliner cannot overlap across it). On Hopper, K and V tiles come through tensor
descriptors (TMA) when D is a power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl


STATE_COLUMNS = tl.constexpr(14)  # ops/threshold.py: STATE_SHAPE[1]
OFFSET = tl.constexpr(6)  # the first of the 8 knots of o(L), at log2 L = FIRST_KNOT … FIRST_KNOT + 7
OFFSET_KNOTS = tl.constexpr(8)
FIRST_KNOT = tl.constexpr(10)


@triton.jit
def log2_threshold(state_ptr, phase, kv_len):
    """log2 λ of one phase from the (2, 14) state (ops/threshold.py): ENABLED·(a > 0 ? a·exp(b·S + o(Lk))/Lk^p :
    THRESHOLD); −inf = never skip. o(Lk) interpolates the state's knots linearly in log2 Lk (``length_offset``)."""
    row = state_ptr + phase * STATE_COLUMNS
    enabled = tl.load(row + 0).to(tl.float32)
    fixed = tl.load(row + 1).to(tl.float32)
    a = tl.load(row + 2).to(tl.float32)
    b = tl.load(row + 3).to(tl.float32)
    target = tl.load(row + 4).to(tl.float32)
    exponent = tl.load(row + 5).to(tl.float32)
    length = kv_len * 1.0
    knot = tl.minimum(tl.maximum(tl.log2(length) - FIRST_KNOT, 0.0), OFFSET_KNOTS - 1.0)
    i = tl.minimum(knot.to(tl.int32), OFFSET_KNOTS - 2)
    below = tl.load(row + OFFSET + i).to(tl.float32)
    offset = below + (knot - i) * (tl.load(row + OFFSET + i + 1).to(tl.float32) - below)
    length_term = tl.where(exponent == 1.0, length, tl.exp2(exponent * tl.log2(length)))  # exact for the 1/L law
    law = a * tl.exp(b * target + offset) / length_term
    lam = tl.where(a > 0, law, fixed) * enabled
    return tl.log2(lam)


@triton.jit
def row_gap(m_tile, m_before):
    """Each row's m̃ − m (SPEC §4): m̃ = −inf → −inf (votes skip); m = −inf with finite m̃ → +inf (keeps)."""
    return tl.where(m_tile == float("-inf"), float("-inf"),
                    tl.where(m_before == float("-inf"), float("inf"), m_tile - m_before))


@triton.jit
def tile_vote(m_tile, m_i, row_ok):
    """max over existing rows of m̃ − m: the tile is skipped iff this is below log2 λ."""
    gap = tl.where(row_ok, row_gap(m_tile, m_i), float("-inf"))  # rows past Lq never block a skip
    return tl.max(gap, 0)


@triton.jit
def _load_v(v_base, v_desc, start_n, offs_n, offs_dv, n_ok, dv_ok, stride_vn, USE_TMA: tl.constexpr):
    if USE_TMA:
        return v_desc.load([start_n, 0])
    return tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, n_valid, counts,
    q, k_base, v_base, k_desc, v_desc, mask_base, kinds_base, dec_base,
    offs_m, offs_d, offs_dv, row_ok, lo, hi,
    kv_len, causal_off, qk_scale, log_lam2, trials2,
    stride_kn, stride_vn, stride_mm, stride_mn, mask_min,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DIAGONAL: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, COUNT_MODE: tl.constexpr, VOTE: tl.constexpr,
    SKIP_V_LOAD: tl.constexpr, DEBUG: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Key tiles [lo, hi): the inner loop. DIAGONAL tiles apply the Lk-boundary (and causal) masks."""
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < VALUE_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_len
        # -- explicit mask: its per-tile summary says empty (0), partial (1) or all-attend (2) --
        kind = 2
        if MASK_KIND != 0:
            kind = tl.load(kinds_base + start_n // BLOCK_N)
        if kind != 0:
            # -- compute qk (exp2 space) --
            if USE_TMA:
                k = k_desc.load([start_n, 0])
            else:
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if not SKIP_V_LOAD:
                v = _load_v(v_base, v_desc, start_n, offs_n, offs_dv, n_ok, dv_ok, stride_vn, USE_TMA)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if DIAGONAL:
                allowed = n_ok[None, :]
                if IS_CAUSAL:
                    allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + causal_off)
                qk = tl.where(allowed, qk, float("-inf"))
            if MASK_KIND != 0:
                partial = (offs_m[:, None] * 0 + offs_n[None, :] * 0 + kind) == 1  # broadcast first (interpreter)
                mask_ptrs = mask_base + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn
                in_bounds = row_ok[:, None] & n_ok[None, :]
                if MASK_KIND == 1:  # bool, stored as uint8: nonzero = attend
                    attend = tl.load(mask_ptrs, mask=in_bounds & partial, other=1) != 0
                    qk = tl.where(attend, qk, float("-inf"))
                else:  # additive: <= the dtype's finfo.min means masked, other values add to the score
                    bias = tl.load(mask_ptrs, mask=in_bounds & partial, other=0.0).to(tl.float32)
                    qk = tl.where(bias > mask_min, qk + bias * 1.4426950408889634, float("-inf"))

            m_tile = tl.max(qk, 1)
            m_new = tl.maximum(m_i, m_tile)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            if VOTE:
                # -- vote: every existing row's gap below log2 λ skips the tile --
                tile_gap = tile_vote(m_tile, m_i, row_ok)
                valid = tile_gap > float("-inf")
                keep = valid & (tile_gap >= log_lam2)
                if COUNT_MODE != 0:
                    n_valid += valid.to(tl.int32)
                    counts += (tile_gap < trials2).to(tl.int32) * valid.to(tl.int32)
                if DEBUG:
                    tl.store(dec_base + start_n // BLOCK_N, keep.to(tl.int8))
                # -- online softmax; the running max moves on skipped tiles too (exact rescale) --
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                if keep:
                    p = tl.math.exp2(qk - m_safe[:, None])
                    l_i += tl.sum(p, 1)
                    if SKIP_V_LOAD:
                        v = _load_v(v_base, v_desc, start_n, offs_n, offs_dv, n_ok, dv_ok, stride_vn, USE_TMA)
                    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            else:
                # -- λ = 0 and nothing to count: the plain flash-attention step, no branch to pipeline around --
                if DEBUG:
                    tl.store(dec_base + start_n // BLOCK_N, (tile_vote(m_tile, m_i, row_ok) > float("-inf")).to(tl.int8))
                p = tl.math.exp2(qk - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if SKIP_V_LOAD:
                    v = _load_v(v_base, v_desc, start_n, offs_n, offs_dv, n_ok, dv_ok, stride_vn, USE_TMA)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
    return acc, l_i, m_i, n_valid, counts


@triton.jit
def _attend_range(
    acc, l_i, m_i, n_valid, counts, q, k_base, v_base, k_desc, v_desc, mask_base, kinds_base, dec_base,
    offs_m, offs_d, offs_dv, row_ok, full_hi, hi, kv_len, causal_off, qk_scale, log_lam2, trials2,
    stride_kn, stride_vn, stride_mm, stride_mn, mask_min,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, COUNT_MODE: tl.constexpr, VOTE: tl.constexpr, SKIP_V_LOAD: tl.constexpr,
    DEBUG: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Full tiles [0, full_hi) without causal/length masks, then diagonal tiles [full_hi, hi) with them."""
    acc, l_i, m_i, n_valid, counts = _attend_tiles(
        acc, l_i, m_i, n_valid, counts, q, k_base, v_base, k_desc, v_desc, mask_base, kinds_base, dec_base,
        offs_m, offs_d, offs_dv, row_ok, 0, full_hi, kv_len, causal_off, qk_scale, log_lam2, trials2,
        stride_kn, stride_vn, stride_mm, stride_mn, mask_min,
        HEAD_DIM, VALUE_DIM, BLOCK_N, False, IS_CAUSAL, MASK_KIND, COUNT_MODE, VOTE, SKIP_V_LOAD, DEBUG, DOT_PRECISION,
        USE_TMA,
    )
    return _attend_tiles(
        acc, l_i, m_i, n_valid, counts, q, k_base, v_base, k_desc, v_desc, mask_base, kinds_base, dec_base,
        offs_m, offs_d, offs_dv, row_ok, full_hi, hi, kv_len, causal_off, qk_scale, log_lam2, trials2,
        stride_kn, stride_vn, stride_mm, stride_mn, mask_min,
        HEAD_DIM, VALUE_DIM, BLOCK_N, True, IS_CAUSAL, MASK_KIND, COUNT_MODE, VOTE, SKIP_V_LOAD, DEBUG, DOT_PRECISION,
        USE_TMA,
    )


@triton.jit
def prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, mask_ptr, kinds_ptr, state_ptr, trials_ptr, stats_ptr, dec_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_cb, stride_ch, stride_ci,
    stride_db, stride_dh, stride_di,
    num_heads, group, q_len, kv_len, scale, mask_min, phase, num_trials, stats_cols,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, COUNT_MODE: tl.constexpr,
    SKIP_V_LOAD: tl.constexpr, DEBUG: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B·Hq): the heaviest (last) causal query tiles start first."""
    tile_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)  # 64-bit offsets: B·H·L·D passes 2^31 at long context
    h = (bh % num_heads).to(tl.int64)
    h_kv = h // group  # GQA: never a repeat of K/V
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < q_len

    # -- this call's λ (log2) and the thresholds the counters compare against --
    log_lam2 = log2_threshold(state_ptr, phase, kv_len)
    offs_t = tl.arange(0, T_PAD)
    if COUNT_MODE == 2:  # measuring: count every trial λ (the output still follows the state's λ)
        trials2 = tl.load(trials_ptr + offs_t, mask=offs_t < num_trials, other=float("-inf"))
    else:
        trials2 = tl.where(offs_t == 0, log_lam2, float("-inf"))

    # -- load the query tile; fold scale and 1/ln 2 into one multiplier --
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    qk_scale = scale * 1.4426950408889634  # 1/ln 2
    k_base = k_ptr + b * stride_kb + h_kv * stride_kh
    v_base = v_ptr + b * stride_vb + h_kv * stride_vh
    k_desc = k_base
    v_desc = v_base
    if USE_TMA:  # bulk tensor copies; rows past Lk and columns past D read as zeros
        k_desc = tl.make_tensor_descriptor(k_base, shape=[kv_len, HEAD_DIM], strides=[stride_kn, 1], block_shape=[BLOCK_N, D_PAD])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[kv_len, VALUE_DIM], strides=[stride_vn, 1], block_shape=[BLOCK_N, DV_PAD])
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    kinds_base = kinds_ptr + b * stride_cb + h * stride_ch + tile_m * stride_ci
    dec_base = dec_ptr + b * stride_db + h * stride_dh + tile_m * stride_di

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    n_valid = tl.zeros([], tl.int32)
    counts = tl.zeros([T_PAD], tl.int32)

    # -- split the key range: full tiles need no causal/length mask, diagonal tiles do --
    causal_off = kv_len - q_len  # bottom-right aligned: key c visible to row r iff c <= r + causal_off
    if IS_CAUSAL:
        first_row = tile_m * BLOCK_M
        last_row = tl.minimum(first_row + BLOCK_M, q_len) - 1
        full_hi = tl.maximum(first_row + causal_off + 1, 0) // BLOCK_N * BLOCK_N
        full_hi = tl.minimum(full_hi, kv_len // BLOCK_N * BLOCK_N)
        hi = tl.minimum(tl.cdiv(tl.maximum(last_row + causal_off + 1, 0), BLOCK_N), tl.cdiv(kv_len, BLOCK_N)) * BLOCK_N
        hi = tl.maximum(hi, full_hi)
    else:
        full_hi = kv_len // BLOCK_N * BLOCK_N
        hi = tl.cdiv(kv_len, BLOCK_N) * BLOCK_N
    # -- one compiled kernel, two loops: the vote is only paid for when λ > 0 or a count needs it. Counting at
    #    λ = 0 without an explicit mask needs no vote: nothing is skipped, and every tile the loop visits
    #    holds a key the tile's last row sees, so the valid tiles are the visited ones --
    COUNT_NEEDS_VOTE: tl.constexpr = (COUNT_MODE == 2) or (COUNT_MODE == 1 and MASK_KIND != 0)
    if COUNT_NEEDS_VOTE | (log_lam2 > float("-inf")):
        acc, l_i, m_i, n_valid, counts = _attend_range(
            acc, l_i, m_i, n_valid, counts, q, k_base, v_base, k_desc, v_desc, mask_base, kinds_base, dec_base,
            offs_m, offs_d, offs_dv, row_ok, full_hi, hi, kv_len, causal_off, qk_scale, log_lam2, trials2,
            stride_kn, stride_vn, stride_mm, stride_mn, mask_min,
            HEAD_DIM, VALUE_DIM, BLOCK_N, IS_CAUSAL, MASK_KIND, COUNT_MODE, True, SKIP_V_LOAD, DEBUG, DOT_PRECISION, USE_TMA,
        )
    else:
        acc, l_i, m_i, n_valid, counts = _attend_range(
            acc, l_i, m_i, n_valid, counts, q, k_base, v_base, k_desc, v_desc, mask_base, kinds_base, dec_base,
            offs_m, offs_d, offs_dv, row_ok, full_hi, hi, kv_len, causal_off, qk_scale, log_lam2, trials2,
            stride_kn, stride_vn, stride_mm, stride_mn, mask_min,
            HEAD_DIM, VALUE_DIM, BLOCK_N, IS_CAUSAL, MASK_KIND, COUNT_MODE, False, SKIP_V_LOAD, DEBUG, DOT_PRECISION, USE_TMA,
        )
        n_valid = tl.zeros([], tl.int32) + hi // BLOCK_N

    # -- epilogue: rows with nothing unmasked output 0 --
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = tl.where((l_i > 0)[:, None], out, 0.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (offs_dv[None, :] < VALUE_DIM),
    )
    if COUNT_MODE != 0:
        stats_row = stats_ptr + phase * stats_cols
        tl.atomic_add(stats_row, n_valid.to(tl.int64))
        tl.atomic_add(stats_row + 1 + offs_t, counts.to(tl.int64), mask=offs_t < num_trials)
