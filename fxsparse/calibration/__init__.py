"""Calibration of the skip-softmax threshold law λ = a·exp(b·S)/L (SPEC §5).

``samples`` builds RULER-style prompts, ``measure`` counts skippable tiles for a whole grid of trial
thresholds in one dense pass, ``fit`` fits the law, and ``calibrate`` ties them together.
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
