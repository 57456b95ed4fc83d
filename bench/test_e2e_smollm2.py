"""End to end on a real model: SmolLM2-135M-Instruct (bf16) prefill of 8 essay windows at 2k–8k tokens.

HF sdpa against the same weights after ``fxsparse.sparsify`` (Triton backend) dense (sites disabled, λ = 0) and
at calibrated targets. The laws are those of an earlier calibration (``LAWS_FROM``, the JSON of
``bench/accuracy.py``), pooled and capped from its passes as the default does, so no calibration runs here. Per row: the time of one
prefill forward (last position's logits) and the tile sparsity it reached.

The model is small (hidden 576, 30 layers, 9 query / 3 KV heads, head dim 64): one sequence leaves a forward
bound by Python and kernel launches, so the batch holds 8 windows of the essays, where attention is most of the
device time. Decode steps of this model are launch-bound whatever the attention does: decode speed is measured
on the kernels (``bench/test_decode.py``).

    BENCH_OUT=/tmp PYTHONPATH=. pytest bench/test_e2e_smollm2.py     # needs the assets (python -m fxsparse.assets fetch)
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from bench.conftest import cuda_ms

LENGTHS = [2048, 4096, 8192]  # SmolLM2's context is 8k
BATCH = 8
IMPLS = ["hf_sdpa", "fx_dense", "fx_0.5/0.5", "fx_0.7/0.7"]  # fx targets: prefill/decode
LAWS_FROM = os.environ.get("LAWS_FROM", "bench/results/accuracy_gpu_calib_pooled.json")


@functools.lru_cache(maxsize=1)
def _models():
    """(HF sdpa model, the rewritten copy, its sites, tokenizer); the rewritten model holds the saved laws."""
    import fxsparse
    from bench.accuracy import SavedRun, saved_laws
    from fxsparse.assets import load_default_model
    from fxsparse.calibration.calibrate import write_laws

    hf, tokenizer = load_default_model("cuda", torch.bfloat16)
    rewritten, _ = load_default_model("cuda", torch.bfloat16)
    fxsparse.sparsify(rewritten, {"sparse_cfg": {"*attn*": {"backend": "triton", "br": 128, "bc": 128},
                                                 "default": {"enable": False}}})
    sites = fxsparse.sites_of(rewritten)
    fitted = saved_laws(SavedRun.load(LAWS_FROM), list(sites))  # SKIP_SOFTMAX_CALIB's laws
    write_laws(sites, fitted.laws, fitted.site_laws, 0.5)
    return hf, rewritten, sites, tokenizer


@functools.lru_cache(maxsize=1)
def _essay_ids():
    """(BATCH, the longest length): consecutive windows of the essays' tokens."""
    from fxsparse.assets import essays_dir
    from fxsparse.calibration.tasks import Corpus

    length = max(LENGTHS)
    tokenizer = _models()[3]
    ids = tokenizer(" ".join(Corpus(essays_dir()).sentences))["input_ids"]
    assert len(ids) >= BATCH * length, f"the essays hold only {len(ids)} tokens"
    return torch.tensor(ids[: BATCH * length], device="cuda").view(BATCH, length)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_len", LENGTHS)
@torch.no_grad()
def test_e2e_smollm2(report, seq_len, impl):
    from bench.accuracy import _achieved, _set_mode

    hf, rewritten, sites, _ = _models()
    model = hf if impl == "hf_sdpa" else rewritten
    if model is rewritten:  # dense: sites disabled; else the (prefill, decode) targets of the calibrated laws
        _set_mode(sites, None if impl == "fx_dense" else tuple(float(t) for t in impl.removeprefix("fx_").split("/")))
    ids = _essay_ids()[:, :seq_len]
    prefill = functools.partial(model, input_ids=ids, use_cache=False, logits_to_keep=1)
    row = dict(bench="e2e_smollm2", B=BATCH, L=seq_len, impl=impl, ms=cuda_ms(prefill))
    if model is rewritten:
        row["sparsity"] = _achieved(sites)["prefill"] or 0.0
    base = [r for r in report if r["bench"] == "e2e_smollm2" and r["L"] == seq_len and r["impl"] == "hf_sdpa"]
    if base:
        row["speedup_vs_sdpa"] = base[0]["ms"] / row["ms"]
    report.append(row)
