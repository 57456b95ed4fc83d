"""One device call: correctness of the Triton kernels against the reference, then timings of variants.

    PYTHONPATH=. python bench/gpu_check.py --out $OUT [--skip-check] [--lengths 16384 32768] [--shape 1,32,8,128]

Prints a short table last; writes every number to ``OUT/gpu_check.json``. This is the tuning tool behind
the prefill launch configs; the reported benchmarks are the pytest-benchmark files beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from bench.inputs import lambdas_for_sparsity, structured_qkv
from fxsparse.ops import triton_attention as ta
from fxsparse.ops.reference import reference_attention
from fxsparse.ops.threshold import make_threshold_state

TRIALS = torch.tensor([1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 50.0])


def check_case(b, hq, hkv, lq, lk, d, lam, causal, dtype, mask=None, br=128, bc=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen, device="cuda").to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen, device="cuda").to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen, device="cuda").to(dtype)
    state = make_threshold_state(lam, device="cuda")
    s_ref = torch.zeros(2, 2, dtype=torch.int64, device="cuda")
    s_tri = s_ref.clone()
    gaps = []
    ref = reference_attention(q, k, v, mask, causal, d**-0.5, state, br, bc, s_ref, None, tile_gaps_out=gaps)
    num_i = 1 if lq == 1 else -(-lq // br)
    dec = torch.zeros(b, hq, num_i, -(-lk // bc), dtype=torch.int8, device="cuda")
    out = ta.skip_softmax_attention(q, k, v, mask, causal, d**-0.5, state, br, bc, s_tri, None, decisions_out=dec)
    gaps = torch.stack(gaps, -1)
    log_lam = math.log(lam) if lam > 0 else float("-inf")
    ref_dec = ((gaps > float("-inf")) & (gaps >= log_lam)).to(torch.int8)
    # the reference in fp64 of the same skip pattern sets the error scale (flash-attention's rule)
    ref64 = reference_attention(q.double(), k.double(), v.double(), mask, causal, d**-0.5, state, br, bc)
    err = (out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30)
    err_ref = (ref.double() - ref64).norm() / ref64.norm().clamp_min(1e-30)
    mismatch = (dec != ref_dec).sum().item()
    near = (gaps - log_lam).abs().lt(1e-3).sum().item() if lam > 0 else 0
    return dict(shape=[b, hq, hkv, lq, lk, d], lam=lam, causal=causal, dtype=str(dtype), mask=mask is not None,
                err=err.item(), err_torch=err_ref.item(), dec_mismatch=mismatch, near_threshold=near,
                stats_ref=s_ref.tolist(), stats_tri=s_tri.tolist(), nan=bool(out.isnan().any()))


def run_checks():
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 80, 96, 128, 256):
            rows.append(check_case(1, 4, 2, 1000, 1000, d, 0.3, True, dtype))
        rows.append(check_case(2, 8, 2, 777, 1234, 128, 1.5, True, dtype))
        rows.append(check_case(2, 8, 2, 777, 1234, 128, 0.0, False, dtype))
        pad = torch.arange(1234, device="cuda")[None, :] >= torch.tensor([0, 300], device="cuda")[:, None]
        rows.append(check_case(2, 8, 2, 777, 1234, 128, 1.0, True, dtype, mask=pad[:, None, None, :]))
        lens = torch.tensor([5000, 20000, 777], device="cuda")
        keep = torch.arange(20000, device="cuda")[None, :] < lens[:, None]
        add = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
        rows.append(check_case(3, 32, 8, 1, 20000, 128, 2.0, False, dtype, mask=add))
        rows.append(check_case(3, 32, 8, 1, 20000, 128, 0.0, False, dtype, mask=keep[:, None, None, :]))
        rows.append(check_case(1, 32, 8, 4, 9000, 128, 1.0, True, dtype))
    # λ = 0 against SDPA
    q, k, v = (torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ta.skip_softmax_attention(q, k, v, None, True, 128**-0.5, make_threshold_state(0.0, device="cuda"), 128, 128)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    rows.append(dict(vs_sdpa_rel_err=((out.double() - sdpa).norm() / sdpa.norm()).item()))
    return rows


def time_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def prefill_timings(lengths, variants, shape=(1, 32, 8, 128)):
    b, hq, hkv, d = shape
    rows = []
    for L in lengths:
        q, k, v = structured_qkv(b, hq, hkv, L, d, concentration=1.3, device="cuda")
        flops = 4 * b * hq * L * L * d / 2
        kg, vg = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(backend):
                ms = time_ms(lambda: F.scaled_dot_product_attention(q, kg, vg, is_causal=True))
            rows.append(dict(L=L, impl=name, ms=ms, tflops=flops / ms / 1e9))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense_ref = F.scaled_dot_product_attention(q, kg, vg, is_causal=True).float()
        # counting pass: λ for 50 / 70 / 90 % tile sparsity, and the pass's own time
        lams = lambdas_for_sparsity(q, k, v, True, TRIALS, (0.5, 0.7, 0.9))
        zero = make_threshold_state(0.0, device="cuda")
        stats = torch.zeros(2, 1 + len(TRIALS), dtype=torch.int64, device="cuda")
        ms = time_ms(lambda: ta.skip_softmax_attention(q, k, v, None, True, d**-0.5, zero, 128, 128,
                                                       stats, TRIALS.cuda()))
        rows.append(dict(L=L, impl="counting", ms=ms, tflops=flops / ms / 1e9))
        for vname, over in variants.items():
            ta.PREFILL_OVERRIDES.clear()
            ta.PREFILL_OVERRIDES.update(over)
            targets = [(0.0, (0.0, 0.0))] + list(lams.items())
            for target, (lam, _) in targets:
                state = make_threshold_state(lam, device="cuda")
                st = torch.zeros(2, 2, dtype=torch.int64, device="cuda")
                try:
                    ta.skip_softmax_attention(q, k, v, None, True, d**-0.5, state, 128, 128, st)
                    ms = time_ms(lambda: ta.skip_softmax_attention(q, k, v, None, True, d**-0.5, state, 128, 128))
                except Exception as exc:  # a config that does not compile is a result of the sweep
                    rows.append(dict(L=L, impl=f"fx[{vname}]", error=repr(exc)[:200]))
                    break
                sp = st[0, 1].item() / max(st[0, 0].item(), 1)
                row = dict(L=L, impl=f"fx[{vname}]", lam=lam, sparsity=sp, ms=ms, tflops=flops / ms / 1e9)
                if lam == 0.0:
                    out = ta.skip_softmax_attention(q, k, v, None, True, d**-0.5, state, 128, 128).float()
                    row["err_vs_cudnn"] = ((out - dense_ref).norm() / dense_ref.norm()).item()
                rows.append(row)
        ta.PREFILL_OVERRIDES.clear()
    return rows


DECODE_VARIANTS = {
    "base": {},
    "s2": dict(num_stages=2),
    "s4": dict(num_stages=4),
    "w16": dict(waves=16),
    "w4": dict(waves=4),
    "t1": dict(min_tiles_per_split=1),
    "s2w16": dict(num_stages=2, waves=16),
}


def decode_timings(kv_lens, batches, variants):
    """SDPA and fxsparse (λ = 0 and ~70 %) per ``DECODE_OVERRIDES`` variant, each call in a CUDA graph."""
    from bench.conftest import cuda_ms

    hq, hkv, d = 32, 8, 128
    rows = []
    for kv in kv_lens:
        for b in batches:
            q, k, v = structured_qkv(b, hq, hkv, kv, d, concentration=0.6, device="cuda", num_queries=1)
            ms = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), graph_calls=20)
            rows.append(dict(kv=kv, B=b, impl="sdpa", ms=ms))
            lams = lambdas_for_sparsity(q, k, v, False, TRIALS, (0.7,))
            for vname, over in variants.items():
                ta.DECODE_OVERRIDES.clear()
                ta.DECODE_OVERRIDES.update(over)
                for target, (lam, _) in [(0.0, (0.0, 0.0))] + list(lams.items()):
                    state = make_threshold_state(lam, device="cuda")
                    st = torch.zeros(2, 2, dtype=torch.int64, device="cuda")
                    ta.skip_softmax_attention(q, k, v, None, False, d**-0.5, state, 128, 128, st)
                    ms = cuda_ms(lambda: ta.skip_softmax_attention(q, k, v, None, False, d**-0.5, state, 128, 128),
                                 graph_calls=20)
                    rows.append(dict(kv=kv, B=b, impl=f"fx[{vname}]", lam=lam,
                                     sparsity=st[1, 1].item() / max(st[1, 0].item(), 1), ms=ms))
            ta.DECODE_OVERRIDES.clear()
            del k, v, q
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--shape", default="1,32,8,128", help="prefill B,Hq,Hkv,D")
    ap.add_argument("--decode", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--variants", default="base")
    ap.add_argument("--decode-variants", default="base")
    args = ap.parse_args()
    all_variants = {
        "base": {},
        "triton": dict(gluon=False),  # the Triton prefill kernel where the Gluon one would run
        "w8s3": dict(num_warps=8, num_stages=3),
        "w8s4": dict(num_warps=8, num_stages=4),
        "w8s2": dict(num_warps=8, num_stages=2),
        "w4s3": dict(num_warps=4, num_stages=3),
        "w4s2": dict(num_warps=4, num_stages=2),
        "w4s4": dict(num_warps=4, num_stages=4),
        "vpre": dict(skip_v_load=False),
        "no_tma": dict(tma=False),
        "tma_s4": dict(num_stages=4),
    }
    variants = {k: all_variants[k] for k in args.variants.split(",")}
    decode_variants = {k: DECODE_VARIANTS[k] for k in args.decode_variants.split(",")}
    t0 = time.time()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    import triton
    result["triton"] = triton.__version__
    if not args.skip_check:
        result["checks"] = run_checks()
        for row in result["checks"]:
            print(json.dumps(row), flush=True)
    print(f"checks done {time.time() - t0:.0f}s", flush=True)
    result["prefill"] = prefill_timings(args.lengths, variants, tuple(int(x) for x in args.shape.split(",")))
    print(f"prefill done {time.time() - t0:.0f}s", flush=True)
    result["decode"] = decode_timings(args.decode, args.batches, decode_variants)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(result["device"], "torch", result["torch"], "triton", result["triton"])
    for row in result["prefill"]:
        print("prefill", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    for row in result["decode"]:
        print("decode", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
