"""Host side of the Triton backend: mask summaries, launch configs and dispatch to the kernels.

``skip_softmax_attention`` has the contract of ``reference_attention`` (SPEC §4); the op in ``op.py``
calls it for CUDA tensors. Short queries go to the split-K kernels of ``triton_decode.py``: decode
(Lq == 1) always, and Lq ≤ br (speculative or chunked steps: one query tile per head) while a KV head's
query rows fit one program. Every other length goes to a prefill kernel, whose programs each own a query
tile and walk the whole KV length (too few programs for a short query): on Hopper with Triton 3.6, for 16-bit
inputs with D = Dv in {64, 128}, 128×128 tiles and no explicit mask or trial grid, the Gluon kernel of
``gluon_prefill.py`` (the skip branch scheduled by hand); otherwise ``triton_prefill.py``.
"""

from __future__ import annotations

import os

import torch
import triton

from ..config import TRITON_TILES
from .masks import ROWS_PER_CHUNK, as_4d, attended, drop_causal_mask, per_mask
from .threshold import phase_of
from .triton_decode import (
    decode_attend_kernel,
    decode_combine_kernel,
    decode_scores_kernel,
)
from .triton_prefill import prefill_kernel

GLUON_TRITON = "3.6."  # the Triton release the Gluon kernel was built and tested with (on an H200)


def _gluon_launcher():
    """The launcher of the Hopper prefill kernel in Gluon (``gluon_prefill.launch``), on the Triton release it was
    tested with; None elsewhere, and the Triton kernel runs everything. Gluon's API is experimental and moves
    between releases (3.9 renamed its TMA copies), so an untested release must not meet it at compile time in a
    user's forward pass."""
    if not triton.__version__.startswith(GLUON_TRITON):
        return None
    from .gluon_prefill import launch

    return launch


gluon_prefill_launch = _gluon_launcher()

MIN_BLOCK = TRITON_TILES[0]  # tl.dot needs at least 16 rows / columns / reduction depth
NUM_SMS_FALLBACK = 132
DECODE_WAVES = 8
DECODE_MIN_TILES = 4  # key tiles a split at least: on H200, B = 1 at 32k ran 0.043 ms vs 0.050 ms with 1–2
SPLIT_K_MAX_ROWS = 64  # query rows (heads of a KV head × positions) one split-K program holds for Lq > 1


# -- launch configs: (num_warps, num_stages) by padded head dim and tile shape; tuned on H100/H200 --
def prefill_config(d_pad: int, block_m: int, block_n: int) -> tuple[int, int]:
    if d_pad <= 64:  # H200, D = 64, 128×128 tiles: 4 warps 12–19 % faster than 8 (bench/results/tuning_d64_h200.json)
        return (4, 3)
    if d_pad <= 128:
        return (4, 3) if block_m * block_n <= 64 * 64 else (8, 3)
    return (8, 1) if block_m * block_n >= 128 * 128 else (8, 2)


PREFILL_OVERRIDES: dict = {}  # bench/gpu_check.py sweeps: num_warps, num_stages, skip_v_load, tma; gluon (False: Triton kernel)
DECODE_OVERRIDES: dict = {}  # for GPU sweeps: waves, num_stages (attend), scores_num_stages, min_tiles_per_split, pdl


def _pow2(n: int, floor: int = MIN_BLOCK) -> int:
    return max(floor, triton.next_power_of_2(n))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# -- explicit masks: one pass per mask tensor, cached, so every layer reuses the tile summary --


def _mask_operand(attn_mask: torch.Tensor):
    """(tensor the kernel reads, MASK_KIND 1 bool / 2 additive, masked-at-or-below value, the 4-D view)."""
    mask = as_4d(attn_mask)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1, 0.0, mask
    return mask, 2, float(torch.finfo(mask.dtype).min), mask


