"""``torch.compile(model, backend="fxsparse")``: the entry point, options, exact logits at λ = 0,
and in-place threshold changes reaching an Inductor-compiled graph without recompiling."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fxsparse
from fxsparse.backend import fxsparse_backend
from models import ARCHITECTURES, ATTENTION_IMPLEMENTATIONS, left_padded, random_ids, tiny_model

DENSE = {"sparse_cfg": {"*": {"threshold": 0.0, "br": 16, "bc": 16, "backend": "pytorch"}}}  # Falcon: self_attention


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_compile_with_fxsparse_backend_equals_dense(arch, impl):
    model = tiny_model(arch, impl)
    ids, mask = left_padded(2, 40, pad=5)
    expected = model(input_ids=ids, attention_mask=mask).logits
    compiled = torch.compile(model, backend="fxsparse", options={"config": DENSE, "inductor": False})
    logits = compiled(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (logits[valid] - expected[valid]).abs().max() < 1e-4
    assert len(fxsparse.sites_of(model)) == model.config.num_hidden_layers


@torch.no_grad()
def test_inductor_reads_thresholds_at_call_time():
    model = tiny_model("llama", "sdpa")
    ids = random_ids(2, 48)
    dense = model(ids, use_cache=False).logits
    counter = CompileCounterWithBackend(lambda gm, inputs: fxsparse_backend(gm, inputs, options={"config": DENSE}))
    compiled = torch.compile(model, backend=counter)
    torch.testing.assert_close(compiled(ids, use_cache=False).logits, dense, atol=1e-4, rtol=1e-4)
    frames = counter.frame_count

    fxsparse.set_threshold(model, 1e3)  # every tile after the first skips: a different answer
    sparse = compiled(ids, use_cache=False).logits
    assert (sparse - dense).abs().max() > 1e-3
    fxsparse.set_threshold(model, 0.0)
    torch.testing.assert_close(compiled(ids, use_cache=False).logits, dense, atol=1e-4, rtol=1e-4)
    assert counter.frame_count == frames
    assert all(s["prefill"]["valid"] > 0 for s in fxsparse.get_stats(model).values())
    with fxsparse.sites_of(model)["model.layers.0.self_attn"].measuring(torch.tensor([0.1, 1.0])):
        with pytest.raises(ValueError, match="changed shape"):
            compiled(ids, use_cache=False)


@torch.no_grad()
def test_mode_keyword_and_bad_options():
    model = tiny_model("qwen2", "eager")
    torch.compile(model, backend="fxsparse", mode="max-autotune-no-cudagraphs")(random_ids(1, 8))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown fxsparse option"):
        torch.compile(tiny_model("qwen2", "eager"), backend="fxsparse", options={"treshold": 1})(random_ids(1, 8))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"backend='fxsparse'\) does not calibrate"):
        torch.compile(tiny_model("qwen2", "eager"), backend="fxsparse",
                      options={"config": fxsparse.SKIP_SOFTMAX_CALIB})(random_ids(1, 8))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="config: missing 'sparse_cfg'"):  # an empty config is not the default
        torch.compile(tiny_model("qwen2", "eager"), backend="fxsparse", options={"config": {}})(random_ids(1, 8))
