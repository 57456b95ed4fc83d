"""Fit of the threshold law ``sf = λ·L = a·exp(b·S)`` from measured (λ, L, S) points.

Every measured pass gives, for each trial λ_t, a point ``(sf = λ_t·Lk, S = skipped_t / valid)``.
Points with S in [0.1, 0.9] are fitted by least squares of ``ln sf = ln a + b·S``; the law then
sets ``λ = a·exp(b·S_target) / Lk`` at run time::

    sf, s = law_points(passes, "prefill", trials)
    law = fit_law(sf, s)           # LawFit(a, b, r2, points, observed_min, observed_max)
    law.threshold(0.5, kv_len=4096)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np

from .measure import Pass

FIT_RANGE = (0.1, 0.9)


@dataclass(frozen=True)
class LawFit:
    """``sf = a·exp(b·S)`` with its goodness of fit and the sparsity range the data covered."""

    a: float
    b: float
    r2: float
    points: int
    observed_min: float
    observed_max: float

    def scale_factor(self, sparsity: float) -> float:
        return self.a * math.exp(self.b * sparsity)

    def threshold(self, sparsity: float, kv_len: int) -> float:
        return self.scale_factor(sparsity) / kv_len

    def covers(self, sparsity: float) -> bool:
        return self.observed_min <= sparsity <= self.observed_max

    def scaled(self, factor: float) -> LawFit:
        """The same law with every threshold multiplied by ``factor``."""
        return replace(self, a=self.a * factor)

    def pooled_toward(self, model_wide: LawFit, weight: float) -> LawFit:
        """This (per-site) law moved toward the model-wide one: ln sf = w·own + (1 − w)·model-wide at every S.

        Partial pooling: a site's own points are few and noisy (R² ~0.6–0.8 on SmolLM2), the pooled fit is
        steady; w = 1 keeps the site's own law, w = 0 gives the model-wide law. Fit statistics stay the site's.
        """
        return replace(self, a=model_wide.a ** (1 - weight) * self.a**weight,
                       b=(1 - weight) * model_wide.b + weight * self.b)

    def to_dict(self) -> dict:
        return asdict(self)


def law_points(
    passes: Sequence[Pass], phase: str, trials: Sequence[float], site: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sf, S) for every pass of ``phase`` and trial; S over all sites, or over ``site`` only."""
    trials = np.asarray(trials, dtype=np.float64)
    sf, sparsity = [], []
    for p in passes:
        if p.phase != phase:
            continue
        valid = p.valid.sum() if site is None else p.valid[site]
        skipped = p.skipped.sum(0) if site is None else p.skipped[site]
        if valid <= 0:
            continue
        sf.append(trials * p.kv_len)
        sparsity.append(skipped / valid)
    if not sf:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(sf), np.concatenate(sparsity)


def tiles_skipped(
    passes: Sequence[Pass], phase: str, trials: Sequence[float], laws: Sequence[LawFit], target: float
) -> tuple[np.ndarray, np.ndarray]:
    """(skipped, valid) tiles per site, summed over the measured passes of ``phase``, had site i run
    ``laws[i]`` at ``target``. Each (pass, site) count is interpolated in ln λ between the trial
    thresholds it was measured at, clamped to the grid's ends."""
    chosen = [p for p in passes if p.phase == phase]
    if not chosen:
        return np.zeros(len(laws)), np.zeros(len(laws))
    valid = np.stack([p.valid for p in chosen]).astype(np.float64)  # (P, N)
    skipped = np.stack([p.skipped for p in chosen]).astype(np.float64)  # (P, N, T)
    kv_len = np.array([p.kv_len for p in chosen], dtype=np.float64)
    log_trials = np.log(np.asarray(trials, dtype=np.float64))
    log_sf = np.array([math.log(law.scale_factor(target)) for law in laws])
    log_threshold = log_sf[None, :] - np.log(kv_len)[:, None]  # (P, N)
    upper = np.clip(np.searchsorted(log_trials, log_threshold), 1, log_trials.size - 1)
    lower = upper - 1
    weight = np.clip((log_threshold - log_trials[lower]) / (log_trials[upper] - log_trials[lower]), 0.0, 1.0)
    below = np.take_along_axis(skipped, lower[..., None], -1)[..., 0]
    above = np.take_along_axis(skipped, upper[..., None], -1)[..., 0]
    return (below + weight * (above - below)).sum(0), valid.sum(0)


def solve_increasing(excess: Callable[[np.ndarray], np.ndarray], shape=(), bound: float = 20.0) -> np.ndarray:
    """Elementwise root of an increasing ``excess(x)`` in [-bound, bound] by bisection (a bound if none)."""
    low, high = np.full(shape, -bound), np.full(shape, bound)
    for _ in range(60):
        middle = (low + high) / 2
        below = excess(middle) < 0
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return (low + high) / 2


def fit_law(sf: np.ndarray, sparsity: np.ndarray, fit_range: tuple[float, float] = FIT_RANGE) -> LawFit | None:
    """Least squares of ln sf on S over points with S in ``fit_range``; None when they cannot fix a law."""
    sf, sparsity = np.asarray(sf, np.float64), np.asarray(sparsity, np.float64)
    if sparsity.size == 0:
        return None
    keep = (sparsity >= fit_range[0]) & (sparsity <= fit_range[1]) & (sf > 0)
    x, y = sparsity[keep], np.log(sf[keep])
    if x.size < 3 or np.ptp(x) < 1e-6:
        return None
    b, log_a = np.polyfit(x, y, 1)
    residual = y - (log_a + b * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if total > 0 else 0.0
    if not b > 0:
        return None  # sparsity must grow with the threshold; a flat or falling law is noise
    return LawFit(float(math.exp(log_a)), float(b), r2, int(x.size), float(sparsity.min()), float(sparsity.max()))
