"""``calibrate``: prepare (samples, measuring mode) → run data → convert (fit, write the sites' buffers).

Policy lives here (which samples, which targets, global or per-site law, fallbacks); the mechanism
is in ``measure`` (counting) and ``fit`` (the law)::

    model = fxsparse.sparsify(model, config)          # rewritten, sites in place
    result = fxsparse.calibrate(model, SKIP_SOFTMAX_CALIB, tokenizer=tokenizer)
    print(result.format())
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..assets import essays_dir
from ..config import CalibrationConfig, SparseAttentionConfig
from ..ops.threshold import KNOT_LOG2_LENGTHS
from ..sites import PHASE_ROWS, SparseSite, sites_of
from .fit import (LawFit, bin_correction, fit_law, law_points, mean_sparsity, passes_by_bin, solve_increasing,
                  tiles_skipped)
from .measure import Recorder, merge_decode, run_sample, sparsity_by_phase, trial_grid
from .result import CalibrationResult, HeldoutRow
from .samples import Sample, build_samples

logger = logging.getLogger(__name__)


def _calibration_config(config: Any) -> CalibrationConfig:
    if isinstance(config, CalibrationConfig):
        return config
    if config is None:
        return CalibrationConfig()
    parsed = SparseAttentionConfig.from_dict(config)
    return parsed.calibration if parsed.calibration is not None else CalibrationConfig()


def _enabled_sites(model: nn.Module) -> dict[str, SparseSite]:
    sites = {name: site for name, site in sites_of(model).items() if site.enabled}
    if not sites:
        raise ValueError("calibrate: the model has no enabled sparse attention sites; run fxsparse.sparsify(model, config) first")
    return sites


def _fit_phase(passes, phase, trials, target, site=None, name="", exponent=None) -> tuple[LawFit | None, list[str]]:
    law = fit_law(*law_points(passes, phase, trials, site), exponent=exponent)
    where = f" ({name})" if name else ""
    if law is None:
        return None, [f"{phase}{where}: too few measured points with sparsity in [0.1, 0.9] to fit a law"]
    warnings = []
    if not law.covers(target):
        warnings.append(f"{phase}{where}: target {target:.2f} is outside the observed sparsity range "
                        f"{law.observed_min:.2f}-{law.observed_max:.2f}; the law extrapolates")
    return law, warnings


def fit_laws(passes, trials, targets, per_site_names=None, site_weight=1.0, fit_exponent=False):
    """The model-wide law per phase and, given ``per_site_names`` (in site order), a law per site.

    A site's law is its own fit pooled toward the model-wide law with ``site_weight`` (1: its own fit;
    ``LawFit.pooled_toward``); a site whose own points cannot fix a law gets the model-wide law. The
    length exponent p is fitted model-wide with ``fit_exponent`` (else p = 1) and shared by the sites.
    Returns ``(laws, site_laws, warnings)``.
    """
    laws, warnings = {}, []
    for phase in PHASE_ROWS:
        laws[phase], notes = _fit_phase(passes, phase, trials, targets[phase], exponent=None if fit_exponent else 1.0)
        warnings += notes
    site_laws: dict[str, dict[str, LawFit]] = {}
    for index, name in enumerate(per_site_names or []):
        own = {}
        for phase in PHASE_ROWS:
            shared = laws[phase].p if laws[phase] is not None else None  # the model-wide length exponent
            law, notes = _fit_phase(passes, phase, trials, targets[phase], site=index, name=name, exponent=shared)
            if law is not None and laws[phase] is not None:
                law = law.pooled_toward(laws[phase], site_weight)
            own[phase] = law if law is not None else laws[phase]
            warnings += [f"{n}; using the model-wide law" for n in notes if law is None]
        site_laws[name] = {p: law for p, law in own.items() if law is not None}
    if all(law is None for law in laws.values()) and not site_laws:
        raise RuntimeError("calibrate: no phase could be fitted; " + "; ".join(warnings))
    return laws, site_laws, warnings


def cap_site_laws(site_laws, passes, trials, targets, cap: float):
    """Per phase, no site sparser than ``cap`` × the target; the others share one λ factor (water-filling).

    Every site's law is scaled (its ``a``) by the smaller of two factors: one common to all sites, and its
    ceiling, the factor at which the site alone reaches ``cap`` × the target on the measured ``passes``.
    The common factor is bisected so that the passes reach the target on average (tile-weighted, so the
    long samples, where retrieval is lost, weigh most; ``match_length_bins`` then evens out the bins).

    Why: one law over-sparsifies the sites that skip easily, and SmolLM2's needle retrieval at 4k is lost
    there (bench/ACCURACY.md); capping them at the same mean sparsity kept the needles.
    Returns ``(laws per site, capped site names per phase, warnings)``.
    """
    out = {name: dict(laws) for name, laws in site_laws.items()}
    capped: dict[str, list[str]] = {}
    warnings = []
    for phase, target in targets.items():
        names = [name for name, laws in site_laws.items() if phase in laws]
        if not names or target <= 0:
            continue
        base = [site_laws[name][phase] for name in names]

        def scaled(log_factors: np.ndarray) -> list[LawFit]:
            return [law.scaled(math.exp(f)) for law, f in zip(base, np.broadcast_to(log_factors, len(base)))]

        def site_sparsity(log_factors: np.ndarray) -> np.ndarray:
            skipped, valid = tiles_skipped(passes, phase, trials, scaled(log_factors), target)
            return skipped / np.maximum(valid, 1.0)

        def mean(log_factors: np.ndarray) -> float:
            return mean_sparsity(passes, phase, trials, scaled(log_factors), target)

        ceiling = solve_increasing(lambda f: site_sparsity(f) - cap * target, len(names))
        common = solve_increasing(lambda f: mean(np.minimum(f, ceiling)) - target)
        reached = mean(np.minimum(common, ceiling))
        if abs(reached - target) > 0.01:
            warnings.append(f"{phase}: with each site capped at {cap:g}x the target, the calibration data reach "
                            f"{reached:.2f} on average, not the target {target:.2f}")
        capped[phase] = [name for name, limit in zip(names, ceiling) if limit < common]
        for name, law in zip(names, scaled(np.minimum(common, ceiling))):
            out[name][phase] = law
    return out, capped, warnings


def laws_by_site(laws, site_laws, names, phase) -> list[LawFit]:
    """Each site's law of ``phase`` in ``names`` order: its own when in ``site_laws``, else the model-wide one."""
    return [site_laws.get(name, {}).get(phase, laws[phase]) for name in names]


