"""Kernels to profile with Nsight Compute: prefill (cuDNN, fxsparse dense, at ~70 % and ~90 %) and decode.

Each case runs twice outside any range (compilation, warm caches), then once inside an NVTX range named
``prof``, so ncu sees exactly one launch of every kernel of each case (in the order the cases print)::

    ncu --nvtx --nvtx-include "prof/" --section SpeedOfLight --section WarpStateStats \
        python bench/profile_kernels.py --seq-len 16384 --kv-len 32768 --batch 8
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.inputs import lambdas_for_sparsity, structured_qkv
from fxsparse.ops import triton_attention as ta
from fxsparse.ops.threshold import make_threshold_state

TRIALS = torch.logspace(-8, 1, 40)


def profiled(name, fn):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    print("profiled case:", name, flush=True)
    torch.cuda.nvtx.range_push("prof")
    fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


def profile_prefill(seq_len, hq, hkv, d):
    q, k, v = structured_qkv(1, hq, hkv, seq_len, d, concentration=1.3)
    kg, vg = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        profiled("prefill_cudnn", lambda: F.scaled_dot_product_attention(q, kg, vg, is_causal=True))
    lams = lambdas_for_sparsity(q, k, v, True, TRIALS, [0.7, 0.9])
    for label, lam in (("dense", 0.0), ("s70", lams[0.7][0]), ("s90", lams[0.9][0])):
        state = make_threshold_state(lam, device="cuda")
        profiled(f"prefill_fx_{label}", lambda: ta.skip_softmax_attention(q, k, v, None, True, d**-0.5, state, 128, 128))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=16384, help="prefill length; 0 profiles decode only")
    ap.add_argument("--kv-len", type=int, default=32768, help="decode cache length; 0 profiles prefill only")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    hq, hkv, d = 32, 8, 128
    if args.seq_len:
        profile_prefill(args.seq_len, hq, hkv, d)
    if not args.kv_len:
        return
    q, k, v = structured_qkv(args.batch, hq, hkv, args.kv_len, d, concentration=0.6, num_queries=1)
    profiled("decode_sdpa", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    for label, lam in (("dense", 0.0), ("s70", lambdas_for_sparsity(q, k, v, False, TRIALS, [0.7])[0.7][0])):
        state = make_threshold_state(lam, device="cuda")
        profiled(f"decode_fx_{label}", lambda: ta.skip_softmax_attention(q, k, v, None, False, d**-0.5, state, 128, 128))


if __name__ == "__main__":
    main()
