"""Calibration of the skip-softmax threshold law λ = a·exp(b·S + o(L))/L^p (SPEC §5; p = 1 and o = 0 unless
fitted).

``samples`` builds RULER-style prompts, ``measure`` counts skippable tiles for a whole grid of trial
thresholds in one pass (dense, or skipping at fitted laws), ``fit`` fits the law, and ``calibrate`` ties them together (per-site
pooling and the per-site sparsity cap are its policy).
"""

from .calibrate import calibrate
from .fit import LawFit, fit_law, law_points
from .measure import trial_grid
from .result import CalibrationResult, HeldoutRow
from .samples import Sample, build_samples, length_bins

__all__ = [
    "calibrate",
    "CalibrationResult",
    "HeldoutRow",
    "LawFit",
    "Sample",
    "build_samples",
    "fit_law",
    "law_points",
    "length_bins",
    "trial_grid",
]
