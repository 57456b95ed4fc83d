"""How far the calibrated law's 1/L carries across length bins, from a calibration run's own passes.

The law sets λ = a·exp(b·S)/L, i.e. one scale factor sf = λ·L per target S at every length. Each
measured pass (``bench/accuracy.py`` saves them under "passes") holds, per site, the tiles every trial
λ would skip, so it tells which λ reaches a target on that pass. Per phase, target and length bin this
prints the sf that bin needs (median over its passes), the length exponent p of a fit λ_needed ∝ L^−p
(the law assumes p = 1), and the sparsity the saved laws reach in each bin on the same passes::

    python bench/law_length.py bench/results/accuracy_gpu_calib.json

A pass's sparsity at a λ between two trials is interpolated linearly in log λ. The in-sample numbers
are a proxy for the held-out check (they use the fit's own samples, and dense inputs at every layer).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

TARGETS = (0.3, 0.5, 0.7)


def load(path):
    run = json.load(open(path))
    log_trials = np.log(np.asarray(run["calibration"]["trials"]))
    passes = [dict(p, valid=np.asarray(p["valid"], float), skipped=np.asarray(p["skipped"], float))
              for p in run["passes"]]
    longest: dict[int, float] = {}
    for p in passes:  # a sample's bin: the power of two its longest pass fits in
        longest[p["sample"]] = max(longest.get(p["sample"], 0.0), p["kv_len"])
    for p in passes:
        p["bin"] = 1 << math.ceil(math.log2(longest[p["sample"]]))
    return run, log_trials, passes


def needed_log_lambda(p, log_trials, target):
    """log λ at which the pass's model-wide sparsity first reaches ``target`` (None: never in the grid)."""
    curve = np.maximum.accumulate(p["skipped"].sum(0) / p["valid"].sum())
    if not curve[0] <= target <= curve[-1]:
        return None
    i = int(np.searchsorted(curve, target))
    if i == 0 or curve[i] == curve[i - 1]:
        return float(log_trials[i])
    return float(np.interp(target, curve[i - 1 : i + 1], log_trials[i - 1 : i + 1]))


def achieved(passes, log_trials, laws, phase, target):
    """{bin: sparsity} the per-site laws {site index: (a, b)} reach on the passes of ``phase``."""
    totals: dict[int, list[float]] = {}
    for p in passes:
        if p["phase"] != phase:
            continue
        skipped = sum(np.interp(math.log(a * math.exp(b * target) / p["kv_len"]), log_trials, p["skipped"][site])
                      for site, (a, b) in laws.items())
        entry = totals.setdefault(p["bin"], [0.0, 0.0])
        entry[0] += skipped
        entry[1] += p["valid"].sum()
    return {b: s / v for b, (s, v) in sorted(totals.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a bench/accuracy.py JSON with calibration passes")
    args = parser.parse_args()
    run, log_trials, passes = load(args.run)
    site_laws = run["calibration"]["site_laws"]
    print("| phase | target | sf = λ·L each bin needs (median over passes) | λ_needed ∝ L^−p | saved laws reach, per bin |")
    print("|---|---|---|---|---|")
    for phase in ("prefill", "decode"):
        laws = {i: (law[phase]["a"], law[phase]["b"]) for i, law in enumerate(site_laws.values())} if site_laws else \
            {i: (run["calibration"]["laws"][phase]["a"], run["calibration"]["laws"][phase]["b"])
             for i in range(len(passes[0]["valid"]))}
        for target in TARGETS:
            by_bin: dict[int, list[tuple[float, float]]] = {}
            for p in passes:
                if p["phase"] == phase and (x := needed_log_lambda(p, log_trials, target)) is not None:
                    by_bin.setdefault(p["bin"], []).append((x, math.log(p["kv_len"])))
            medians = {b: (np.median([x for x, _ in v]), np.median([l for _, l in v])) for b, v in sorted(by_bin.items())}
            sf = ", ".join(f"{b // 1024}k {math.exp(x + l):.3g}" for b, (x, l) in medians.items())
            p_exp = -np.polyfit([l for _, l in medians.values()], [x for x, _ in medians.values()], 1)[0]
            reach = ", ".join(f"{b // 1024}k {100 * s:.0f} %" for b, s in achieved(passes, log_trials, laws, phase, target).items())
            print(f"| {phase} | {target} | {sf} | p = {p_exp:.2f} | {reach} |")


if __name__ == "__main__":
    main()
