"""Measurement: run data through the rewritten model while its sites count skippable tiles.

Mechanism only. While ``site.measuring(trials)`` is active the op runs dense (or, with ``dense=False``, at
the site's own λ) and adds, per phase,
``[valid tiles, tiles skipped under trial λ_0, ..., λ_{T-1}]`` to ``site.stats`` — the whole trial
grid in one pass. A forward hook on the model turns every forward call into one ``Pass`` record per
phase that ran (and resets the counters), with ``kv_len`` = the key length Lk of that call::

    with Recorder(model, sites, trials) as recorder:
        run_sample(model, input_ids, chunk_size=4096, decode_steps=8)   # or any forward_loop(model)
    recorder.passes   # [Pass(phase, sample, kv_len, valid (N,), skipped (N, T)), ...]

Prefill of a prompt longer than ``chunk_size`` goes through a ``DynamicCache`` in chunks (each
chunk has Lq = chunk, Lk = tokens so far); decode runs greedy steps (Lq = 1) after the prefill.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..sites import PHASE_ROWS, SparseSite


def trial_grid(num: int = 48, low: float = 1e-6, high: float = 100.0) -> torch.Tensor:
    """Log-spaced trial thresholds λ in [low, high].

    The grid reaches past λ = 1 (SPEC: "about 1e-6 … 0.99") because on SmolLM2-135M λ = 0.99 skips only
    ~60 % of the prefill tiles at 2k, so targets such as 0.7 would otherwise be extrapolated.
    """
    return torch.logspace(np.log10(low), np.log10(high), num, dtype=torch.float64).float()


@dataclass
class Pass:
    """Counts of one phase of one forward call, per site: valid (N,), skipped (N, T) under each trial."""

    phase: str
    sample: int
    kv_len: float
    valid: np.ndarray
    skipped: np.ndarray


def _kv_len(args, kwargs) -> int:
    """Lk of a causal-LM call: the attention mask's width, else cached length + new tokens."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int(mask.shape[-1])
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    return past + int(tokens.shape[1])


class Recorder:
    """Measuring mode on ``sites`` plus a hook that records one ``Pass`` per phase per forward call
    (``dense=False``: the sites skip at their own λ while they count)."""

    def __init__(self, model: nn.Module, sites: Mapping[str, SparseSite], trials: torch.Tensor, dense: bool = True):
        self.model, self.sites, self.trials, self.dense = model, dict(sites), trials, dense
        self.passes: list[Pass] = []
        self.sample = 0
        self._pending_len = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Recorder":
        for site in self.sites.values():
            self._stack.enter_context(site.measuring(self.trials, self.dense))
        pre = self.model.register_forward_pre_hook(self._before, with_kwargs=True)
        post = self.model.register_forward_hook(self._after)
        self._stack.callback(pre.remove)
        self._stack.callback(post.remove)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _before(self, module, args, kwargs):
        self._pending_len = _kv_len(args, kwargs)

    def _after(self, module, args, output):
        stats = torch.stack([site.stats.detach().cpu() for site in self.sites.values()]).numpy()  # (N, 2, 1+T)
        for site in self.sites.values():
            site.stats.zero_()
        for phase, row in PHASE_ROWS.items():
            valid = stats[:, row, 0]
            if valid.sum() > 0:
                self.passes.append(Pass(phase, self.sample, float(self._pending_len), valid, stats[:, row, 1:]))


def merge_decode(passes: Sequence[Pass]) -> list[Pass]:
    """One decode pass per sample (steps summed, kv_len averaged): fewer, less noisy fit points."""
    merged: dict[int, list[Pass]] = {}
    out = [p for p in passes if p.phase != "decode"]
    for p in passes:
        if p.phase == "decode":
            merged.setdefault(p.sample, []).append(p)
    for sample, group in merged.items():
        out.append(Pass("decode", sample, float(np.mean([p.kv_len for p in group])),
                        sum(p.valid for p in group), sum(p.skipped for p in group)))
    return out


def cache_kwargs(model: nn.Module) -> dict:
    """Keyword arguments that run ``model`` through a fresh DynamicCache (the argument is ``cache`` in
    newer transformers, ``past_key_values`` in older), keeping only the last position's logits."""
    from transformers import DynamicCache

    names = inspect.signature(model.forward).parameters
    kwargs = {"cache" if "cache" in names else "past_key_values": DynamicCache(), "use_cache": True}
    if "logits_to_keep" in names:
        kwargs["logits_to_keep"] = 1  # only the last position's logits: an 8k×49k float tensor is 1.6 GB
    return kwargs


@torch.no_grad()
def run_sample(model: nn.Module, input_ids: Sequence[int], chunk_size: int, decode_steps: int) -> list[int]:
    """Chunked prefill through a DynamicCache, then ``decode_steps`` greedy steps; returns the new tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    kwargs = cache_kwargs(model)
    logits = None
    for start in range(0, ids.shape[1], chunk_size):
        logits = model(input_ids=ids[:, start : start + chunk_size], **kwargs).logits
    generated = []
    for _ in range(decode_steps):
        token = logits[:, -1:].argmax(-1)
        generated.append(int(token))
        logits = model(input_ids=token, **kwargs).logits
    return generated


def sparsity_by_phase(sites: Mapping[str, SparseSite]) -> dict[str, tuple[int, int]]:
    """(skipped, valid) tiles per phase summed over ``sites`` (normal mode stats, shape (2, 2))."""
    out = {}
    for phase, row in PHASE_ROWS.items():
        valid = sum(int(site.stats[row, 0]) for site in sites.values())
        skipped = sum(int(site.stats[row, 1]) for site in sites.values())
        out[phase] = (skipped, valid)
    return out
