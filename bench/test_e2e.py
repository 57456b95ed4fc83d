"""End-to-end prefill of a random-weight Llama-3-8B-shaped model (a few layers), SPEC §9.

HF sdpa and HF eager (an out-of-memory eager run is a result, recorded as such) against the same model
after ``fxsparse.sparsify`` with the Triton backend, dense (λ = 0) and sparse. Per prefill: the time, and
the peak GPU memory of the call above what was allocated before it (the models this session keeps resident
do not count; the model's own weights are reported next to it). Logits only for the last position, so the
vocabulary projection does not dominate memory.

    BENCH_OUT=/tmp PYTHONPATH=. pytest bench/test_e2e.py
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from bench.conftest import cuda_ms

LENGTHS = [8192, 16384, 32768]
# hf_*: HuggingFace attention; fx_*: after fxsparse (sparsify, or the torch.compile backend with Inductor,
# measured next to Inductor on the unchanged sdpa model)
IMPLS = ["hf_sdpa", "hf_eager", "fx_dense", "fx_sparse", "hf_sdpa_inductor", "fx_compile_dense"]
LAYERS = 4
SPARSE_THRESHOLD = 1e-2


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=LAYERS, vocab_size=128256, max_position_embeddings=max(LENGTHS), rope_theta=500000.0,
    )


@functools.lru_cache(maxsize=2)
def _base_model(attn_implementation: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(_config(), torch_dtype=torch.bfloat16,
                                                 attn_implementation=attn_implementation)
    return model.eval()


def _fx_config(threshold: float) -> dict:
    return {"sparse_cfg": {"*attn*": {"threshold": {"prefill": threshold, "decode": threshold},
                                      "backend": "triton", "collect_stats": True}}}


def _model(impl: str):
    """(the model, what to call): they differ for torch.compile'd rows."""
    import fxsparse
    from fxsparse.backend import fxsparse_backend

    if impl in ("hf_eager", "hf_sdpa"):
        model = _base_model(impl.removeprefix("hf_"))
        return model, model
    if impl == "hf_sdpa_inductor":
        model = _base_model("sdpa")
        return model, torch.compile(model, dynamic=False)  # static shapes: Inductor's best case per length
    model = copy.deepcopy(_base_model("sdpa"))
    if impl == "fx_compile_dense":
        # the function itself: the device's Python may not have fxsparse installed (no entry point)
        backend = functools.partial(fxsparse_backend, options={"config": _fx_config(0.0), "inductor": True})
        return model, torch.compile(model, backend=backend, dynamic=False)
    return model, fxsparse.sparsify(model, _fx_config(0.0 if impl == "fx_dense" else SPARSE_THRESHOLD))


def _weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_len", LENGTHS)
@torch.no_grad()
def test_e2e_prefill(report, seq_len, impl):
    model, runner = _model(impl)
    ids = torch.randint(3, 128000, (1, seq_len), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    call = functools.partial(runner, input_ids=ids, use_cache=False, logits_to_keep=1)
    row = dict(bench="e2e", L=seq_len, impl=impl, layers=LAYERS)
    try:
        call()
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()  # weights of every model this session holds
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_ms(call)
        row.update(ms=ms, weights_GiB=_weights_bytes(model) / 2**30,
                   call_peak_GiB=(torch.cuda.max_memory_allocated() - resident) / 2**30)
    except torch.OutOfMemoryError:
        row.update(ms="OOM")
        torch.cuda.empty_cache()
    if impl.startswith("fx"):
        import fxsparse

        prefill = [s["prefill"] for s in fxsparse.get_stats(model).values()]
        valid = sum(p["valid"] for p in prefill)
        row["sparsity"] = sum(p["skipped"] for p in prefill) / max(valid, 1)
    base = [r for r in report if r["bench"] == "e2e" and r["L"] == seq_len and r["impl"] == "hf_sdpa"]
    if base and isinstance(row["ms"], float):
        row["speedup_vs_sdpa"] = base[0]["ms"] / row["ms"]
    report.append(row)
    if impl.startswith("fx"):
        del model, runner
        torch.cuda.empty_cache()
