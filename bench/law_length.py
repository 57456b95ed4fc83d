"""How far the calibrated law carries across length bins, from a calibration run's own passes.

Model Optimizer's law sets λ = a·exp(b·S)/L, i.e. one scale factor sf = λ·L per target S at every
length; fxsparse fits λ = a·exp(b·S)/L^p (``fit_length_exponent``). Each
measured pass (``bench/accuracy.py`` saves them under "passes") holds, per site, the tiles every trial
λ would skip, so it tells which λ reaches a target on that pass. Per phase, target and length bin this
prints the sf that bin needs (median over its passes), the length exponent p of a fit λ_needed ∝ L^−p
(the law assumes p = 1), and the sparsity the saved laws reach in each bin on the same passes::

    python bench/law_length.py bench/results/accuracy_gpu_calib.json

A pass's sparsity at a λ between two trials is interpolated linearly in log λ. The in-sample numbers
are a proxy for the held-out check (they use the fit's own samples, and dense inputs at every layer).

``--heldout FILE`` (passes measured the same way on samples the fit never saw, e.g.
``bench/results/heldout_passes_cpu.json``) refits ``SKIP_SOFTMAX_CALIB``'s laws from the run's passes
(pooled per-site; capped and uncapped, each with p = 1 and with p fitted) and prints the sparsity each
reaches per held-out bin at targets 0.3 / 0.5 / 0.7, with the cells within ±5 points counted::

    python bench/law_length.py bench/results/accuracy_gpu_calib_pooled.json --heldout bench/results/heldout_passes_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from fxsparse.calibration.calibrate import cap_site_laws, fit_laws
from fxsparse.calibration.fit import LawFit, tiles_skipped
from fxsparse.calibration.measure import Pass
from fxsparse.config import SKIP_SOFTMAX_CALIB, SparseAttentionConfig

TARGETS = (0.3, 0.5, 0.7)


def trials_of(run) -> list[float]:
    return run["calibration"]["trials"] if "calibration" in run else run["trials"]


def load(path):
    """(run, ln trials, passes as ``Pass``, {sample: length bin}) of a JSON with measured passes."""
    run = json.load(open(path))
    log_trials = np.log(np.asarray(trials_of(run)))
    passes = [Pass(p["phase"], p["sample"], p["kv_len"], np.asarray(p["valid"], float), np.asarray(p["skipped"], float))
              for p in run["passes"]]
    longest: dict[int, float] = {}
    for p in passes:  # a sample's bin: the power of two its prompt fits in (decode steps may run past it)
        if p.phase == "prefill":
            longest[p.sample] = max(longest.get(p.sample, 0.0), p.kv_len)
    bins = {sample: 1 << math.ceil(math.log2(length)) for sample, length in longest.items()}
    return run, log_trials, passes, bins


def needed_log_lambda(p, log_trials, target):
    """log λ at which the pass's model-wide sparsity first reaches ``target`` (None: never in the grid)."""
    curve = np.maximum.accumulate(p.skipped.sum(0) / p.valid.sum())
    if not curve[0] <= target <= curve[-1]:
        return None
    i = int(np.searchsorted(curve, target))
    if i == 0 or curve[i] == curve[i - 1]:
        return float(log_trials[i])
    return float(np.interp(target, curve[i - 1 : i + 1], log_trials[i - 1 : i + 1]))


def achieved(passes, bins, trials, laws, phase, target):
    """{bin: sparsity} the per-site laws (``LawFit`` in site order) reach on the passes of ``phase``."""
    out = {}
    for bin_size in sorted(set(bins.values())):
        skipped, valid = tiles_skipped([p for p in passes if bins[p.sample] == bin_size], phase, trials, laws, target)
        if valid.sum():
            out[bin_size] = skipped.sum() / valid.sum()
    return out


def heldout_table(run, passes, heldout_run, heldout, heldout_bins) -> None:
    """Held-out sparsity per bin of the preset's per-site laws refitted from ``passes``: p = 1 or fitted,
    capped (the preset's ``per_site_cap``) or not."""
    preset = SparseAttentionConfig.from_dict(SKIP_SOFTMAX_CALIB).calibration
    names = [f"site {i}" for i in range(len(passes[0].valid))]
    trials, targets = trials_of(run), run["calibration"]["targets"]
    print("| law | phase | target | held-out sparsity per bin | within ±5 |")
    print("|---|---|---|---|---|")
    for cap in (preset.per_site_cap, None):
        for fit_exponent in (False, True):
            laws, site_laws, _ = fit_laws(passes, trials, targets, names, preset.per_site_weight, fit_exponent)
            if cap is not None:
                site_laws = cap_site_laws(site_laws, passes, trials, targets, cap)[0]
            within = cells = 0
            for phase in ("prefill", "decode"):
                chosen = [site_laws[name][phase] for name in names]
                label = (f"p = {laws[phase].p:.2f}" if fit_exponent else "p = 1") + (f", cap {cap:g}" if cap else "")
                for target in TARGETS:
                    reached = achieved(heldout, heldout_bins, trials_of(heldout_run), chosen, phase, target)
                    close = [abs(s - target) <= 0.05 for s in reached.values()]
                    within, cells = within + sum(close), cells + len(close)
                    row = ", ".join(f"{b // 1024}k {100 * s:.1f} %" for b, s in reached.items())
                    print(f"| {label} | {phase} | {target} | {row} | {sum(close)}/{len(close)} |")
            print(f"| **{within} of {cells} cells within ±5 points** | | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a bench/accuracy.py JSON with calibration passes")
    parser.add_argument("--heldout", help="passes measured on held-out samples: also print their per-bin sparsity")
    args = parser.parse_args()
    run, log_trials, passes, bins = load(args.run)
    if args.heldout:
        heldout_run, _, heldout, heldout_bins = load(args.heldout)
        heldout_table(run, passes, heldout_run, heldout, heldout_bins)
        return
    site_laws = run["calibration"]["site_laws"]
    print("| phase | target | sf = λ·L each bin needs (median over passes) | λ_needed ∝ L^−p | saved laws reach, per bin |")
    print("|---|---|---|---|---|")
    for phase in ("prefill", "decode"):
        laws = [LawFit(**law[phase]) for law in site_laws.values()] if site_laws else \
            [LawFit(**run["calibration"]["laws"][phase])] * len(passes[0].valid)
        for target in TARGETS:
            by_bin: dict[int, list[tuple[float, float]]] = {}
            for p in passes:
                if p.phase == phase and (x := needed_log_lambda(p, log_trials, target)) is not None:
                    by_bin.setdefault(bins[p.sample], []).append((x, math.log(p.kv_len)))
            medians = {b: (np.median([x for x, _ in v]), np.median([l for _, l in v])) for b, v in sorted(by_bin.items())}
            sf = ", ".join(f"{b // 1024}k {math.exp(x + l):.3g}" for b, (x, l) in medians.items())
            p_exp = -np.polyfit([l for _, l in medians.values()], [x for x, _ in medians.values()], 1)[0]
            reach = ", ".join(f"{b // 1024}k {100 * s:.0f} %" for b, s in achieved(passes, bins, trials_of(run), laws, phase, target).items())
            print(f"| {phase} | {target} | {sf} | p = {p_exp:.2f} | {reach} |")


if __name__ == "__main__":
    main()
