"""Fit of the threshold law ``λ = a·exp(b·S) / L^p`` from measured (λ, L, S) points.

Every measured pass gives, for each trial λ_t, a point ``(λ_t, Lk, S = skipped_t / valid)``. Points
with S in [0.1, 0.9] are fitted by least squares of ``ln λ = ln a + b·S − p·ln Lk``; the law then sets
``λ = a·exp(b·S_target) / Lk^p`` at run time::

    lam, kv_len, s = law_points(passes, "prefill", trials)
    law = fit_law(lam, kv_len, s)          # LawFit(a, b, r2, points, observed_min, observed_max, p)
    law.threshold(0.5, kv_len=4096)

Model Optimizer's law fixes p = 1 (one scale factor sf = λ·L at every length). On SmolLM2 the λ a
target needs falls faster, like L^−1.8…−2.5 (bench/ACCURACY.md), so the model-wide fit frees p when the
points span lengths; a site's fit keeps the model-wide p (``exponent=``), its own points being few.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np

from ..ops.threshold import KNOT_LOG2_LENGTHS
from .measure import Pass

FIT_RANGE = (0.1, 0.9)


@dataclass(frozen=True)
class LawFit:
    """``λ = a·exp(b·S + o(L)) / L^p`` with its goodness of fit and the sparsity range the data covered.

    ``r2`` is that of ln(λ·L^p) on S; ``p`` = 1 is Model Optimizer's law (sf = λ·L = a·exp(b·S)). ``offsets``: the
    knots of the per-length correction o(L) (``ops/threshold.py``; empty: none), set by ``length_offsets``.
    """

    a: float
    b: float
    r2: float
    points: int
    observed_min: float
    observed_max: float
    p: float = 1.0
    offsets: tuple[float, ...] = ()

    def scale_factor(self, sparsity: float) -> float:
        """a·exp(b·S): λ·L^p at every length."""
        return self.a * math.exp(self.b * sparsity)

    def threshold(self, sparsity: float, kv_len: float) -> float:
        return self.scale_factor(sparsity) * math.exp(float(self.log_offset(np.array(kv_len)))) / kv_len**self.p

    def log_offset(self, kv_len: np.ndarray) -> np.ndarray:
        """o(L) at each length: the knots interpolated linearly in log2 L, flat past the ends (0 without knots)."""
        if not self.offsets:
            return np.zeros(np.shape(kv_len))
        return np.interp(np.log2(kv_len), KNOT_LOG2_LENGTHS, self.offsets)

    def covers(self, sparsity: float) -> bool:
        return self.observed_min <= sparsity <= self.observed_max

    def scaled(self, factor: float) -> LawFit:
        """The same law with every threshold multiplied by ``factor``."""
        return replace(self, a=self.a * factor)

    def shifted(self, log_a: float, b: float, p: float) -> LawFit:
        """The law with ln λ moved by ``log_a + b·S − p·ln L``."""
        return replace(self, a=self.a * math.exp(log_a), b=self.b + b, p=self.p + p)

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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(λ, Lk, S) for every pass of ``phase`` and trial; S over all sites, or over ``site`` only."""
    trials = np.asarray(trials, dtype=np.float64)
    thresholds, kv_len, sparsity = [], [], []
    for p in passes:
        if p.phase != phase:
            continue
        valid = p.valid.sum() if site is None else p.valid[site]
        skipped = p.skipped.sum(0) if site is None else p.skipped[site]
        if valid <= 0:
            continue
        thresholds.append(trials)
        kv_len.append(np.full(trials.shape, float(p.kv_len)))
        sparsity.append(skipped / valid)
    if not thresholds:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return np.concatenate(thresholds), np.concatenate(kv_len), np.concatenate(sparsity)


