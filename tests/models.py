"""Tiny random HuggingFace causal LMs, built in-process (no hub access): hidden 64, 2 layers."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3", "gpt2", "falcon")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
VOCAB = 100
PAD = 0

_SHAPES = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "mistral": dict(sliding_window=24),  # shorter than the test prompts, so the window masks
}


def tiny_config(arch: str):
    decoder = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    shape = _SHAPES["gpt2"] if arch == "gpt2" else {**decoder, **_SHAPES.get(arch, {})}
    return AutoConfig.for_model(
        arch, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **shape
    )


def tiny_model(arch: str, attn_implementation: str, seed: int = 0) -> torch.nn.Module:
    """A float32 eval-mode model with random weights (seeded, without touching the global RNG)."""
    config = tiny_config(arch)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = PAD
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_padded(batch: int, length: int, pad: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) where the first row starts with ``pad`` padding tokens."""
    ids = random_ids(batch, length, seed)
    mask = torch.ones_like(ids)
    ids[0, :pad], mask[0, :pad] = PAD, 0
    return ids, mask