MATCH_ROUNDS = 3  # bin_correction linearises in ln λ; three rounds settle it to ~0.1 point on SmolLM2


def match_length_bins(laws, site_laws, names, passes, trials, fit_exponent: bool):
    """The laws with one correction per phase, the same for every site (``fit.bin_correction``), so that each
    length bin's mean sparsity on ``passes`` follows the target S for S in 0.2…0.8.

    Why: the fit is least squares in ln λ over single passes, and a per-site cap moves λ further; neither
    aims at what a held-out check measures, a bin's tile-weighted mean. On SmolLM2 the fitted laws missed it
    by up to 10 points per bin; matched, 10 of 12 held-out prefill cells (1k–8k × 0.3/0.5/0.7) land within 5 with
    real skipping (bench/ACCURACY.md).
    ``site_laws`` may be empty (one model-wide law); ``names`` are all sites in the passes' order.
    Returns ``(laws, site_laws, corrections)``, corrections per phase as ``(c, d, q)``.
    """
    laws, site_laws = dict(laws), {name: dict(fits) for name, fits in site_laws.items()}
    corrections = {}
    for phase in PHASE_ROWS:
        if laws.get(phase) is None:
            continue
        total = np.zeros(3)
        for _ in range(MATCH_ROUNDS):
            step = bin_correction(passes, phase, trials, laws_by_site(laws, site_laws, names, phase), fit_exponent)
            total += step
            laws[phase] = laws[phase].shifted(*step)
            for fits in site_laws.values():
                if phase in fits:
                    fits[phase] = fits[phase].shifted(*step)
        corrections[phase] = tuple(float(x) for x in total)
    return laws, site_laws, corrections


