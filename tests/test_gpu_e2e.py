"""Every way in, on CUDA with the Triton backend: sparsify + generate, torch.compile with Inductor,
and transform of a CUDA export (whose SDPA node is a fused CUDA variant, not the CPU math form).

Tolerance rule (flash-attention's): the fxsparse model's error against a float32 reference may be
at most twice the error of HF's own attention in the same half precision, plus a little slack.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import fxsparse
from fxsparse.backend import fxsparse_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCAB = 512


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models: earlier frames must not count towards recompile limits."""
    torch._dynamo.reset()


def _model(attn_implementation: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama with head_dim 64 and GQA 8/2, long enough context for many 128-tiles."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = 0
    return model.to("cuda", dtype).eval()


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator).cuda()


def _dense_logits(attn_implementation, ids, dtype):
    return _model(attn_implementation, dtype)(ids).logits.float()


def _assert_within_half_precision_error(logits, ids, attn_implementation, dtype):
    reference = _dense_logits(attn_implementation, ids, torch.float32)
    hf_error = (_dense_logits(attn_implementation, ids, dtype) - reference).abs().max()
    error = (logits.float() - reference).abs().max()
    assert error <= 2 * hf_error + 1e-2, (error, hf_error)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@torch.no_grad()
def test_sparsify_triton_dense_then_sparse(impl):
    dtype = torch.float16
    model = fxsparse.sparsify(_model(impl, dtype), {"sparse_cfg": {"*attn*": {"threshold": 0.0, "backend": "triton"}}})
    ids = _ids(2, 1000)
    _assert_within_half_precision_error(model(ids).logits, ids, impl, dtype)

    fxsparse.set_threshold(model, 10.0)  # random weights give flat scores: only λ > 1 skips
    fxsparse.reset_stats(model)
    model.generate(ids, max_new_tokens=4, do_sample=False)
    stats = fxsparse.get_stats(model)
    assert all(site["prefill"]["valid"] > 0 and site["decode"]["valid"] > 0 for site in stats.values())
    assert sum(site["prefill"]["skipped"] for site in stats.values()) > 0


@torch.no_grad()
def test_generate_triton_at_zero_threshold_matches_dense_tokens():
    dense = _model("sdpa", torch.float32)
    ids = _ids(2, 300, seed=2)
    expected = dense.generate(ids, max_new_tokens=8, do_sample=False)
    sparse = fxsparse.sparsify(_model("sdpa", torch.float32), {"sparse_cfg": {"*attn*": {"threshold": 0.0, "backend": "triton"}}})
    assert torch.equal(sparse.generate(ids, max_new_tokens=8, do_sample=False), expected)


@torch.no_grad()
def test_compile_backend_with_inductor_on_cuda():
    dtype = torch.bfloat16
    model = _model("sdpa", dtype)
    config = {"sparse_cfg": {"*attn*": {"threshold": 0.0, "backend": "triton"}}}
    # the function itself: the device's Python may not have fxsparse installed (no entry point)
    backend = functools.partial(fxsparse_backend, options={"config": config, "inductor": True})
    compiled = torch.compile(model, backend=backend)
    ids = _ids(1, 700)
    _assert_within_half_precision_error(compiled(ids, use_cache=False).logits, ids, "sdpa", dtype)
    assert len(fxsparse.sites_of(model)) == 2


@torch.no_grad()
def test_transform_cuda_export():
    dtype = torch.float16
    model = _model("sdpa", dtype)
    ids = _ids(1, 512)
    program = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    sparse = fxsparse.transform(program, {"sparse_cfg": {"*attn*": {"threshold": 0.0, "backend": "triton"}}})
    sparse.validate()
    targets = {str(n.target) for n in sparse.graph.nodes if n.op == "call_function"}
    assert "fxsparse.skip_softmax_attention.default" in targets
    logits = sparse.module()(ids, use_cache=False).logits
    _assert_within_half_precision_error(logits, ids, "sdpa", dtype)
