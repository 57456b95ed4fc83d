"""What calibration returns: the fitted laws, the held-out check, warnings and timing."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ops.threshold import FIRST_KNOT
from .fit import LawFit


@dataclass
class HeldoutRow:
    """Sparsity the calibrated law achieved on held-out samples of one phase and length bin."""

    phase: str
    bin: int
    target: float
    achieved: float
    samples: int

    @property
    def error(self) -> float:
        return self.achieved - self.target


@dataclass
class CalibrationResult:
    """Result of ``fxsparse.calibrate``.

    Attributes:
        laws: the model-wide law per phase (fitted in both modes; written to the sites unless per_site).
        site_laws: per site and phase, the law written to that site (per_site mode only).
        targets: target sparsity per phase.
        heldout: achieved vs target per phase and length bin on held-out samples.
        warnings: targets outside the observed range, phases or sites left uncalibrated.
        passes: the measured ``measure.Pass`` records (not in ``to_dict``): rebuild the written
            laws (or another config's) with ``calibration.calibrate.laws_from_passes`` without measuring again.
        per_site_weight: how far the site laws keep their own fit (``LawFit.pooled_toward``), per_site only.
        per_site_cap: the sparsity cap, as a multiple of the target (``calibrate.cap_site_laws``); None: none.
        capped: per phase, the sites held at the cap.
        bin_corrections: per phase, the (c, d, q) that ``calibrate.match_length_bins`` added to every law's
            ln λ as ``c + d·S − q·ln L``; empty when it was off.
        refit_while_skipping: the passes (and laws) come from a second measurement with the sites skipping
            at the first fit's laws.
    """

    laws: dict[str, LawFit | None]
    targets: dict[str, float]
    per_site: bool
    num_samples: int
    num_passes: int
    trials: list[float]
    seconds: float
    site_laws: dict[str, dict[str, LawFit]] = field(default_factory=dict)
    heldout: list[HeldoutRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    passes: list = field(default_factory=list, repr=False)  # the raw measurements (fit.law_points), to refit
    per_site_weight: float | None = None
    per_site_cap: float | None = None
    capped: dict[str, list[str]] = field(default_factory=dict)
    bin_corrections: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    refit_while_skipping: bool = False

    def to_dict(self) -> dict:
        return {
            "laws": {p: (law.to_dict() if law else None) for p, law in self.laws.items()},
            "targets": dict(self.targets),
            "per_site": self.per_site,
            "per_site_weight": self.per_site_weight,
            "per_site_cap": self.per_site_cap,
            "capped": {phase: list(names) for phase, names in self.capped.items()},
            "bin_corrections": {phase: list(c) for phase, c in self.bin_corrections.items()},
            "refit_while_skipping": self.refit_while_skipping,
            "site_laws": {s: {p: law.to_dict() for p, law in laws.items()} for s, laws in self.site_laws.items()},
            "heldout": [{**vars(row), "error": row.error} for row in self.heldout],
            "num_samples": self.num_samples,
            "num_passes": self.num_passes,
            "trials": list(self.trials),
            "seconds": self.seconds,
            "warnings": list(self.warnings),
        }

    def format(self) -> str:
        """A plain-text summary table."""
        mode = "one law for all sites"
        if self.per_site:
            mode = "per site" if self.per_site_weight in (None, 1.0) else \
                f"per site, pooled toward the model-wide law (weight {self.per_site_weight:g})"
            if self.per_site_cap is not None:
                held = ", ".join(f"{len(names)} {phase}" for phase, names in self.capped.items())
                mode += f", capped at {self.per_site_cap:g}x the target ({held} sites at the cap)"
        if self.bin_corrections:
            mode += ", matched to the length bins"
        if self.refit_while_skipping:
            mode += ", refitted on a skipping model's counts"
        lines = [f"calibration: {self.num_samples} samples, {self.num_passes} measured passes, "
                 f"{len(self.trials)} trial thresholds, {mode}, {self.seconds:.1f} s",
                 f"{'phase':<8} {'target':>6} {'a':>11} {'b':>8} {'p':>6} {'R^2':>6} {'points':>6} {'observed S':>13}"]
        for phase, law in self.laws.items():
            target = self.targets.get(phase, float("nan"))
            if law is None:
                lines.append(f"{phase:<8} {target:>6.2f}  not calibrated (no usable points)")
                continue
            lines.append(f"{phase:<8} {target:>6.2f} {law.a:>11.4g} {law.b:>8.3f} {law.p:>6.3f} {law.r2:>6.3f} "
                         f"{law.points:>6d} {law.observed_min:>6.2f}-{law.observed_max:<6.2f}")
            if law.offsets:
                knots = " ".join(f"{(1 << (FIRST_KNOT + i)) // 1024}k {x:+.2f}" for i, x in enumerate(law.offsets))
                lines.append(f"{'':<8} per-length offsets of ln λ: {knots}")
        if self.site_laws:
            lines.append(f"per-site laws ({len(self.site_laws)} sites):")
            for site, laws in self.site_laws.items():
                text = "  ".join(f"{p}: a={law.a:.4g} b={law.b:.3f} R^2={law.r2:.2f}" for p, law in laws.items())
                lines.append(f"  {site}: {text}")
        if self.heldout:
            lines.append("held-out check (achieved sparsity of the calibrated law):")
            lines.append(f"  {'phase':<8} {'bin':>6} {'target':>6} {'achieved':>8} {'error':>6} {'samples':>7}")
            for row in self.heldout:
                lines.append(f"  {row.phase:<8} {row.bin:>6d} {row.target:>6.2f} {row.achieved:>8.3f} "
                             f"{row.error:>+6.3f} {row.samples:>7d}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)
