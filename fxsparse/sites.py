"""Attention sites: what each rewritten attention subgraph carries, and how users steer it.

Every rewrite inserts one ``torch.ops.fxsparse.skip_softmax_attention`` call that reads three
buffers of a ``SparseSite``::

    threshold_state   float32 (2, 14)    λ or the calibrated law per phase, and the enable flag
    stats             int64   (2, 1 + T) [valid tiles, skipped tiles under each of T thresholds];
                                         (0, 2) when the site does not collect stats
    trial_thresholds  float32 (T,)       empty normally; the λ grid while calibration measures

The graph looks the buffers up at call time, so ``set_threshold``, ``set_law``, ``set_enabled`` and
``measuring`` change behaviour without recompiling anything.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Mapping

import torch
from torch import nn

from .config import PhaseValues, SiteConfig
from .ops.threshold import (A, B, DECODE, ENABLED, OFFSET, P, PREFILL, TARGET, THRESHOLD, make_threshold_state,
                            write_law)

PHASE_ROWS = {"prefill": PREFILL, "decode": DECODE}


class SparseSite(nn.Module):
    """One attention site (named by its module path, e.g. ``model.layers.3.self_attn``).

    Args:
        name: the site's module path.
        config: resolved settings (tile sizes, backend, threshold, enable).
        persistent: whether the buffers belong to the state_dict (True for exported programs).
    """

    def __init__(self, name: str, config: SiteConfig, persistent: bool = False):
        super().__init__()
        self.name = name
        self.config = config
        state = make_threshold_state(config.threshold.to_dict(), enabled=config.enable)
        self.register_buffer("threshold_state", state, persistent=persistent)
        self.register_buffer("stats", self._idle_stats(), persistent=persistent)
        self.register_buffer("trial_thresholds", torch.zeros(0), persistent=persistent)

    def _idle_stats(self, device=None) -> torch.Tensor:
        return torch.zeros(2 if self.config.collect_stats else 0, 2, dtype=torch.int64, device=device)

    def _apply(self, fn, recurse=True):
        # model.half() / .to(bfloat16) must not round λ or the law: kernels read them as float32
        float32 = {name: getattr(self, name) for name in ("threshold_state", "trial_thresholds")}
        super()._apply(fn, recurse)
        for name, before in float32.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                setattr(self, name, before.to(after.device))
        return self

    # -- steering (in place: the graph keeps reading the same tensors) --

    @property
    def enabled(self) -> bool:
        return bool(self.threshold_state[PREFILL, ENABLED] > 0)

    def set_enabled(self, enabled: bool) -> None:
        self.threshold_state[:, ENABLED] = float(enabled)

    def set_threshold(self, threshold: float | Mapping[str, float]) -> None:
        """Fixed λ per phase; clears any calibrated law."""
        values = PhaseValues.parse(threshold, f"{self.name}.threshold", 0.0, float("inf"))
        for phase, row in PHASE_ROWS.items():
            self.threshold_state[row, THRESHOLD] = getattr(values, phase)
            self.threshold_state[row, A] = 0.0
            self.threshold_state[row, B] = 0.0
            self.threshold_state[row, OFFSET:] = 0.0

    def set_law(self, law: Mapping[str, Mapping[str, float]], target: float | Mapping[str, float]) -> None:
        """Calibrated λ = a·exp(b·S + o(L))/L^p for the phases in ``law`` (``{"prefill": {"a": .., "b": .., "p": ..,
        "offsets": [..]}}``; ``p`` optional: 1, Model Optimizer's 1/L law; ``offsets`` optional: the 8 knots of the
        per-length correction o(L), ``ops/threshold.py``, else 0)."""
        for phase, params in law.items():
            row = PHASE_ROWS[phase]
            if not params["a"] > 0:
                raise ValueError(f"{self.name}: law 'a' must be > 0 for {phase}, got {params['a']}")
            write_law(self.threshold_state[row], params)
        self._write_target(self._parsed_target(target))

    def set_target(self, target: float | Mapping[str, float]) -> None:
        """Change the target sparsity S of the calibrated law; no recalibration needed. A law with per-length
        offsets keeps them, though they were fitted at the calibrated target: that warns (calibrating at the new
        target puts each length bin back on it)."""
        values = self._parsed_target(target)
        moved = [phase for phase, row in PHASE_ROWS.items() if self.threshold_state[row, OFFSET:].any()
                 and not math.isclose(float(self.threshold_state[row, TARGET]), getattr(values, phase),
                                      abs_tol=1e-6)]
        self._write_target(values)
        if moved:
            warnings.warn(f"new target sparsity: the per-length offsets of the {'/'.join(moved)} law were fitted at the "
                          "calibrated target and do not follow a new one (held-out length bins can move by a few "
                          "points); calibrate at the new target to fit them there", stacklevel=2)

    def _parsed_target(self, target: float | Mapping[str, float]) -> PhaseValues:
        return PhaseValues.parse(target, f"{self.name}.target_sparse_ratio", 0.0, 0.99)

    def _write_target(self, values: PhaseValues) -> None:
        for phase, row in PHASE_ROWS.items():
            self.threshold_state[row, TARGET] = getattr(values, phase)

    def law(self) -> dict[str, dict[str, float]] | None:
        """The calibrated ``{"prefill": {"a", "b", "p", "target"[, "offsets"]}, ...}`` (``offsets`` only when the
        per-length correction is not zero), or None when λ is fixed."""
        state = self.threshold_state.detach().cpu()
        phases = {}
        for phase, row in PHASE_ROWS.items():
            if state[row, A] > 0:
                phases[phase] = {"a": float(state[row, A]), "b": float(state[row, B]), "p": float(state[row, P]),
                                 "target": float(state[row, TARGET])}
                if state[row, OFFSET:].any():
                    phases[phase]["offsets"] = state[row, OFFSET:].tolist()
        return phases or None

    def thresholds(self) -> dict[str, float]:
        state = self.threshold_state.detach().cpu()
        return {phase: float(state[row, THRESHOLD]) for phase, row in PHASE_ROWS.items()}

    # -- statistics --

    def reset_stats(self) -> None:
        self.stats.zero_()

    def sparsity(self) -> dict[str, float | None]:
        """Skipped / valid tiles per phase since the last reset (None where nothing ran)."""
        stats = self.stats.detach().cpu()
        return {
            phase: (float(stats[row, 1]) / float(stats[row, 0]) if stats.numel() and stats[row, 0] > 0 else None)
            for phase, row in PHASE_ROWS.items()
        }

    @contextlib.contextmanager
    def dense(self) -> Iterator[None]:
        """Run dense (λ = 0) inside the block; each phase's enable flag is restored after."""
        enabled = self.threshold_state[:, ENABLED].clone()
        self.threshold_state[:, ENABLED] = 0.0
        try:
            yield
        finally:
            self.threshold_state[:, ENABLED] = enabled

    @contextlib.contextmanager
    def measuring(self, trial_thresholds: torch.Tensor, dense: bool = True) -> Iterator[None]:
        """Count, per phase, the tiles each trial λ would skip; run dense (``dense``) or at the site's own λ.

        The counts depend only on this site's scores, so they are the same either way; ``dense=False`` lets
        the later sites see the inputs a sparse model gives them. Inside the block ``stats`` has shape
        (2, 1 + T); it is restored (zeroed) after, and so is the enable flag.
        """
        device = self.threshold_state.device
        self.trial_thresholds = trial_thresholds.to(device=device, dtype=torch.float32)
        self.stats = torch.zeros(2, 1 + len(trial_thresholds), dtype=torch.int64, device=device)
        try:
            with self.dense() if dense else contextlib.nullcontext():
                yield
        finally:
            self.trial_thresholds = torch.zeros(0, device=device)
            self.stats = self._idle_stats(device)

    def describe(self) -> dict:
        """A plain-dict summary: settings, threshold or law, measured sparsity."""
        return {
            "name": self.name,
            "enabled": self.enabled,
            "br": self.config.br,
            "bc": self.config.bc,
            "backend": self.config.backend,
            "threshold": self.thresholds(),
            "law": self.law(),
            "sparsity": self.sparsity(),
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, br={self.config.br}, bc={self.config.bc}, backend={self.config.backend!r}"


def sites_of(model: nn.Module) -> dict[str, SparseSite]:
    """All sparse sites under ``model``, by site name, in module order."""
    return {m.name: m for m in model.modules() if isinstance(m, SparseSite)}
