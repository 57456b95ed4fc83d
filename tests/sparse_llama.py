"""A tiny HuggingFace Llama whose attention calls ``fxsparse::skip_softmax_attention`` with the
buffers of a ``SparseSite`` per layer — the same contract as a model rewritten by ``fxsparse.sparsify``
(the op reads ``site.threshold_state``, ``site.stats`` and ``site.trial_thresholds`` at call time).

Used by the calibration tests so they do not depend on the graph rewrite.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from fxsparse.config import SiteConfig
from fxsparse.sites import SparseSite

ATTENTION = "fxsparse_test_sites"


def _site_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    site = module.fxsparse_site
    mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]
    causal = mask is None and query.shape[2] > 1
    out = torch.ops.fxsparse.skip_softmax_attention(
        query, key, value, mask, causal, float(scaling), site.threshold_state, site.config.br, site.config.bc,
        "pytorch", site.stats, site.trial_thresholds,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _site_attention)


def tiny_llama(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 1000,
               br: int = 64, bc: int = 64, seed: int = 0, sharpness: float = 4.0) -> LlamaForCausalLM:
    """A random-weight Llama with one SparseSite per attention module (named like the rewrite names them)."""
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=8192)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    torch.random.set_rng_state(generator_state)
    for layer in model.model.layers:  # peaky attention, as in trained models (random weights give none)
        layer.self_attn.q_proj.weight.data *= sharpness
        layer.self_attn.k_proj.weight.data *= sharpness
    return attach_sites(model, br, bc)


def attach_sites(model, br: int = 128, bc: int = 128):
    """Give every attention module of an HF Llama a SparseSite and route attention through the op."""
    model.config._attn_implementation = ATTENTION
    for index, layer in enumerate(model.model.layers):
        site_config = SiteConfig(br=br, bc=bc, backend="pytorch")
        layer.self_attn.fxsparse_site = SparseSite(f"model.model.layers.{index}.self_attn", site_config)
    return model