OFFSET_ROUNDS = 3  # a bin's lengths spread between knots, so one round lands near, not on, the target


def fit_length_offsets(laws, site_laws, names, passes, trials, targets):
    """The laws with one per-length correction o(L) of ln λ per phase, the same for every site, so that each length
    bin's tile-weighted mean sparsity on ``passes`` equals the target itself (``LawFit.offsets``).

    Per bin it bisects the ln-λ shift that brings the bin to the target; o(L) puts those shifts at the bins' mean
    log2 lengths and interpolates them onto the threshold state's knots (flat past the first and last bin). A bin
    the trial grid cannot bring to the target gives no point. Why: the law is smooth in S and L, and a short bin
    near its ceiling needs a λ no smooth law gives it without moving the other bins (bench/ACCURACY.md).
    Returns ``(laws, site_laws)``.
    """
    laws, site_laws = dict(laws), {name: dict(fits) for name, fits in site_laws.items()}
    for phase, target in targets.items():
        if laws.get(phase) is None or target <= 0:
            continue
        knots = np.zeros(len(KNOT_LOG2_LENGTHS))
        for _ in range(OFFSET_ROUNDS):
            chosen = laws_by_site(laws, site_laws, names, phase)
            positions, shifts = [], []
            for group in passes_by_bin(passes, phase).values():
                def excess(shift: np.ndarray) -> float:
                    scaled = [law.scaled(math.exp(float(shift))) for law in chosen]
                    return mean_sparsity(group, phase, trials, scaled, target) - target

                shift = float(solve_increasing(excess))
                if abs(shift) < 19.0:
                    positions.append(float(np.mean([math.log2(p.kv_len) for p in group])))
                    shifts.append(shift)
            if not shifts:
                break
            knots = knots + np.interp(KNOT_LOG2_LENGTHS, positions, shifts)
            laws[phase] = replace(laws[phase], offsets=tuple(float(x) for x in knots))
            for fits in site_laws.values():
                if phase in fits:
                    fits[phase] = replace(fits[phase], offsets=laws[phase].offsets)
    return laws, site_laws


BIN_TOLERANCE = 0.05  # a length bin further than this from its target on the calibration passes is reported


def bin_shortfalls(laws, site_laws, names, passes, trials, targets) -> list[str]:
    """Warnings for the length bins whose mean sparsity on ``passes`` misses the target by more than
    ``BIN_TOLERANCE`` under the final laws, with what that bin reaches at the largest trial λ.

    Why: the law is one curve in L, and a short bin can sit near its own ceiling (at 1k tokens every query
    tile keeps its first key tile, a fifth of the valid tiles), so some (bin, target) pairs stay out of reach;
    the user should hear it from calibration, not from the held-out table alone.
    """
    warnings = []
    for phase, target in targets.items():
        if laws.get(phase) is None or target <= 0:
            continue
        chosen = laws_by_site(laws, site_laws, names, phase)
        for size, group in passes_by_bin(passes, phase).items():
            reached = mean_sparsity(group, phase, trials, chosen, target)
            if abs(reached - target) > BIN_TOLERANCE:
                ceiling = sum(p.skipped[:, -1].sum() for p in group) / max(sum(p.valid.sum() for p in group), 1.0)
                warnings.append(f"{phase}: the {size}-token length bin reaches {reached:.2f} on the calibration "
                                f"samples, not the target {target:.2f} (at most {ceiling:.2f} at the largest trial λ)")
    return warnings


class FittedLaws(NamedTuple):
    laws: dict  # phase → the model-wide LawFit (None: not calibrated)
    site_laws: dict  # site → phase → LawFit (per_site only)
    capped: dict  # phase → the sites held at the cap
    corrections: dict  # phase → (c, d, q) of match_length_bins
    warnings: list


