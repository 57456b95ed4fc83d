"""Decode kernel benchmark (SPEC §9): bf16, Hq=32, Hkv=8, D=128, KV ∈ {32k, 64k, 128k}.

Decode (Lq = 1) at B ∈ {1, 8, 32}, and a speculative step of Lq = 4 query rows at B ∈ {1, 8}.
fxsparse dense (λ = 0) and at the λ giving ~70 % tile sparsity (structured inputs, one counting pass)
against SDPA, in the same session: the fastest of its default choice and each of its cuDNN, flash and
memory-efficient backends (with ``enable_gqa=True``, or on K/V repeated to Hq outside the timing where a
backend refuses GQA), named in the row's ``sdpa_backend``; for Lq = 4 also the
prefill kernel dense (``fx_prefill_kernel``, what short queries ran on before they went split-K). The
Lq = 4 step is non-causal on both sides (SDPA's ``is_causal`` is top-left aligned; the 4 rows' causal
triangle is 6 keys out of 32k+). Every call is timed inside a replayed CUDA graph of 20 calls, as a
served decode step runs, so launch overhead is not what is measured. Bandwidth is K+V bytes over time
(the dense floor).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.conftest import cuda_ms, synced
from bench.inputs import lambdas_for_sparsity, structured_qkv

HQ, HKV, D = 32, 8, 128
KV_LENS = [32768, 65536, 131072]
BATCHES = [1, 8, 32]
CASES = [(kv, b, 1) for kv in KV_LENS for b in BATCHES] + [(kv, b, 4) for kv in KV_LENS for b in (1, 8)]
IMPLS = ["sdpa", "fx_prefill_kernel", "fx_dense", "fx_s70"]
TRIALS = torch.tensor([1e-12, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2,
                       3e-2, 0.1, 0.3, 1.0])
CONCENTRATION = 0.6
GRAPH_CALLS = 20


@functools.lru_cache(maxsize=1)
def _case(kv_len: int, batch: int, query_len: int):
    q = torch.empty(batch, HQ, query_len, D, dtype=torch.bfloat16, device="cuda")
    k = torch.empty(batch, HKV, kv_len, D, dtype=torch.bfloat16, device="cuda")
    v = torch.empty_like(k)
    for b in range(batch):  # one sequence at a time bounds the float32 temporaries
        q[b : b + 1], k[b : b + 1], v[b : b + 1] = structured_qkv(
            1, HQ, HKV, kv_len, D, concentration=CONCENTRATION, device="cuda", seed=b, num_queries=query_len
        )
    return q, k, v, lambdas_for_sparsity(q, k, v, False, TRIALS, [0.7])[0.7]


def _fastest_sdpa(q, k, v):
    """(name, call, ms) of the fastest SDPA backend on these inputs."""
    group = q.shape[1] // k.shape[1]
    candidates = {"default": functools.partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True)}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for gqa in (True, False):
            kk, vv = (k, v) if gqa else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))

            def call(backend=backend, kk=kk, vv=vv, gqa=gqa):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)

            try:
                call()
            except RuntimeError:  # this backend does not take these inputs
                continue
            candidates[f"{backend.name.lower()}{'' if gqa else '_repeat_kv'}"] = call
            break  # a backend that takes GQA is timed without the repeat
    timed = {name: (call, cuda_ms(call, graph_calls=GRAPH_CALLS)) for name, call in candidates.items()}
    name = min(timed, key=lambda n: timed[n][1])
    return name, *timed[name]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kv_len, batch, query_len", CASES, ids=lambda c: str(c))
def test_decode(benchmark, report, monkeypatch, kv_len, batch, query_len, impl):
    from fxsparse.ops import skip_softmax_attention
    from fxsparse.ops import triton_attention as ta
    from fxsparse.ops.threshold import make_threshold_state, phase_of

    if impl == "fx_prefill_kernel":
        if query_len == 1:
            pytest.skip("decode always runs split-K")
        monkeypatch.setattr(ta, "SPLIT_K_MAX_ROWS", 0)  # short queries back on the prefill kernel
    q, k, v, (lam70, _) = _case(kv_len, batch, query_len)
    row = dict(bench="decode", KV=kv_len, B=batch, Lq=query_len, impl=impl)
    if impl == "sdpa":
        row["sdpa_backend"], call, _ = _fastest_sdpa(q, k, v)
    else:
        lam = lam70 if impl == "fx_s70" else 0.0
        state = make_threshold_state(lam, device="cuda")
        stats = torch.zeros(2, 2, dtype=torch.int64, device="cuda")
        ta.skip_softmax_attention(q, k, v, None, False, D**-0.5, state, 128, 128, stats)
        phase = phase_of(query_len)
        row.update(lam=lam, sparsity=stats[phase, 1].item() / max(stats[phase, 0].item(), 1))
        call = functools.partial(skip_softmax_attention, q, k, v, threshold=state, backend="triton")
    call()
    ms = cuda_ms(call, graph_calls=GRAPH_CALLS)
    row.update(ms=ms, kv_TBps=2 * k.numel() * k.element_size() / ms / 1e9)
    base = [r for r in report if r["bench"] == "decode" and (r["KV"], r["B"], r["Lq"]) == (kv_len, batch, query_len)
            and r["impl"] == "sdpa"]
    if base:
        row["speedup_vs_sdpa"] = base[0]["ms"] / ms
    report.append(row)
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "bench"})
    benchmark.pedantic(synced(call), rounds=5, iterations=1, warmup_rounds=1)
