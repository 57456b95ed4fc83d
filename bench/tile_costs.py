"""What one kept and one skipped key tile cost the prefill kernel, per SM, next to the tensor cores' own time.

The ~70 % speedup is set by the ratio of the two: with a kept tile costing c_k and a skipped one c_s, a run at
sparsity S takes (1 − S)·c_k + S·c_s per tile. This times the op on the benchmark's structured inputs at three λ:

- λ = 0: the dense loop (no vote);
- λ = 1e-30: the voting loop with every tile kept (ln λ = −69: no row ever votes skip), so c_k;
- λ = 1e30: every tile skipped but each query tile's first (m = −inf keeps it), so c_s = (t − kept·c_k) / skipped.

Times are per tile per SM (time × SMs / tiles). ``qk_floor_us`` is one 128×128×D QKᵀ product at Hopper's dense
bf16 rate (4096 FLOP per clock per SM) at the SM clock read during the all-skipped runs: the least a skipped tile can cost.

    PYTHONPATH=. python bench/tile_costs.py --lengths 16384,32768 --out results.json
    PYTHONPATH=. python bench/tile_costs.py --kernels fxsparse/ops/gluon_prefill.py variant.py   # Gluon kernel files

``--kernels`` routes the op's Gluon prefill through each kernel file's own launcher in turn (as
``bench/kernel_ab.py`` does), so a variant's tile costs sit beside the merged kernel's, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.conftest import cuda_ms
from bench.inputs import structured_qkv
from bench.kernel_ab import kernel_at, use
from fxsparse.ops import skip_softmax_attention
from fxsparse.ops.threshold import make_threshold_state

HQ, HKV, D, BLOCK = 32, 8, 128, 128
FLOPS_PER_CLOCK = 4096  # dense bf16 wgmma, per SM per clock (Hopper)


def run_at(q, k, v, lam):
    """(ms, valid tiles, skipped tiles) of the op at a fixed λ."""
    state = make_threshold_state(lam, device="cuda")
    _, stats = skip_softmax_attention(q, k, v, is_causal=True, threshold=state, backend="triton", return_stats=True)
    valid, skipped = stats[0].tolist()
    ms = cuda_ms(lambda: skip_softmax_attention(q, k, v, is_causal=True, threshold=state, backend="triton"))
    return ms, valid, skipped


@triton.jit
def _stream_tiles(k_desc, v_desc, out_ptr, kv_len, group, num_heads_kv, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                  WITH_V: tl.constexpr):
    """Load, through TMA, the K (and V) tiles the causal prefill grid visits, in its order, and nothing else."""
    tile_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h_kv = tl.program_id(1) // group
    first_row = (tl.program_id(1) // (num_heads_kv * group) * num_heads_kv + h_kv) * kv_len
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for j in tl.range(0, tile_m + 1, num_stages=4):
        acc += k_desc.load([first_row + j * BLOCK, 0]).to(tl.float32)
        if WITH_V:
            acc += v_desc.load([first_row + j * BLOCK, 0]).to(tl.float32)
    tl.store(out_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.sum(acc))  # keeps the loads


def stream_ms(k, v, num_heads, with_v):
    """Time of ``_stream_tiles`` over (B, Hkv, L, D) k, v: the L2-to-SM traffic of the prefill grid alone."""
    batch, num_kv, seq_len, head_dim = k.shape
    k_desc, v_desc = (TensorDescriptor.from_tensor(t.reshape(-1, head_dim), [BLOCK, head_dim]) for t in (k, v))
    grid = (triton.cdiv(seq_len, BLOCK), batch * num_heads)
    out = torch.empty(grid[0] * grid[1], device=k.device)
    return cuda_ms(lambda: _stream_tiles[grid](k_desc, v_desc, out, seq_len, num_heads // num_kv, num_kv, BLOCK,
                                               head_dim, with_v, num_warps=8))


def clock_during(fn, calls: int = 200) -> int:
    """The SM clock (MHz, through NVML) read while ``calls`` queued calls of ``fn`` run: boost clocks fall
    under a tensor-core load, and the cost of a product in cycles is what the floor is in."""
    for _ in range(calls):
        fn()
    time.sleep(0.05)
    clock = torch.cuda.clock_rate()
    torch.cuda.synchronize()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--kernels", nargs="*", default=[], help="Gluon prefill kernel files (default: the op's own)")
    parser.add_argument("--out")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    stems = [os.path.splitext(os.path.basename(f))[0] for f in args.kernels]
    kernels = {stem: kernel_at(f, stem) for stem, f in zip(stems, args.kernels)} or {"op": None}
    rows = []
    for seq_len in (int(x) for x in args.lengths.split(",")):
        q, k, v = structured_qkv(1, HQ, HKV, seq_len, D, concentration=1.3, device="cuda")
        kg, vg = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = cuda_ms(lambda: F.scaled_dot_product_attention(q, kg, vg, is_causal=True))
        k_only_ms, kv_ms = stream_ms(k, v, HQ, False), stream_ms(k, v, HQ, True)
        for name, launch in kernels.items():
            if launch is not None:
                use(launch)
            dense_ms, tiles, _ = run_at(q, k, v, 0.0)
            kept_ms, _, none_skipped = run_at(q, k, v, 1e-30)
            skip_ms, _, skipped = run_at(q, k, v, 1e30)
            state = make_threshold_state(1e30, device="cuda")
            clock_mhz = clock_during(lambda: skip_softmax_attention(q, k, v, is_causal=True, threshold=state,
                                                                    backend="triton"))
            per_tile_us = 1e3 * sms / tiles  # ms of the whole grid → µs per tile on one SM
            c_k = kept_ms * per_tile_us
            c_s = (skip_ms * per_tile_us * tiles - c_k * (tiles - skipped)) / skipped
            row = dict(kernel=name, L=seq_len, tiles=tiles, skipped_at_1e30=skipped, skipped_at_1e_30=none_skipped,
                       cudnn_ms=cudnn_ms, dense_ms=dense_ms, all_kept_ms=kept_ms, all_skipped_ms=skip_ms,
                       dense_tile_us=dense_ms * per_tile_us, kept_tile_us=c_k, skipped_tile_us=c_s,
                       qk_floor_us=2 * BLOCK * BLOCK * D / FLOPS_PER_CLOCK / clock_mhz, sm_clock_mhz=clock_mhz,
                       k_stream_ms=k_only_ms, k_stream_tile_us=k_only_ms * per_tile_us,
                       k_stream_tb_s=tiles * BLOCK * D * 2 / k_only_ms / 1e9,
                       kv_stream_ms=kv_ms, kv_stream_tile_us=kv_ms * per_tile_us)
            rows.append(row)
            print(json.dumps({key: round(val, 4) if isinstance(val, float) else val for key, val in row.items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
