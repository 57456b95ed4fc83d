"""Structured attention inputs for the benchmarks: the score patterns that make real models sparse.

Random Gaussian q, k give nearly flat attention (no tile is far below the running max until λ ≥ 1),
so benchmarks on them say nothing about skip-softmax. ``structured_qkv`` builds q, k, v whose scores
(q·kᵀ/√D) have the three features long-context models show:

- **attention sinks**: the first ``sinks`` keys score high for every query (they set the running max early);
- **a local band**: a positional code whose correlation decays with distance over many scales (frequencies
  log-uniform between 1/L and 1/16), so nearby keys score high and far ones progressively lower;
- **retrieval spikes**: a few key positions (``spike_rate`` per key) that a short run of later queries matches.

**The sparsity knob is ``concentration``** (default 1.0): it scales the structured part against unit-variance
noise. Larger values make far tiles fall further below the running max, so a given λ skips more tiles.
The benchmarks choose λ for a target sparsity by measuring (``lambdas_for_sparsity``), not by formula.
"""

from __future__ import annotations

import math

import torch


def structured_qkv(
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    concentration: float = 1.0,
    sinks: int = 4,
    spike_rate: float = 1 / 1024,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    seed: int = 0,
    num_queries: int | None = None,
):
    """q (B, Hq, Lq, D), k and v (B, Hkv, L, D) with sinks, a local band and retrieval spikes.

    ``num_queries``: build q for the last Lq positions only (decode: 1); default all L.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    group = num_heads // num_kv_heads
    half = head_dim // 2
    amp = concentration * (12.0 / math.sqrt(head_dim)) ** 0.5  # near-diagonal scores ≈ 12·concentration²

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    # -- positional code: <code_s, code_t> = mean over frequencies of cos(ω (s − t)) --
    log_lo, log_hi = math.log(1.0 / seq_len), math.log(1.0 / 16)
    omega = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(batch, num_kv_heads, 1, half, generator=gen, device=device))
    angle = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * omega
    code = torch.cat([torch.cos(angle), torch.sin(angle)], -1) * math.sqrt(head_dim / half)  # ‖code‖² = D

    k = amp * code + randn(batch, num_kv_heads, seq_len, head_dim)
    num_queries = seq_len if num_queries is None else num_queries
    first_query = seq_len - num_queries
    q = amp * code[:, :, first_query:].repeat_interleave(group, 1) + randn(batch, num_heads, num_queries, head_dim)

    # -- sinks: one direction every query shares, carried by the first keys --
    sink_dir = randn(batch, num_kv_heads, 1, head_dim)
    sink_dir = sink_dir / sink_dir.norm(dim=-1, keepdim=True) * math.sqrt(head_dim)
    k[:, :, :sinks] += 1.2 * amp * sink_dir
    q += 0.8 * amp * sink_dir.repeat_interleave(group, 1)

    # -- retrieval spikes: key p carries a code r, a run of 16 later queries asks for it --
    num_spikes = max(1, int(seq_len * spike_rate))
    positions = torch.randint(sinks, seq_len, (num_spikes,), generator=gen, device=device).tolist()
    for p in positions:
        r = randn(batch, num_kv_heads, 1, head_dim)
        r = r / r.norm(dim=-1, keepdim=True) * math.sqrt(head_dim)
        k[:, :, p : p + 1] += 1.5 * amp * r
        start = int(torch.randint(max(p, first_query), seq_len, (1,), generator=gen, device=device)) - first_query
        q[:, :, start : start + 16] += 1.5 * amp * r.repeat_interleave(group, 1)

    v = randn(batch, num_kv_heads, seq_len, head_dim)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def lambdas_for_sparsity(q, k, v, causal: bool, trials: torch.Tensor, targets) -> dict[float, tuple[float, float]]:
    """For each target sparsity, the λ whose measured tile sparsity (br = bc = 128) is closest: one counting pass
    of the Triton kernel over ``trials`` (ascending), then one over a geometric grid between the two trials that
    bracket each target (a coarse grid alone can land several points off: 67.8 % for ~70 % at 64k).

    Returns {target: (λ, the sparsity measured for it)}.
    """
    lams, sparsity = trials.double(), _tile_sparsity(q, k, v, causal, trials)
    finer = []
    for t in targets:  # sparsity does not fall as λ grows
        above = int(torch.searchsorted(sparsity, torch.tensor([t], dtype=sparsity.dtype)))
        if 0 < above < len(lams):
            finer.append(torch.logspace(lams[above - 1].log10(), lams[above].log10(), 10, dtype=torch.float64)[1:-1])
    if finer:
        finer = torch.cat(finer)
        lams, sparsity = torch.cat([lams, finer]), torch.cat([sparsity, _tile_sparsity(q, k, v, causal, finer)])
    best = {t: int((sparsity - t).abs().argmin()) for t in targets}
    return {t: (float(lams[i]), float(sparsity[i])) for t, i in best.items()}


def _tile_sparsity(q, k, v, causal: bool, trials: torch.Tensor) -> torch.Tensor:
    """The tile sparsity of the prefill phase at each trial λ, from one counting pass."""
    from fxsparse.ops import triton_attention
    from fxsparse.ops.threshold import make_threshold_state, phase_of

    stats = torch.zeros(2, 1 + len(trials), dtype=torch.int64, device=q.device)
    zero = make_threshold_state(0.0, device=q.device)
    triton_attention.skip_softmax_attention(q, k, v, None, causal, q.shape[-1] ** -0.5, zero, 128, 128, stats,
                                            trials.float().to(q.device))
    counts = stats[phase_of(q.shape[2])].cpu()
    return counts[1:].double() / max(counts[0].item(), 1)