def tiles_skipped(
    passes: Sequence[Pass],
    phase: str,
    trials: Sequence[float],
    laws: Sequence[LawFit],
    target: float,
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
    exponent = np.array([law.p for law in laws])
    log_offset = np.stack([law.log_offset(kv_len) for law in laws], axis=1)  # (P, N)
    log_threshold = log_sf[None, :] - exponent[None, :] * np.log(kv_len)[:, None] + log_offset
    upper = np.clip(np.searchsorted(log_trials, log_threshold), 1, log_trials.size - 1)
    lower = upper - 1
    weight = np.clip((log_threshold - log_trials[lower]) / (log_trials[upper] - log_trials[lower]), 0.0, 1.0)
    below = np.take_along_axis(skipped, lower[..., None], -1)[..., 0]
    above = np.take_along_axis(skipped, upper[..., None], -1)[..., 0]
    return (below + weight * (above - below)).sum(0), valid.sum(0)


def mean_sparsity(
    passes: Sequence[Pass], phase: str, trials: Sequence[float], laws: Sequence[LawFit], target: float
) -> float:
    """The tile-weighted mean sparsity over all sites of ``tiles_skipped`` (0 without valid tiles)."""
    skipped, valid = tiles_skipped(passes, phase, trials, laws, target)
    return float(skipped.sum() / max(valid.sum(), 1.0))


def length_bins_of(passes: Sequence[Pass]) -> dict[int, int]:
    """{sample: length bin}, the power of two the sample's longest prefill pass (its prompt) fits in, as the
    held-out check bins samples; decode steps may run past it."""
    prompt: dict[int, float] = {}
    for p in passes:
        if p.phase == "prefill":
            prompt[p.sample] = max(prompt.get(p.sample, 0.0), p.kv_len)
    for p in passes:
        prompt.setdefault(p.sample, p.kv_len)  # no prefill measured (a decode-only forward_loop)
    return {sample: 1 << max(0, math.ceil(math.log2(length))) for sample, length in prompt.items()}


def passes_by_bin(passes: Sequence[Pass], phase: str) -> dict[int, list[Pass]]:
    """{length bin: its passes of ``phase``} in increasing bin order, bins without such passes left out."""
    bins, groups = length_bins_of(passes), {}
    for p in passes:
        if p.phase == phase:
            groups.setdefault(bins[p.sample], []).append(p)
    return dict(sorted(groups.items()))


def solve_increasing(excess: Callable[[np.ndarray], np.ndarray], shape=(), bound: float = 20.0) -> np.ndarray:
    """Elementwise root of an increasing ``excess(x)`` in [-bound, bound] by bisection (a bound if none)."""
    low, high = np.full(shape, -bound), np.full(shape, bound)
    for _ in range(60):
        middle = (low + high) / 2
        below = excess(middle) < 0
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return (low + high) / 2


def fit_law(
    thresholds: np.ndarray,
    kv_len: np.ndarray,
    sparsity: np.ndarray,
    exponent: float | None = None,
    fit_range: tuple[float, float] = FIT_RANGE,
) -> LawFit | None:
    """Least squares of ln λ = ln a + b·S − p·ln Lk over points with S in ``fit_range``; None when they
    cannot fix a law. ``exponent`` fixes p; without it p is fitted when the points span at least a factor 2
    in length (else, or if the fitted p is outside [0, 4], p = 1)."""
    thresholds, kv_len, sparsity = (np.asarray(x, np.float64) for x in (thresholds, kv_len, sparsity))
    if sparsity.size == 0:
        return None
    keep = (sparsity >= fit_range[0]) & (sparsity <= fit_range[1]) & (thresholds > 0)
    x, log_lam, log_len = sparsity[keep], np.log(thresholds[keep]), np.log(kv_len[keep])
    if x.size < 3 or np.ptp(x) < 1e-6:
        return None
    if exponent is None:
        exponent = 1.0
        if np.ptp(log_len) >= math.log(2.0):
            design = np.stack([np.ones_like(x), x, -log_len], axis=1)
            fitted = float(np.linalg.lstsq(design, log_lam, rcond=None)[0][2])
            exponent = fitted if 0.0 <= fitted <= 4.0 else 1.0
    y = log_lam + exponent * log_len  # ln(λ·L^p) = ln a + b·S
    b, log_a = np.polyfit(x, y, 1)
    residual = y - (log_a + b * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if total > 0 else 0.0
    if not b > 0:
        return None  # sparsity must grow with the threshold; a flat or falling law is noise
    return LawFit(float(math.exp(log_a)), float(b), r2, int(x.size), float(sparsity.min()), float(sparsity.max()),
                  float(exponent))


MATCH_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def bin_correction(
    passes: Sequence[Pass],
    phase: str,
    trials: Sequence[float],
    laws: Sequence[LawFit],
    fit_exponent: bool,
    grid: Sequence[float] = MATCH_GRID,
) -> tuple[float, float, float]:
    """(c, d, q): moving every site's ln λ by ``c + d·S − q·ln L`` brings each length bin's tile-weighted mean
    sparsity closest to S over ``grid`` (q = 0 unless ``fit_exponent`` and the bins span a factor 2).

    Per bin and grid S it bisects the one ln-λ shift f that makes the bin reach S, then fits f by least squares
    weighted by dS/df, i.e. in sparsity: a bin where λ barely moves sparsity counts little. A bin that cannot
    reach S inside the trial grid gives no point; too few points give no correction.
    """
    points, shifts, slopes = [], [], []
    for group in passes_by_bin(passes, phase).values():
        log_len = float(np.mean([math.log(p.kv_len) for p in group]))
        for target in grid:
            def mean(shift: float) -> float:  # the bin's mean sparsity with every λ scaled by e^shift
                return mean_sparsity(group, phase, trials, [law.scaled(math.exp(shift)) for law in laws], target)

            shift = float(solve_increasing(lambda f: mean(float(f)) - target))
            slope = (mean(shift + 0.05) - mean(shift - 0.05)) / 0.1
            if abs(shift) < 19.0 and slope > 0:
                points.append((1.0, target, -log_len))
                shifts.append(shift)
                slopes.append(slope)
    design, shifts, slopes = np.array(points).reshape(-1, 3), np.array(shifts), np.array(slopes)
    columns = [0]
    if len(shifts) and np.ptp(design[:, 1]) > 0:
        columns.append(1)
    if fit_exponent and len(shifts) and np.ptp(design[:, 2]) >= math.log(2.0):
        columns.append(2)
    if len(shifts) < len(columns) + 1:
        return 0.0, 0.0, 0.0
    solution = np.linalg.lstsq(design[:, columns] * slopes[:, None], shifts * slopes, rcond=None)[0]
    coefficients = dict(zip(columns, solution))
    return tuple(float(coefficients.get(i, 0.0)) for i in range(3))
