"""The threshold state: one small tensor per attention site that every backend reads on device.

Layout, float32 of shape (2, 14): row 0 is prefill (Lq > 1), row 1 is decode (Lq == 1); columns::

    ENABLED   THRESHOLD   A   B   TARGET   P   OFFSET … (8 knots)
      1.0       λ_fixed   a   b     S      p   o(2^10) … o(2^17)

λ = 0 when ENABLED is 0; else a·exp(b·S + o(Lk))/Lk^p when a > 0 (the calibrated law), else λ_fixed. The length
exponent p is 1 unless calibration fitted it (the 1/L of Model Optimizer's law). o(Lk) is a per-length correction
of ln λ, linear in log2 Lk between knots at 1k, 2k, … 128k tokens and flat past either end (``length_offset``):
zero unless calibration fitted it (``length_offsets``), so that each length bin reaches the target.
Kernels read the state from memory, so changing any entry never recompiles anything.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

PREFILL, DECODE = 0, 1
ENABLED, THRESHOLD, A, B, TARGET, P, OFFSET = range(7)
OFFSET_KNOTS = 8  # o(L) at L = 2^FIRST_KNOT … 2^(FIRST_KNOT + 7): 1k … 128k tokens
FIRST_KNOT = 10
STATE_SHAPE = (2, OFFSET + OFFSET_KNOTS)
KNOT_LOG2_LENGTHS = tuple(float(FIRST_KNOT + i) for i in range(OFFSET_KNOTS))


def phase_of(query_len: int) -> int:
    """Decode when a single query row attends, else prefill."""
    return DECODE if query_len == 1 else PREFILL


def _per_phase(value: float | Mapping[str, float], name: str) -> tuple[float, float]:
    if isinstance(value, Mapping):
        if set(value) != {"prefill", "decode"}:
            raise ValueError(f"{name} per phase needs exactly the keys 'prefill' and 'decode', got {list(value)}")
        return float(value["prefill"]), float(value["decode"])
    return float(value), float(value)


def make_threshold_state(
    threshold: float | Mapping[str, float] = 0.0,
    *,
    law: Mapping[str, Mapping[str, float]] | None = None,
    target: float | Mapping[str, float] = 0.0,
    enabled: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build a (2, 14) state.

    Args:
        threshold: fixed λ, one number or ``{"prefill": λp, "decode": λd}``.
        law: calibrated ``{"prefill": {"a": .., "b": .., "p": .., "offsets": [..]}, "decode": {...}}`` (``p``
            optional, default 1; ``offsets`` optional, the 8 knots of o(L), default 0); overrides ``threshold`` for
            phases whose ``a`` is positive.
        target: target sparsity S for the law.
        enabled: False makes every phase dense.
    """
    state = torch.zeros(STATE_SHAPE, dtype=torch.float32, device=device)
    state[:, ENABLED] = float(enabled)
    state[:, P] = 1.0
    thresholds = _per_phase(threshold, "threshold")
    targets = _per_phase(target, "target")
    for phase, name in ((PREFILL, "prefill"), (DECODE, "decode")):
        if thresholds[phase] < 0 or not math.isfinite(thresholds[phase]):
            raise ValueError(f"threshold ({name}) must be a finite λ >= 0, got {thresholds[phase]}")
        state[phase, THRESHOLD] = thresholds[phase]
        state[phase, TARGET] = targets[phase]
        if law is not None and name in law:
            write_law(state[phase], law[name])
    return state


def write_law(row: torch.Tensor, params: Mapping[str, float]) -> None:
    """Write a calibrated law ``{"a", "b"[, "p"][, "offsets"]}`` into one phase's row of a state, in place."""
    row[A] = float(params["a"])
    row[B] = float(params["b"])
    row[P] = float(params.get("p", 1.0))
    row[OFFSET:] = torch.tensor(knot_offsets(params.get("offsets")))


def knot_offsets(offsets) -> list[float]:
    """The 8 knot values of o(L) from a law's optional ``offsets`` (None or empty: zeros)."""
    if not offsets:
        return [0.0] * OFFSET_KNOTS
    if len(offsets) != OFFSET_KNOTS or not all(math.isfinite(float(x)) for x in offsets):
        raise ValueError(f"law 'offsets' must be {OFFSET_KNOTS} finite ln-λ offsets (at 1k … 128k tokens), got {offsets}")
    return [float(x) for x in offsets]


def length_offset(offsets, kv_len: int):
    """o(Lk): the knots ``offsets`` (a sequence or a tensor) interpolated linearly in log2 Lk, flat past the ends.
    The kernels' ``log2_threshold`` computes the same."""
    t = min(max(math.log2(kv_len) - FIRST_KNOT, 0.0), OFFSET_KNOTS - 1.0)
    i = min(int(t), OFFSET_KNOTS - 2)
    return offsets[i] + (t - i) * (offsets[i + 1] - offsets[i])


def log_threshold(state: torch.Tensor, phase: int, kv_len: int) -> torch.Tensor:
    """ln λ for one phase as a 0-dim float32 tensor on the state's device (−inf means never skip)."""
    row = state[phase].float()
    length_term = torch.pow(torch.full_like(row[P], float(kv_len)), row[P])  # exactly Lk when p = 1
    law = row[A] * torch.exp(row[B] * row[TARGET] + length_offset(row[OFFSET:], kv_len)) / length_term
    lam = torch.where(row[A] > 0, law, row[THRESHOLD]) * row[ENABLED]
    return torch.log(lam)


def validate_threshold_state(state: torch.Tensor) -> None:
    if not isinstance(state, torch.Tensor) or tuple(state.shape) != STATE_SHAPE:
        shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise ValueError(f"threshold state must be a tensor of shape {STATE_SHAPE}, got {shape}")