def laws_from_passes(passes, trials, targets, names, cfg: CalibrationConfig) -> FittedLaws:
    """The laws ``cfg`` makes of measured passes: fit (per site when ``per_site``), cap (``per_site_cap``),
    match to the length bins (``match_length_bins``). Deterministic: a saved run's passes give back the laws
    its calibration wrote, or those another config would write. ``names``: all sites, in the passes' order."""
    laws, site_laws, warnings = fit_laws(passes, trials, targets, names if cfg.per_site else None,
                                         cfg.per_site_weight, cfg.fit_length_exponent)
    capped, corrections = {}, {}
    if cfg.per_site and cfg.per_site_cap is not None:
        site_laws, capped, notes = cap_site_laws(site_laws, passes, trials, targets, cfg.per_site_cap)
        warnings += notes
    if cfg.match_length_bins:
        laws, site_laws, corrections = match_length_bins(laws, site_laws, names, passes, trials, cfg.fit_length_exponent)
    if cfg.length_offsets:
        laws, site_laws = fit_length_offsets(laws, site_laws, names, passes, trials, targets)
    warnings += bin_shortfalls(laws, site_laws, names, passes, trials, targets)
    return FittedLaws(laws, site_laws, capped, corrections, warnings)


def write_laws(sites, laws, site_laws, targets) -> None:
    """Write each site's law (its own when in ``site_laws``, else the model-wide one) and the targets."""
    for name, site in sites.items():
        chosen = site_laws.get(name, laws)
        law = {phase: {"a": fit.a, "b": fit.b, "p": fit.p, "offsets": list(fit.offsets)}
               for phase, fit in chosen.items() if fit is not None}
        site.set_law(law, targets)


@torch.no_grad()
def measure(model, sites, trials, samples: list[Sample], forward_loop, cfg: CalibrationConfig, dense: bool = True):
    """The passes of the user's ``forward_loop`` and the ``samples`` in measuring mode (``dense=False``: the
    sites skip at their laws while they count), decode steps merged per sample."""
    with Recorder(model, sites, trials, dense) as recorder:
        if forward_loop is not None:
            forward_loop(model)
        desc = "fxsparse calibration" + ("" if dense else " (skipping)")
        for index, sample in enumerate(tqdm(samples, desc=desc, leave=False)):
            recorder.sample = index
            run_sample(model, sample.input_ids, cfg.chunk_size, cfg.decode_steps)
    return merge_decode(recorder.passes)


@torch.no_grad()
def heldout_check(model, sites, samples: list[Sample], cfg: CalibrationConfig, targets) -> list[HeldoutRow]:
    """Run the calibrated (sparse) law on held-out samples; achieved sparsity per phase and bin."""
    totals: dict[tuple[str, int], list[int]] = {}
    for sample in tqdm(samples, desc="fxsparse held-out check", leave=False):
        for site in sites.values():
            site.reset_stats()
        run_sample(model, sample.input_ids, cfg.chunk_size, cfg.decode_steps)
        for phase, (skipped, valid) in sparsity_by_phase(sites).items():
            if valid:
                entry = totals.setdefault((phase, sample.bin), [0, 0, 0])
                entry[0] += skipped
                entry[1] += valid
                entry[2] += 1
    for site in sites.values():
        site.reset_stats()
    return [HeldoutRow(phase, bin_size, targets[phase], skipped / valid, count)
            for (phase, bin_size), (skipped, valid, count) in sorted(totals.items(), key=lambda kv: (kv[0][0] != "prefill", -kv[0][1]))]


def _sample_count(cfg: CalibrationConfig, forward_loop) -> int:
    """RULER-style samples to build: the fit's (unless the user's forward_loop replaces them) and the held-out ones."""
    return (0 if forward_loop else cfg.samples) + cfg.heldout_samples


def _model_tokenizer(model: nn.Module):
    """The tokenizer saved with the model, as HuggingFace finds it: ``AutoTokenizer`` at the model's
    ``name_or_path``, from local files only (calibration never downloads)."""
    from transformers import AutoTokenizer

    needed = "calibration needs tokenizer= (to build the calibration samples) or forward_loop="
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ValueError(f"{needed}; the model has no name_or_path to load its tokenizer from")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0]
        raise ValueError(f"{needed}; no tokenizer at the model's path {path!r} ({reason})") from error
    logger.info("calibration: %s loaded from the model's path %s", type(tokenizer).__name__, path)
    return tokenizer


