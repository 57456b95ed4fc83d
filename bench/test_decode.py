"""Decode kernel benchmark (SPEC §9): Lq = 1, bf16, Hq=32, Hkv=8, D=128, KV ∈ {32k, 64k, 128k}, B ∈ {1, 8, 32}.

fxsparse dense (λ = 0) and at the λ giving ~70 % tile sparsity (structured inputs, one counting pass)
against SDPA (``enable_gqa=True``, default backend choice), in the same session. Every call is timed
inside a replayed CUDA graph of 20 calls, as a served decode step runs, so launch overhead is not
what is measured. Bandwidth is K+V bytes over time (the dense floor).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import cuda_ms, synced
from bench.inputs import lambdas_for_sparsity, structured_qkv

HQ, HKV, D = 32, 8, 128
KV_LENS = [32768, 65536, 131072]
BATCHES = [1, 8, 32]
IMPLS = ["sdpa", "fx_dense", "fx_s70"]
TRIALS = torch.tensor([1e-12, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2,
                       3e-2, 0.1, 0.3, 1.0])
CONCENTRATION = 0.6
GRAPH_CALLS = 20


@functools.lru_cache(maxsize=1)
def _case(kv_len: int, batch: int):
    q = torch.empty(batch, HQ, 1, D, dtype=torch.bfloat16, device="cuda")
    k = torch.empty(batch, HKV, kv_len, D, dtype=torch.bfloat16, device="cuda")
    v = torch.empty_like(k)
    for b in range(batch):  # one sequence at a time bounds the float32 temporaries
        q[b : b + 1], k[b : b + 1], v[b : b + 1] = structured_qkv(
            1, HQ, HKV, kv_len, D, concentration=CONCENTRATION, device="cuda", seed=b, num_queries=1
        )
    return q, k, v, lambdas_for_sparsity(q, k, v, False, TRIALS, [0.7])[0.7]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kv_len", KV_LENS)
def test_decode(benchmark, report, kv_len, batch, impl):
    from fxsparse.ops import skip_softmax_attention
    from fxsparse.ops import triton_attention as ta
    from fxsparse.ops.threshold import make_threshold_state

    q, k, v, (lam70, _) = _case(kv_len, batch)
    row = dict(bench="decode", KV=kv_len, B=batch, impl=impl)
    if impl == "sdpa":
        call = functools.partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True)
    else:
        lam = 0.0 if impl == "fx_dense" else lam70
        state = make_threshold_state(lam, device="cuda")
        stats = torch.zeros(2, 2, dtype=torch.int64, device="cuda")
        ta.skip_softmax_attention(q, k, v, None, False, D**-0.5, state, 128, 128, stats)
        row.update(lam=lam, sparsity=stats[1, 1].item() / max(stats[1, 0].item(), 1))
        call = functools.partial(skip_softmax_attention, q, k, v, threshold=state, backend="triton")
    call()
    ms = cuda_ms(call, graph_calls=GRAPH_CALLS)
    row.update(ms=ms, kv_TBps=2 * k.numel() * k.element_size() / ms / 1e9)
    base = [r for r in report if r["bench"] == "decode" and r["KV"] == kv_len and r["B"] == batch and r["impl"] == "sdpa"]
    if base:
        row["speedup_vs_sdpa"] = base[0]["ms"] / ms
    report.append(row)
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "bench"})
    benchmark.pedantic(synced(call), rounds=5, iterations=1, warmup_rounds=1)
