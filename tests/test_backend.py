"""``torch.compile(model, backend="fxsparse")``: the entry point, options, exact logits at λ = 0,
and in-place threshold changes reaching an Inductor-compiled graph without recompiling."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoConfig, AutoModelForCausalLM

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


class _SelfAttention(torch.nn.Module):
    """Projections around SDPA in the module's own forward: the frame's own nodes carry no module path."""

    def __init__(self, heads: int = 2, head_dim: int = 16):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)
        self.out = torch.nn.Linear(heads * head_dim, heads * head_dim)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attention = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attention.transpose(1, 2).reshape(batch, length, width))


@torch.no_grad()
def test_attention_in_the_compiled_module_itself_gets_its_site_there():
    module = _SelfAttention().eval()
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(0))
    expected = module(x)
    compiled = torch.compile(module, backend="fxsparse", options={"config": DENSE, "inductor": False})
    torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)
    assert list(fxsparse.sites_of(module)) == ["attention"]
    assert isinstance(module.fxsparse_site, fxsparse.sites.SparseSite)
    fxsparse.set_threshold(module, 1e3)
    assert (compiled(x) - expected).abs().max() > 1e-3


@torch.no_grad()
def test_graph_break_inside_the_attention_forward():
    """JetMoe's attention breaks the graph (a data-dependent ``.tolist()`` in its expert routing), so
    Dynamo compiles the rest of its forward as a frame whose module is the attention itself."""
    config = AutoConfig.for_model("jetmoe", vocab_size=100, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, kv_channels=16,
                                  num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = random_ids(1, 40)
    expected = model(ids).logits
    fxsparse.sparsify(model, DENSE)
    assert list(fxsparse.sites_of(model)) == ["model.layers.0.self_attention", "model.layers.1.self_attention"]
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
    fxsparse.set_threshold(model, 1e3)
    assert (model(ids).logits - expected).abs().max() > 1e-3