def check_inputs(model: nn.Module, cfg: CalibrationConfig, forward_loop, tokenizer):
    """What calibration needs from the caller; ``sparsify`` checks it before rewriting the model.

    Returns the tokenizer: the one given, else (without ``forward_loop``) the one saved with the model.
    """
    if forward_loop is None and tokenizer is None:
        tokenizer = _model_tokenizer(model)
    if tokenizer is not None and _sample_count(cfg, forward_loop):
        essays_dir(cfg.data_dir)  # the samples are built from the essays: a missing folder is an error up front
    return tokenizer


def calibrate(
    model: nn.Module,
    config: Mapping[str, Any] | SparseAttentionConfig | CalibrationConfig | None = None,
    forward_loop: Callable[[nn.Module], Any] | None = None,
    tokenizer=None,
    trials: torch.Tensor | None = None,
) -> CalibrationResult:
    """Fit ``λ = a·exp(b·S + o(L))/L^p`` per phase (and per site when ``per_site``, capped with ``per_site_cap``),
    match it to the length bins' mean sparsity (``match_length_bins``, then ``length_offsets``) and write it into
    the sites; with ``refit_while_skipping``, measure again with the sites skipping at those laws and fit again.

    Args:
        model: a model rewritten by ``fxsparse.sparsify`` (its ``SparseSite`` modules are found by
            ``fxsparse.sites_of``); it is called as a HuggingFace causal LM.
        config: a sparse config with a ``calibration`` section (or a ``CalibrationConfig``).
        forward_loop: ``forward_loop(model)`` runs the user's own data instead of the RULER samples;
            every forward call is measured (decode is measured only if the loop decodes).
        tokenizer: the model's tokenizer, to build the RULER-style samples (needed without forward_loop,
            and for the held-out check). Without it and without forward_loop, the tokenizer saved at the
            model's ``name_or_path`` is loaded (local files only), as ``AutoTokenizer.from_pretrained`` would.
        trials: the trial λ grid (default ``trial_grid()``: 48 log-spaced values in [1e-6, 100]).
    Returns:
        a ``CalibrationResult``; ``result.format()`` is a summary table.
    """
    start = time.perf_counter()
    cfg = _calibration_config(config)
    sites = _enabled_sites(model)
    targets = cfg.target_sparse_ratio.to_dict()
    trials = trial_grid() if trials is None else trials
    tokenizer = check_inputs(model, cfg, forward_loop, tokenizer)
    was_training = model.training
    model.eval()

    # -- prepare: samples (the last heldout_samples of them are kept out of the fit) --
    samples: list[Sample] = []
    if tokenizer is not None:
        count = _sample_count(cfg, forward_loop)
        samples = build_samples(tokenizer, count, cfg.max_seqlen, seed=cfg.seed, data_dir=cfg.data_dir) if count else []
    split = len(samples) - cfg.heldout_samples if tokenizer is not None else 0
    fit_samples, heldout_samples = samples[:split], samples[split:]

    # -- run data (dense), fit, write the buffers; optionally measure again while skipping at those laws --
    trial_values = trials.tolist()
    rounds = (True, False) if cfg.refit_while_skipping else (True,)  # dense, then skipping at the first laws
    for dense in rounds:
        passes = measure(model, sites, trials, fit_samples, forward_loop, cfg, dense)
        fitted = laws_from_passes(passes, trial_values, targets, list(sites), cfg)
        write_laws(sites, fitted.laws, fitted.site_laws, targets)
    laws, site_laws, warnings = fitted.laws, fitted.site_laws, fitted.warnings
    for warning in warnings:
        logger.warning("calibration: %s", warning)

    heldout = heldout_check(model, sites, heldout_samples, cfg, targets) if heldout_samples else []
    model.train(was_training)
    result = CalibrationResult(laws, targets, cfg.per_site, len(fit_samples), len(passes), trial_values,
                               time.perf_counter() - start, site_laws, heldout, warnings, passes,
                               per_site_weight=cfg.per_site_weight if cfg.per_site else None,
                               per_site_cap=cfg.per_site_cap if cfg.per_site else None, capped=fitted.capped,
                               bin_corrections=fitted.corrections, refit_while_skipping=cfg.refit_while_skipping)
    logger.info("%s", result.format())
    return result
