"""Prefill kernel benchmark (SPEC §9): bf16, D=128, causal, B=1, Hq=32, Hkv=8, L = 8k … 64k.

fxsparse at λ = 0 (dense mode) and at the λ giving ~50 / 70 / 90 % tile sparsity on structured inputs
(``bench/inputs.py``; λ picked from one counting pass), against SDPA cuDNN, SDPA flash and compiled
FlexAttention with a causal BlockMask, all in the same session. TFLOP/s are dense-equivalent (causal
FLOPs = 2·B·Hq·L²·D), so a sparse run's figure is its speedup in disguise.

    BENCH_OUT=/tmp PYTHONPATH=. pytest bench/test_prefill.py --benchmark-disable-gc

Other shapes: ``PREFILL_SHAPE=B,Hq,Hkv,D`` and ``PREFILL_LENGTHS=4096,8192`` (e.g. SmolLM2's 8,9,3,64).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.conftest import cuda_ms, synced
from bench.inputs import lambdas_for_sparsity, structured_qkv

B, HQ, HKV, D = (int(x) for x in os.environ.get("PREFILL_SHAPE", "1,32,8,128").split(","))
LENGTHS = [int(x) for x in os.environ.get("PREFILL_LENGTHS", "8192,16384,32768,65536").split(",")]
TARGETS = {"fx_s50": 0.5, "fx_s70": 0.7, "fx_s90": 0.9}
IMPLS = ["sdpa_cudnn", "sdpa_flash", "flex", "fx_dense", *TARGETS]
TRIALS = torch.tensor([1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2, 0.1, 0.2, 0.3,
                       0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0])
CONCENTRATION = 1.3


@functools.lru_cache(maxsize=1)
def _case(seq_len: int):
    q, k, v = structured_qkv(B, HQ, HKV, seq_len, D, concentration=CONCENTRATION, device="cuda")
    found = lambdas_for_sparsity(q, k, v, True, TRIALS, TARGETS.values())
    return q, k, v, {name: found[t] for name, t in TARGETS.items()}


def _runner(impl: str, q, k, v, lambdas):
    """(call, λ or None, measured tile sparsity or None)."""
    from fxsparse.ops import skip_softmax_attention
    from fxsparse.ops import triton_attention as ta
    from fxsparse.ops.threshold import make_threshold_state

    if impl.startswith("sdpa"):
        kg, vg = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        backend = SDPBackend.CUDNN_ATTENTION if impl == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION

        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kg, vg, is_causal=True)

        return call, None, None
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        L = q.shape[2]
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, L, L, device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)
        return (lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)), None, None
    lam = 0.0 if impl == "fx_dense" else lambdas[impl][0]
    state = make_threshold_state(lam, device="cuda")
    stats = torch.zeros(2, 2, dtype=torch.int64, device="cuda")
    ta.skip_softmax_attention(q, k, v, None, True, D**-0.5, state, 128, 128, stats)
    sparsity = stats[0, 1].item() / max(stats[0, 0].item(), 1)
    call = functools.partial(skip_softmax_attention, q, k, v, is_causal=True, threshold=state, backend="triton")
    return call, lam, sparsity


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_prefill(benchmark, report, seq_len, impl):
    q, k, v, lambdas = _case(seq_len)
    call, lam, sparsity = _runner(impl, q, k, v, lambdas)
    call()
    ms = cuda_ms(call)
    flops = 2 * B * HQ * seq_len * seq_len * D  # causal half of 4·L²·D
    row = dict(bench="prefill", L=seq_len, impl=impl, ms=ms, tflops=flops / ms / 1e9)
    if lam is not None:
        row.update(lam=lam, sparsity=sparsity)
    base = [r for r in report if r["bench"] == "prefill" and r["L"] == seq_len and r["impl"] == "sdpa_cudnn"]
    if base:
        row["speedup_vs_cudnn"] = base[0]["ms"] / ms
    report.append(row)
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "bench"})
    benchmark.pedantic(synced(call), rounds=5, iterations=1, warmup_rounds=1)
