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

``--heldout FILE`` (passes measured the same way on samples the fit never saw, from
``bench/heldout_passes.py``) refits ``SKIP_SOFTMAX_CALIB``'s laws from the run's passes, and the same
calibration with its per-site cap, fitted length exponent and bin matching each on or off, and prints the
sparsity each reaches per held-out bin at targets 0.3 / 0.5 / 0.7, with the cells within ±5 points
counted. ``--split N`` holds out the run's own samples from index N on instead::

    python bench/law_length.py bench/results/passes80_cpu.json --split 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np

from bench.accuracy import PRESET, SavedRun, law_variants, laws_for_targets
from fxsparse.calibration.fit import LawFit, length_bins_of, mean_sparsity, passes_by_bin

TARGETS = (0.3, 0.5, 0.7)


def load(path):
    """(the JSON, its passes as a ``SavedRun``, {sample: length bin}) of a file with measured passes."""
    run = json.load(open(path))
    saved = SavedRun.from_json(run)
    return run, saved, length_bins_of(saved.passes)


def needed_log_lambda(p, log_trials, target):
    """log λ at which the pass's model-wide sparsity first reaches ``target`` (None: never in the grid)."""
    curve = np.maximum.accumulate(p.skipped.sum(0) / p.valid.sum())
    if not curve[0] <= target <= curve[-1]:
        return None
    i = int(np.searchsorted(curve, target))
    if i == 0 or curve[i] == curve[i - 1]:
        return float(log_trials[i])
    return float(np.interp(target, curve[i - 1 : i + 1], log_trials[i - 1 : i + 1]))


def achieved(passes, trials, laws, phase, target):
    """{bin: sparsity} the per-site laws (``LawFit`` in site order) reach on the passes of ``phase``."""
    return {size: mean_sparsity(group, phase, trials, laws, target) for size, group in passes_by_bin(passes, phase).items()}


def heldout_table(saved: SavedRun, heldout) -> None:
    """Held-out sparsity per bin of ``SKIP_SOFTMAX_CALIB``'s laws refitted from ``saved``'s passes, of the same
    calibration with each of its steps (per-site cap, fitted length exponent, bin matching) off, and with the
    per-length offsets on (``length_offsets``: fitted at the target itself, so calibrated at each target in turn,
    and once more calibrated at the run's targets and moved, offsets and all; the others are fitted at the run's
    targets and moved to each target as ``set_target`` does)."""
    names = [f"site {i}" for i in range(len(saved.passes[0].valid))]
    print("| law | phase | target | held-out sparsity per bin | within ±5 |")
    print("|---|---|---|---|---|")
    variants = law_variants([PRESET.per_site_weight], [PRESET.per_site_cap, 0.0], [1, 0], [1, 0])
    default = next(iter(variants))
    with_offsets = dataclasses.replace(variants[default], length_offsets=True)
    variants = {f"{default} + length offsets": (with_offsets, True),
                f"{default} + length offsets, moved by set_target": (with_offsets, False),
                **{name: (cfg, False) for name, cfg in variants.items()}}
    for name, (cfg, at_each_target) in variants.items():
        within, fits = {}, laws_for_targets(saved, names, cfg, at_each_target)
        for phase in ("prefill", "decode"):
            for target in TARGETS:
                fitted = fits((target, target))
                chosen = [fitted.site_laws[site][phase] for site in names]
                reached = achieved(heldout, saved.trials, chosen, phase, target)
                close = [abs(s - target) <= 0.05 for s in reached.values()]
                within[phase] = [a + b for a, b in zip(within.get(phase, (0, 0)), (sum(close), len(close)))]
                row = ", ".join(f"{b // 1024}k {100 * s:.1f} %" for b, s in reached.items())
                print(f"| {name}, p = {chosen[0].p:.2f} | {phase} | {target} | {row} | {sum(close)}/{len(close)} |")
        print(f"| **{name}: within ±5 points in {within['prefill'][0]} of {within['prefill'][1]} prefill cells, "
              f"{within['decode'][0]} of {within['decode'][1]} decode** | | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a bench/accuracy.py JSON with calibration passes")
    parser.add_argument("--heldout", help="passes measured on held-out samples: print the laws' per-bin sparsity there")
    parser.add_argument("--split", type=int, help="as --heldout, with the run's own samples from this index on held out")
    args = parser.parse_args()
    run, saved, bins = load(args.run)
    passes, log_trials = saved.passes, np.log(np.asarray(saved.trials))
    if args.heldout or args.split is not None:
        if args.heldout:
            heldout = load(args.heldout)[1].passes
        else:
            heldout = [p for p in passes if p.sample >= args.split]
            saved = dataclasses.replace(saved, passes=[p for p in passes if p.sample < args.split])
        heldout_table(saved, heldout)
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
            reach = ", ".join(f"{b // 1024}k {100 * s:.0f} %" for b, s in achieved(passes, saved.trials, laws, phase, target).items())
            print(f"| {phase} | {target} | {sf} | p = {p_exp:.2f} | {reach} |")


if __name__ == "__main__":
    main()