def _block_kinds(mask4: torch.Tensor, br: int, bc: int, query_len: int, kv_len: int):
    """int8 (B|1, H|1, nI|1, nJ): 0 = nothing attends, 1 = partial (read the mask), 2 = all attend, bias 0.

    Rows past Lq and columns past Lk are neutral. Works in row chunks so an L×L mask never has a
    second L×L copy.
    """
    mb, mh, mq, _ = mask4.shape
    num_i = 1 if mq == 1 else -(-query_len // br)
    num_j = -(-kv_len // bc)
    kinds = torch.empty(mb, mh, num_i, num_j, dtype=torch.int8, device=mask4.device)
    rows_per_chunk = max(br, ROWS_PER_CHUNK // br * br)
    for r0 in range(0, mq, rows_per_chunk):
        part = mask4[:, :, r0 : r0 + rows_per_chunk]
        attend = attended(part)
        plain = attend if part.dtype == torch.bool else attend & (part == 0)
        rows = part.shape[2]
        tile_rows = br if mq != 1 else 1
        pad_r = -rows % tile_rows
        pad_c = num_j * bc - kv_len
        any_ = torch.nn.functional.pad(attend, (0, pad_c, 0, pad_r), value=False)
        all_ = torch.nn.functional.pad(plain, (0, pad_c, 0, pad_r), value=True)
        shape = (mb, mh, (rows + pad_r) // tile_rows, tile_rows, num_j, bc)
        any_ = any_.reshape(shape).any(5).any(3)
        all_ = all_.reshape(shape).all(5).all(3)
        i0 = r0 // tile_rows
        kinds[:, :, i0 : i0 + any_.shape[2]] = torch.where(any_, torch.where(all_, 2, 1), 0).to(torch.int8)
    return kinds


def mask_summary(attn_mask: torch.Tensor, br: int, bc: int, query_len: int, kv_len: int) -> torch.Tensor:
    """Cached ``_block_kinds``: keyed on the mask object, its version counter and the tile shape."""
    return per_mask(attn_mask, ("kinds", br, bc, query_len, kv_len),
                    lambda: _block_kinds(as_4d(attn_mask), br, bc, query_len, kv_len))


def _stride(t: torch.Tensor, dim: int) -> int:
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def _counting(stats, trial_thresholds, device):
    """(COUNT_MODE, trial log2 λ tensor, number of trials, stats columns)."""
    if stats is None:
        return 0, None, 1, 0
    if trial_thresholds is not None and trial_thresholds.numel() > 0:
        trials2 = torch.log2(trial_thresholds.detach().float().to(device)).contiguous()
        return 2, trials2, trials2.numel(), stats.shape[1]
    return 1, None, 1, stats.shape[1]


def skip_softmax_attention(
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
    decisions_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Skip-softmax attention on the Triton kernels; same contract as ``reference_attention``.

    Args:
        q, k, v: (B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv); last dim contiguous (copied if not).
        decisions_out: optional int8 (B, Hq, nI, nJ) zeros; the kernels write 1 for every kept
            valid tile (tests compare it with the reference's tile gaps). nI = 1 for decode.
    Returns:
        (B, Hq, Lq, Dv) in q's dtype.
    """
    _validate_supported(q, k, v, br, bc)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if stats is not None and not stats.is_contiguous():
        raise ValueError("stats must be contiguous")
    batch, num_heads, query_len, head_dim = q.shape
    kv_len, value_dim = k.shape[2], v.shape[-1]
    out = torch.empty(batch, num_heads, query_len, value_dim, dtype=q.dtype, device=q.device)
    if batch * num_heads * query_len == 0:
        return out
    state = threshold_state.detach().float().contiguous()
    count_mode, trials2, num_trials, stats_cols = _counting(stats, trial_thresholds, q.device)
    common = dict(
        state=state, trials2=trials2, count_mode=count_mode, num_trials=num_trials, stats_cols=stats_cols,
        stats=stats, decisions_out=decisions_out,
    )
    attn_mask, is_causal = drop_causal_mask(attn_mask, is_causal, query_len, kv_len)
    if query_len == 1 or (query_len <= br and _split_k_rows(num_heads // k.shape[1], query_len)[2] <= SPLIT_K_MAX_ROWS):
        _launch_decode(q, k, v, out, attn_mask, is_causal, scale, bc, **common)
    else:
        _launch_prefill(q, k, v, out, attn_mask, is_causal, scale, br, bc, **common)
    return out


def _split_k_rows(group: int, query_len: int) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_T, rows) of a split-K program: G heads × Lq positions, padded to tl.dot's 16 rows."""
    block_t = triton.next_power_of_2(query_len)
    block_g = max(triton.next_power_of_2(group), MIN_BLOCK // min(block_t, MIN_BLOCK))
    return block_g, block_t, block_g * block_t


def _validate_supported(q, k, v, br, bc) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton backend supports float16, bfloat16 and float32, got {q.dtype}")
    for name, size in (("br", br), ("bc", bc)):
        if not TRITON_TILES[0] <= size <= TRITON_TILES[1]:
            raise ValueError(f"the Triton backend needs {TRITON_TILES[0]} <= {name} <= {TRITON_TILES[1]}, got {name}={size}")
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise ValueError(f"the Triton backend supports head dims up to 256, got D={q.shape[-1]}, Dv={v.shape[-1]}")


def _launch_prefill(q, k, v, out, attn_mask, is_causal, scale, br, bc, *, state, trials2, count_mode, num_trials,
                    stats_cols, stats, decisions_out):
    batch, num_heads, query_len, head_dim = q.shape
    num_kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    block_m = br if query_len > br else _pow2(query_len)  # a short query tile still holds every row of tile 0
    block_n = bc
    if attn_mask is None and count_mode != 2 and _gluon_ok(q, k, v, block_m, block_n):
        gluon_prefill_launch(q, k, v, out, is_causal, scale, block_m, block_n, state, count_mode, stats_cols, stats,
                             decisions_out)
        return
    d_pad, dv_pad = _pow2(head_dim), _pow2(value_dim)
    num_warps, num_stages = prefill_config(max(d_pad, dv_pad), block_m, block_n)
    num_warps = PREFILL_OVERRIDES.get("num_warps", num_warps)
    num_stages = PREFILL_OVERRIDES.get("num_stages", num_stages)
    skip_v_load = PREFILL_OVERRIDES.get("skip_v_load", True)
    use_tma = PREFILL_OVERRIDES.get("tma", True) and (d_pad, dv_pad) == (head_dim, value_dim) and _tma_ok(k, v)

    dummy = q.new_empty(1)
    if attn_mask is not None:
        mask_t, mask_kind, mask_min, mask4 = _mask_operand(attn_mask)
        kinds = mask_summary(attn_mask, br if query_len > br else block_m, bc, query_len, kv_len)
        m_strides = [_stride(mask4, d) for d in range(4)]
        c_strides = [_stride(kinds, d) for d in range(3)]
    else:
        mask_t, mask_kind, mask_min, kinds = dummy, 0, 0.0, dummy
        m_strides, c_strides = [0, 0, 0, 0], [0, 0, 0]
    dec = decisions_out if decisions_out is not None else dummy
    d_strides = [dec.stride(d) for d in range(3)] if decisions_out is not None else [0, 0, 0]
    grid = (triton.cdiv(query_len, block_m), batch * num_heads)
    prefill_kernel[grid](
        q, k, v, out, mask_t, kinds, state, trials2 if trials2 is not None else state,
        stats if stats is not None else dummy, dec,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *m_strides, *c_strides, *d_strides,
        num_heads, num_heads // num_kv_heads, query_len, kv_len, float(scale), mask_min,
        phase_of(query_len), num_trials, stats_cols,
        HEAD_DIM=head_dim, VALUE_DIM=value_dim, D_PAD=d_pad, DV_PAD=dv_pad,
        BLOCK_M=block_m, BLOCK_N=block_n, T_PAD=_pow2(num_trials, 2),
        IS_CAUSAL=bool(is_causal), MASK_KIND=mask_kind, COUNT_MODE=count_mode,
        SKIP_V_LOAD=skip_v_load, DEBUG=decisions_out is not None, DOT_PRECISION=_dot_precision(q.dtype),
        USE_TMA=use_tma,
        num_warps=num_warps, num_stages=num_stages,
    )


def _gluon_ok(q, k, v, block_m: int, block_n: int) -> bool:
    """The Gluon kernel's case: Hopper, 16-bit, D = Dv in {64, 128}, 128×128 tiles, TMA-able tensors."""
    if not PREFILL_OVERRIDES.get("gluon", True) or gluon_prefill_launch is None or q.device.type != "cuda":
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or (block_m, block_n) != (128, 128):
        return False
    if q.shape[-1] != v.shape[-1] or q.shape[-1] not in (64, 128):
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    return all(_tma_aligned(t) and min(t.stride()[:-1]) > 0 for t in (q, k, v))  # the host's 4-D descriptors


def _tma_aligned(t: torch.Tensor) -> bool:
    """What a TMA descriptor over ``t``'s rows needs, whether the host builds it over all of ``t`` or a kernel builds
    one per (batch, head) at ``base + b·stride_b + h·stride_h``: a 16-byte aligned base and every stride above the
    last in 16-byte multiples (the last is 1: ``skip_softmax_attention`` makes rows contiguous)."""
    return t.data_ptr() % 16 == 0 and all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1])


def _sm90_or_later(device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Bulk tensor copies of ``tensors`` need Hopper, ``_tma_aligned`` tensors, and a scratch allocator (for the
    descriptors the kernels build)."""
    device = tensors[0].device
    if not _sm90_or_later(device):
        return False
    if not all(_tma_aligned(t) for t in tensors):
        return False
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    return True


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS_FALLBACK


def _has_pdl(device) -> bool:
    """Programmatic dependent launch (sm_90 on): a kernel's programs start while the one before it drains, and
    wait in ``gdc_wait`` for its writes. The interpreter cannot run that instruction: it takes the plain launch."""
    return _sm90_or_later(device) and os.environ.get("TRITON_INTERPRET", "0") != "1"


def decode_splits(num_programs: int, num_tiles: int, device) -> int:
    """Enough splits of the KV range for DECODE_WAVES programs per multiprocessor (they hide load latency).

    ``DECODE_OVERRIDES``: "waves" replaces DECODE_WAVES, "min_tiles_per_split" DECODE_MIN_TILES.
    """
    waves = DECODE_OVERRIDES.get("waves", DECODE_WAVES)
    max_splits = triton.cdiv(num_tiles, DECODE_OVERRIDES.get("min_tiles_per_split", DECODE_MIN_TILES))
    return max(1, min(max_splits, triton.cdiv(waves * _num_sms(device), num_programs)))


def _launch_decode(q, k, v, out, attn_mask, is_causal, scale, bc, *, state, trials2, count_mode, num_trials,
                   stats_cols, stats, decisions_out):
    """Split-K over the KV length for a short query (the three launches of ``triton_decode.py``)."""
    batch, num_heads, query_len, head_dim = q.shape
    num_kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = num_heads // num_kv_heads
    block_g, block_t, rows = _split_k_rows(group, query_len)
    block_n = bc
    d_pad, dv_pad = _pow2(head_dim), _pow2(value_dim)
    num_tiles = triton.cdiv(kv_len, block_n)
    splits = decode_splits(batch * num_kv_heads, num_tiles, q.device)
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)
    num_warps = 4 if max(d_pad, dv_pad) <= 128 and rows <= 32 else 8

    dummy = q.new_empty(1)
    f32 = dict(dtype=torch.float32, device=q.device)
    rows_shape = (batch, num_heads, query_len)
    pdl = DECODE_OVERRIDES.get("pdl", True) and _has_pdl(q.device)
    scores_fp16 = q.dtype != torch.float32  # s − m̃ in fp16 is exact enough for 16-bit inputs, and half the bytes
    scores = torch.empty(*rows_shape, kv_len, dtype=torch.float16 if scores_fp16 else torch.float32, device=q.device)
    tile_max = torch.empty(*rows_shape, num_tiles, **f32)
    part_acc = torch.empty(*rows_shape, splits, dv_pad, **f32)
    part_l = torch.empty(*rows_shape, splits, **f32)
    part_m = torch.empty(*rows_shape, splits, **f32)
    keep_heads = torch.empty(batch, num_heads, num_tiles, dtype=torch.int32, device=q.device)  # per head and tile
    kept = torch.empty(batch * num_kv_heads, num_tiles, dtype=torch.int32, device=q.device)  # per split, compacted
    if attn_mask is not None:
        mask_t, mask_kind, mask_min, mask4 = _mask_operand(attn_mask)
        m_strides = [_stride(mask4, d) for d in range(4)]
    else:
        mask_t, mask_kind, mask_min, m_strides = dummy, 0, 0.0, [0, 0, 0, 0]
    precision = _dot_precision(q.dtype)
    grid = (splits, batch * num_kv_heads)
    decode_scores_kernel[grid](
        q, k, mask_t, scores, tile_max,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *m_strides,
        *scores.stride()[:3], *tile_max.stride()[:3],
        num_kv_heads, group, query_len, kv_len, tiles_per_split, num_tiles, float(scale), mask_min,
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_N=block_n,
        IS_CAUSAL=bool(is_causal) and query_len > 1, MASK_KIND=mask_kind, DOT_PRECISION=precision,
        PDL=pdl, SCORES_FP16=scores_fp16,
        num_warps=num_warps, num_stages=DECODE_OVERRIDES.get("scores_num_stages", 3),
    )
    dec = decisions_out if decisions_out is not None else dummy
    decode_attend_kernel[grid](
        v, scores, tile_max, state, trials2 if trials2 is not None else state,
        stats if stats is not None else dummy, dec, keep_heads, kept, part_acc, part_l, part_m,
        v.stride(0), v.stride(1), v.stride(2), *scores.stride()[:3], *tile_max.stride()[:3],
        keep_heads.stride(0), keep_heads.stride(1),
        dec.stride(0) if decisions_out is not None else 0, dec.stride(1) if decisions_out is not None else 0,
        *part_l.stride(),
        num_kv_heads, group, query_len, kv_len, tiles_per_split, num_tiles, phase_of(query_len), num_trials,
        stats_cols,
        VALUE_DIM=value_dim, DV_PAD=dv_pad, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_N=block_n,
        PREFIX_CHUNK=256, DECIDE_CHUNK=16, T_PAD=_pow2(num_trials, 2), COUNT_MODE=count_mode,
        DEBUG=decisions_out is not None, DOT_PRECISION=precision, PDL=pdl, SCORES_FP16=scores_fp16,
        num_warps=num_warps, num_stages=DECODE_OVERRIDES.get("num_stages", 3), launch_pdl=pdl,
    )
    decode_combine_kernel[(batch * num_heads * query_len,)](
        part_acc, part_l, part_m, out, part_l.stride(2), part_l.stride(3), out.stride(2), splits,
        VALUE_DIM=value_dim, DV_PAD=dv_pad, S_PAD=_pow2(splits, 2), PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
