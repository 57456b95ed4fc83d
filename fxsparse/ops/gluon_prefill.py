"""Hopper prefill kernel of skip-softmax attention in Gluon: the vote inside an explicitly pipelined loop.

Why a second prefill kernel: in ``triton_prefill.py`` the data-dependent ``if keep:`` around exp / V load /
P·V stops Triton's software pipeliner, so the voting loop runs each tile's two matmuls back to back with
nothing overlapping them (bench/RESULTS.md). Gluon hands the schedule to us: every wgmma is asynchronous
and we say when to wait, so the skip branch no longer decides what overlaps. Iteration j starts with tile j
voted (its V on the way if it is kept) and S_{j+1} = Q·K_{j+1}ᵀ in flight::

    tile j kept:     P_j = exp2(S_j·scale − m)   ‖ S_{j+1} runs
                     wait S_{j+1}; queue O·α + P_j·V_j
                     vote on tile j + 1         ‖ P_j·V_j runs
                     wait P_j·V_j; queue S_{j+2}
    tile j skipped:  wait S_{j+1}; queue S_{j+2}
                     vote on tile j + 1         ‖ S_{j+2} runs
    then: refill K_{j+1}'s ring slot; fetch V_{j+1} only if tile j + 1 is kept; wait for K_{j+3}

So a run of skipped tiles keeps the tensor cores on back-to-back QKᵀ products, and O's rescale waits for the
next kept tile (a skipped tile moves the running max only when λ > 1). That is the source's order; in the SASS
(ptxas of Triton 3.6) the wait for S_{j+1} rises above P_j's exps in three of the loop's four kept paths, so a kept
tile mostly runs S_{j+1}, then P_j, then P_j·V_j. Queueing P_j·V_j before that wait makes that overlap real and
changes nothing measurable (time, clock, energy per call): the two warpgroups already overlap each other's products
with their own exps (bench/RESULTS.md, eighth and twelfth sessions). Between one product's wait and the
next one's queueing nothing else runs: K is awaited a step ahead (Triton's CTA barrier before an mbarrier
wait then falls while a product runs), and the loop takes two steps a turn, so that the scores voted on and
the product in flight trade registers instead of copying S. The vote itself takes one warp vote and one
CTA barrier (``_any_at_least``) over each thread's own maxima (``_quad_row_max``); the row maxima the next P needs
are two shuffle rounds off the vote's path. The loop is compiled twice, picked at run time
from λ: at λ = 0 (and not counting) the vote's block-wide reduction is left out and every visited tile is kept.
K comes through a ring of TMA buffers, V into two alternating buffers, all copies through the host's 4-D
descriptors (``launch``); O leaves through Q's buffer by one TMA store. One program owns query tile i (BLOCK_M =
br rows, two warpgroups of 64 rows) of one (batch, query head); λ, the skip rule, the masks it handles (causal,
lengths) and the statistics are those of ``triton_prefill.py`` (SPEC §4). Explicit masks, the measuring
mode's trial grid, fp32 and other head dims or tile shapes stay on the Triton kernel (``triton_attention._gluon_ok``).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .triton_prefill import log2_threshold

K_STAGES = gl.constexpr(4)  # K tiles in flight: a run of skipped tiles takes one every ~QKᵀ; 224 KiB with Q and V's
V_BUFFERS = gl.constexpr(2)  # V of the i-th kept tile sits in buffer i % V_BUFFERS


def launch(q, k, v, out, is_causal, scale, block_m, block_n, state, count_mode, stats_cols, stats, decisions_out):
    """Run the kernel on (B, Hq, Lq, D) q and (B, Hkv, Lk, D) k, v into out; ``triton_attention`` checks the case.

    Q, K, V and O go through the host's TMA descriptors, [B, H, L, D] as they are (any strides TMA takes), one
    box = one (batch, head)'s block_m or block_n rows. Built once per call: a descriptor built in the kernel costs
    every program a global write and two proxy fences before its first load."""
    from .threshold import phase_of  # here, not at the top: bench/aot_compile.py loads this file without torch

    dtype = getattr(gl, str(q.dtype).removeprefix("torch."))  # float16 or bfloat16

    def descriptor(t, rows):
        box = [1, 1, rows, t.shape[-1]]
        return TensorDescriptor.from_tensor(t, box, gl.NVMMASharedLayout.get_default_for(box, dtype))

    batch, num_heads, query_len, head_dim = q.shape
    dummy = q.new_empty(1)
    dec = decisions_out if decisions_out is not None else dummy
    gluon_prefill_kernel[(-(-query_len // block_m), batch * num_heads)](
        descriptor(q, block_m), descriptor(k, block_n), descriptor(v, block_n), descriptor(out, block_m),
        state, stats if stats is not None else dummy, dec,
        *(dec.stride()[:3] if decisions_out is not None else (0, 0, 0)),
        num_heads, num_heads // k.shape[1], query_len, k.shape[2], float(scale), phase_of(query_len), stats_cols,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=bool(is_causal),
        COUNT=count_mode == 1, DEBUG=decisions_out is not None, num_warps=8,
    )


@gluon.jit
def _quad_row_max(s):
    """Each thread's max over its own columns of each of its rows: an [M, 4] tensor whose column is the thread's
    lane in its quad, so a row's max is the max over the quad, two shuffle rounds away. In the wgmma layout column
    bit 0 and bits 3 and up are a thread's registers, bits 1-2 its lane in the quad. The halvings along the
    register bits are a tree: a plain reduction runs one serial chain of 31 FMNMX per row (Nsight Compute, H200)."""
    x = gl.reshape(s, [s.shape[0], 2, 2, 2, 2, s.shape[1] // 32, 2])
    return gl.max(gl.max(gl.max(gl.max(gl.max(x, axis=6), axis=1), axis=1), axis=1), axis=1)


@gluon.jit
def _any_at_least(gap, threshold, vote_smem):
    """Whether any element of ``gap`` (an [M, 4] tensor of ``_quad_row_max``'s layout: two elements a thread, a
    warp's 16 rows in its 32 lanes) is >= ``threshold``, CTA-wide. Each thread tests its two, its warp ORs them in one
    ``vote.any`` (inline PTX: Gluon has no warp vote), the warps' answers meet in shared memory behind one CTA
    barrier. The vote needs only whether some row clears λ, not the largest gap, so no shuffle is on its path: the
    five rounds of a max over the quad and the warp cost a skipped tile 5 % (H200, ``bench/tile_costs.py``)."""
    num_warps: gl.constexpr = gap.shape[0] // 16
    warp_any = gl.inline_asm_elementwise(
        """{ .reg .pred p, q;
        setp.ge.f32 p, $1, $3;
        setp.ge.or.f32 p, $2, $4, p;
        vote.sync.any.pred q, p, -1;
        selp.b32 $0, 0x00010001, 0, q; }""",  # both 16-bit halves of $0: the two elements' (equal) answers
        "=r,r,r,r,r", [gap, gl.full(gap.shape, 0.0, gl.float32, layout=gap.type.layout) + threshold],
        dtype=gl.int16, is_pure=True, pack=2)
    vote_smem.store(warp_any)
    first_of_each_warp = vote_smem.reshape([num_warps, gap.shape[0] * gap.shape[1] // num_warps]).slice(0, 1, dim=1)
    votes = first_of_each_warp.load(gl.BlockedLayout([num_warps, 1], [1, 32], [1, num_warps], [1, 0]))
    return gl.max(gl.max(votes, axis=1), axis=0) > 0


@gluon.jit
def _vote(s, m_i, row_ok, offs_m, start_n, needs_mask, exists, causal_off, kv_len, qk_scale, log_lam2, vote_smem,
          VOTE: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """One key tile's raw scores → (masked raw scores, keep, new running max, α); SPEC §4's vote.

    The running max is in exp2 space; the scores stay raw (the scale is folded into P's exponent, and
    max(s)·c = max(s·c) for c > 0 in floating point too, so the vote is the same). Every tile in [0, hi)
    holds a key that the query tile's last row sees, so it is valid; ``exists`` is False only for tile hi,
    which the key loop may visit past the last. VOTE False (λ = 0, no counting): every tile that exists is
    kept, and the block-wide reduction is left out."""
    if needs_mask:  # the diagonal and the last tile: causal (bottom-right) and Lk masks
        offs_n = start_n + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
        allowed = offs_n[None, :] < kv_len
        if IS_CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + causal_off)
        s = gl.where(allowed, s, float("-inf"))
    quad_max = _quad_row_max(s) * qk_scale
    keep = gl.to_tensor(exists)
    if VOTE:  # a row's gap is the max of its quad's: test each thread's own, the row max can wait
        quad_rows: gl.constexpr = gl.SliceLayout(1, quad_max.type.layout)
        m_q = gl.convert_layout(m_i, quad_rows)[:, None]  # the same rows in each thread: no data moves
        gap = gl.where(quad_max == float("-inf"), float("-inf"),
                       gl.where(m_q == float("-inf"), float("inf"), quad_max - m_q))
        gap = gl.where(gl.convert_layout(row_ok, quad_rows)[:, None], gap, float("-inf"))  # rows past Lq never keep
        keep = exists & _any_at_least(gap, log_lam2, vote_smem)
    m_tile = gl.convert_layout(gl.max(quad_max, axis=1), gl.SliceLayout(1, s.type.layout))  # no data moves
    m_new = gl.maximum(m_i, m_tile)
    alpha = gl.exp2(m_i - gl.where(m_new == float("-inf"), 0.0, m_new))
    return s, keep, m_new, alpha


@gluon.jit
def _probabilities(s, m_i, l_i, qk_scale, P_LAYOUT: gl.constexpr, dtype: gl.constexpr):
    """A kept tile's P = exp2(s·scale − m) in the P·V operand layout, and the row sums added to l."""
    p = gl.exp2(s * qk_scale - gl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
    return gl.convert_layout(p.to(dtype), P_LAYOUT), l_i + gl.sum(p, axis=1)


@gluon.jit
def _await_k(k_bars, j, hi):
    """Wait for K_j's TMA copy, j clamped to the last tile as in ``_queue_scores``. Done a step ahead of the
    product, right after the fetch: Triton puts a CTA barrier before this wait (the fetch wrote the barriers),
    and there it costs nothing, while S_{j-1} still runs."""
    j = gl.minimum(j, hi - 1)
    mbarrier.wait(k_bars.index(j % K_STAGES), (j // K_STAGES) & 1)


@gluon.jit
def _queue_scores(q_smem, k_smem, s_zero, j, hi):
    """Queue S_j = Q·K_jᵀ on the tensor cores (K_j awaited). Past the last tile it queues the last one again (a
    product nobody reads), so that every step hands the next one a product in flight."""
    k_slot = gl.minimum(j, hi - 1) % K_STAGES
    return warpgroup_mma(q_smem, k_smem.index(k_slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)


@gluon.jit
def _copy_rows(desc, b, h, row, bar, dst, pred=True):
    """TMA copy of the rows [row, row + box) of (batch b, head h) through the host's 4-D descriptor ``desc`` into
    the 2-D buffer ``dst`` (the same bytes: the box's two leading dims are 1). Rows past L read as zeros."""
    box = dst._reinterpret(dst.dtype, desc.block_type.shape, desc.layout)
    tma.async_copy_global_to_shared(desc, [b, h, row, 0], bar, box, pred=pred)


@gluon.jit
def _fetch(k_desc, v_desc, kv_b, kv_h, k_smem, v_smem, k_bars, v_bars, j, hi, keep, v_loads, BLOCK_N: gl.constexpr):
    """After tile j's vote: K_j's slot takes tile j + K_STAGES, and V_j is fetched only if tile j is kept (into
    the buffer of the kept tile before last, whose P·V both warpgroups have waited for). Returns the V count.

    One CTA barrier covers both copies: the warpgroups are done with K_j's slot, and the transaction counts are
    armed before either copy. (Arming one barrier and copying right after costs a barrier per copy: Triton's
    shared-memory hazard pass cannot tell the slots of a buffer apart.)"""
    k_slot = j % K_STAGES
    refill = j + K_STAGES < hi
    v_slot = v_loads % V_BUFFERS
    mbarrier.expect(k_bars.index(k_slot), k_desc.block_type.nbytes, pred=refill)
    mbarrier.expect(v_bars.index(v_slot), v_desc.block_type.nbytes, pred=keep)
    gl.thread_barrier()
    _copy_rows(k_desc, kv_b, kv_h, (j + K_STAGES) * BLOCK_N, k_bars.index(k_slot), k_smem.index(k_slot), pred=refill)
    _copy_rows(v_desc, kv_b, kv_h, j * BLOCK_N, v_bars.index(v_slot), v_smem.index(v_slot), pred=keep)
    return v_loads + keep.to(gl.int32)


@gluon.jit
def _accumulate(o, o_alpha, p, v_smem, v_bars, v_loads):
    """O·α + P·V, queued once the last requested V tile has landed; returns its token."""
    o = o * o_alpha[:, None]
    v_slot = (v_loads - 1) % V_BUFFERS
    mbarrier.wait(v_bars.index(v_slot), ((v_loads - 1) // V_BUFFERS) & 1)
    return warpgroup_mma(p, v_smem.index(v_slot), o, is_async=True)


@gluon.jit
def _next_tile(j, s, s_token, keep, m_i, alpha, l_i, o, o_alpha, v_loads, q_smem, k_smem, v_smem, vote_smem,
               vote_skip_smem, k_bars, v_bars, k_desc, v_desc, kv_b, kv_h, s_zero, row_ok, offs_m, dec_row, hi, full_hi,
               causal_off, kv_len, qk_scale, log_lam2, p_layout: gl.constexpr, mma_o: gl.constexpr, VOTE: gl.constexpr,
               IS_CAUSAL: gl.constexpr, DEBUG: gl.constexpr, BLOCK_N: gl.constexpr):
    """One step of the key loop: finish tile j (voted, S_{j+1} in flight) and vote on tile j + 1, leaving S_{j+2}
    in flight. Tile j + 1 may be tile hi, one past the last: it does not exist, so it is not kept."""
    dtype: gl.constexpr = q_smem.dtype
    nxt = j + 1
    l_i = l_i * alpha  # the running max moves on skipped tiles too when λ > 1 (exact rescale)
    o_alpha = o_alpha * gl.convert_layout(alpha, gl.SliceLayout(1, mma_o))
    kept = keep
    if kept:  # P_j while S_{j+1} runs, then P_j·V_j while tile j + 1 votes
        p, l_i = _probabilities(s, m_i, l_i, qk_scale, p_layout, dtype)
        s = warpgroup_mma_wait(0, deps=(s_token,))
        o_token = _accumulate(o, o_alpha, p, v_smem, v_bars, v_loads)
        o_alpha = gl.full_like(o_alpha, 1.0)
        s, keep, m_i, alpha = _vote(s, m_i, row_ok, offs_m, nxt * BLOCK_N, nxt >= full_hi, nxt < hi, causal_off,
                                    kv_len, qk_scale, log_lam2, vote_smem, VOTE, IS_CAUSAL)
        o, p = warpgroup_mma_wait(0, deps=(o_token, p))  # P's registers stay live until the product is done
    else:
        s = warpgroup_mma_wait(0, deps=(s_token,))
    # S_{j+2} is queued at this one point on both paths: a product in flight must not pass an if/else join
    # (ptxas then serialises every wgmma)
    s_token = _queue_scores(q_smem, k_smem, s_zero, nxt + 1, hi)
    if not kept:  # tile j + 1 votes while S_{j+2} runs: a run of skipped tiles keeps the tensor cores busy
        s, keep, m_i, alpha = _vote(s, m_i, row_ok, offs_m, nxt * BLOCK_N, nxt >= full_hi, nxt < hi, causal_off,
                                    kv_len, qk_scale, log_lam2, vote_skip_smem, VOTE, IS_CAUSAL)
    v_loads = _fetch(k_desc, v_desc, kv_b, kv_h, k_smem, v_smem, k_bars, v_bars, nxt, hi, keep, v_loads, BLOCK_N)
    _await_k(k_bars, nxt + 2, hi)
    if DEBUG:
        gl.store(dec_row + nxt, keep.to(gl.int8), mask=nxt < hi)
    return s, s_token, keep, m_i, alpha, l_i, o, o_alpha, v_loads


@gluon.jit
def _key_tiles(q_smem, k_smem, v_smem, vote_smem, vote_skip_smem, k_bars, v_bars, k_desc, v_desc, kv_b, kv_h, s_zero,
               o, m_i, l_i, row_ok, offs_m, dec_row, hi, full_hi, causal_off, kv_len, qk_scale, log_lam2,
               p_layout: gl.constexpr, mma_o: gl.constexpr, VOTE: gl.constexpr, IS_CAUSAL: gl.constexpr,
               DEBUG: gl.constexpr, BLOCK_N: gl.constexpr):
    """Key tiles [0, hi) of one query tile (hi ≥ 1): returns (O, l, kept tiles). Every kept tile fetches its V,
    so the V count is the kept count.

    O's rescale by the running max's moves is deferred to the next kept tile (``o_alpha``): a skipped tile
    moves the max only when λ > 1, and never pays the O-sized multiply. The loop takes two steps per turn, so
    that the voted scores and the product in flight swap registers from one step to the next and back: one
    step per turn makes the loop-carried scores a fixed register set, and a skipped tile then copies S out of
    the product's registers before it can queue the next one. An odd step count ends on tile hi, which
    nothing sees."""
    o_alpha = gl.full([o.shape[0]], 1.0, gl.float32, layout=gl.SliceLayout(1, mma_o))
    # -- tile 0 voted before the loop while S_1 runs; each step then finishes tile j and votes on j + 1,
    #    with S_{j+2} in flight by its end --
    mbarrier.wait(k_bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
    _await_k(k_bars, 1, hi)
    s_token = _queue_scores(q_smem, k_smem, s_zero, 1, hi)
    s, keep, m_i, alpha = _vote(s, m_i, row_ok, offs_m, 0, 0 >= full_hi, 0 < hi, causal_off, kv_len, qk_scale,
                                log_lam2, vote_smem, VOTE, IS_CAUSAL)
    v_loads = _fetch(k_desc, v_desc, kv_b, kv_h, k_smem, v_smem, k_bars, v_bars, 0, hi, keep, 0, BLOCK_N)
    _await_k(k_bars, 2, hi)
    if DEBUG:
        gl.store(dec_row, keep.to(gl.int8))
    for j in range(0, hi - 1 + (hi - 1) % 2, 2):
        s, s_token, keep, m_i, alpha, l_i, o, o_alpha, v_loads = _next_tile(
            j, s, s_token, keep, m_i, alpha, l_i, o, o_alpha, v_loads, q_smem, k_smem, v_smem, vote_smem,
            vote_skip_smem, k_bars, v_bars, k_desc, v_desc, kv_b, kv_h, s_zero, row_ok, offs_m, dec_row, hi, full_hi,
            causal_off, kv_len, qk_scale, log_lam2, p_layout, mma_o, VOTE, IS_CAUSAL, DEBUG, BLOCK_N)
        s, s_token, keep, m_i, alpha, l_i, o, o_alpha, v_loads = _next_tile(
            j + 1, s, s_token, keep, m_i, alpha, l_i, o, o_alpha, v_loads, q_smem, k_smem, v_smem, vote_smem,
            vote_skip_smem, k_bars, v_bars, k_desc, v_desc, kv_b, kv_h, s_zero, row_ok, offs_m, dec_row, hi, full_hi,
            causal_off, kv_len, qk_scale, log_lam2, p_layout, mma_o, VOTE, IS_CAUSAL, DEBUG, BLOCK_N)
    warpgroup_mma_wait(0, deps=(s_token,))  # the product queued past the last tile
    l_i = l_i * alpha
    o_alpha = o_alpha * gl.convert_layout(alpha, gl.SliceLayout(1, mma_o))
    if keep:  # the last tile
        p, l_i = _probabilities(s, m_i, l_i, qk_scale, p_layout, q_smem.dtype)
        o_token = _accumulate(o, o_alpha, p, v_smem, v_bars, v_loads)
        o, p = warpgroup_mma_wait(0, deps=(o_token, p))
    else:
        o = o * o_alpha[:, None]
    return o, l_i, v_loads


@gluon.jit
def gluon_prefill_kernel(
    q_desc, k_desc, v_desc, o_desc, state_ptr, stats_ptr, dec_ptr,
    stride_db, stride_dh, stride_di,
    num_heads, group, q_len, kv_len, scale, phase, stats_cols,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr,
    COUNT: gl.constexpr, DEBUG: gl.constexpr, num_warps: gl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B·Hq), heaviest causal query tiles first; 8 warps (two warpgroups). Q, K and V
    come through the host's 4-D descriptors (``launch``): built once per call, not per program."""
    dtype: gl.constexpr = o_desc.dtype
    # -- layouts: S and O are wgmma accumulators (16-row instructions, warps stacked along M); P feeds the
    #    second wgmma from registers --
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, mma)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)

    tile_m = gl.num_programs(0) - 1 - gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    h_kv = h // group  # GQA: never a repeat of K/V
    first_row = tile_m * BLOCK_M
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_BUFFERS, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [V_BUFFERS, 1], mbarrier.MBarrierLayout())
    gl.static_assert(BLOCK_M == 16 * num_warps)  # one 16-row wgmma slice a warp: _any_at_least's layout
    vote_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    vote_smem = gl.allocate_shared_memory(gl.int16, [BLOCK_M, 4], vote_layout)
    # the skipped path's vote has a buffer of its own: Triton's hazard pass cannot tell that a step runs only one of
    # the two votes, and puts a CTA barrier before a store into the buffer the other path read
    vote_skip_smem = gl.allocate_shared_memory(gl.int16, [BLOCK_M, 4], vote_layout)
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_bars.index(i), count=1)
    for i in gl.static_range(V_BUFFERS):
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    # -- the key range: causal tiles past the diagonal are never visited; tiles from full_hi on need masks --
    causal_off = kv_len - q_len  # bottom-right aligned: key c visible to row r iff c <= r + causal_off
    if IS_CAUSAL:
        last_row = gl.minimum(first_row + BLOCK_M, q_len) - 1
        full_hi = gl.maximum(first_row + causal_off + 1, 0) // BLOCK_N
        hi = gl.minimum(gl.cdiv(gl.maximum(last_row + causal_off + 1, 0), BLOCK_N), gl.cdiv(kv_len, BLOCK_N))
    else:
        full_hi = kv_len // BLOCK_N
        hi = gl.cdiv(kv_len, BLOCK_N)
    full_hi = gl.minimum(full_hi, kv_len // BLOCK_N)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _copy_rows(q_desc, b, h, first_row, q_bar, q_smem)
    for i in gl.static_range(K_STAGES):
        mbarrier.expect(k_bars.index(i), k_desc.block_type.nbytes, pred=i < hi)
        _copy_rows(k_desc, b, h_kv, i * BLOCK_N, k_bars.index(i), k_smem.index(i), pred=i < hi)

    log_lam2 = log2_threshold(state_ptr, phase, kv_len)  # read at run time: λ never recompiles
    qk_scale = scale.to(gl.float32) * 1.4426950408889634  # scores in exp2 space
    offs_m = first_row + gl.arange(0, BLOCK_M, layout=rows)
    row_ok = offs_m < q_len
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows)
    o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=mma_o)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
    n_kept = 0
    mbarrier.wait(q_bar, 0)
    if hi > 0:  # two compiled loops, picked at run time: the vote's reduction is only paid for when it decides
        dec_row = dec_ptr + b.to(gl.int64) * stride_db + h.to(gl.int64) * stride_dh + tile_m * stride_di
        if COUNT or DEBUG or (log_lam2 > float("-inf")):
            o, l_i, n_kept = _key_tiles(
                q_smem, k_smem, v_smem, vote_smem, vote_skip_smem, k_bars, v_bars, k_desc, v_desc, b, h_kv, s_zero, o,
                m_i, l_i, row_ok, offs_m, dec_row, hi, full_hi, causal_off, kv_len, qk_scale, log_lam2, p_layout, mma_o,
                True, IS_CAUSAL, DEBUG, BLOCK_N)
        else:  # λ = 0, nothing to count: every visited tile holds a key its last row sees, so it is kept
            o, l_i, n_kept = _key_tiles(
                q_smem, k_smem, v_smem, vote_smem, vote_skip_smem, k_bars, v_bars, k_desc, v_desc, b, h_kv, s_zero, o,
                m_i, l_i, row_ok, offs_m, dec_row, hi, full_hi, causal_off, kv_len, qk_scale, log_lam2, p_layout, mma_o,
                False, IS_CAUSAL, DEBUG, BLOCK_N)

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(K_STAGES):
        mbarrier.invalidate(k_bars.index(i))
    for i in gl.static_range(V_BUFFERS):
        mbarrier.invalidate(v_bars.index(i))

    # -- epilogue: rows with nothing unmasked output 0 --
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, mma_o))
    out = o / gl.where(l_o > 0, l_o, 1.0)[:, None]
    out = gl.where((l_o > 0)[:, None], out, 0.0)
    q_smem.store(out.to(dtype))  # Q's buffer is free: the last product is done
    fence_async_shared()
    o_box = q_smem._reinterpret(dtype, o_desc.block_type.shape, o_desc.layout)
    tma.async_copy_shared_to_global(o_desc, [b, h, first_row, 0], o_box)  # rows past Lq are not written
    tma.store_wait(0)
    if COUNT:
        stats_row = stats_ptr + phase * stats_cols
        gl.atomic_add(stats_row, hi.to(gl.int64))  # every visited tile is valid (see _vote)
        gl.atomic_add(stats_row + 1, (hi - n_kept).to(gl.int64))
