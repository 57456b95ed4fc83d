"""Render the JSON of ``bench/accuracy.py`` as the markdown tables of ``bench/ACCURACY.md``.

    python bench/accuracy_report.py accuracy_results.json [more NIAH-only JSON ...]
"""

from __future__ import annotations

import json
import sys


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def calibration_table(results: dict) -> list[str]:
    cal = results["calibration"]
    lines = [f"Calibration: {cal['num_samples']} samples ({cal['num_passes']} measured passes), "
             f"{len(cal['trials'])} trial λ in [{cal['trials'][0]:.0e}, {cal['trials'][-1]:g}], "
             f"**{cal['seconds']:.0f} s** on {results['device']}.", "",
             "| phase | a | b | R² | points | observed S |", "|---|---|---|---|---|---|"]
    for phase, law in cal["laws"].items():
        if law is None:
            lines.append(f"| {phase} | — | — | — | — | — |")
            continue
        lines.append(f"| {phase} | {law['a']:.4g} | {law['b']:.3f} | {law['r2']:.3f} | {law['points']} | "
                     f"{law['observed_min']:.2f}–{law['observed_max']:.2f} |")
    if cal.get("site_laws"):
        for phase in cal["laws"]:
            fits = [laws[phase] for laws in cal["site_laws"].values() if phase in laws]
            if fits:
                r2 = sorted(f["r2"] for f in fits)
                lines.append(f"- per-site {phase}: {len(fits)}/{len(cal['site_laws'])} sites with their own law, "
                             f"a {min(f['a'] for f in fits):.3g}–{max(f['a'] for f in fits):.3g}, "
                             f"b {min(f['b'] for f in fits):.2f}–{max(f['b'] for f in fits):.2f}, "
                             f"R² median {r2[len(r2) // 2]:.2f} (min {r2[0]:.2f})")
    lines += [f"- warning: {w}" for w in cal["warnings"]]
    return lines


def heldout_table(results: dict) -> list[str]:
    lines = ["| target | phase | bin | achieved | error (points) | samples |", "|---|---|---|---|---|---|"]
    for target, rows in results.get("heldout", {}).items():
        for row in rows:
            error = 100 * (row["achieved"] - row["target"])
            lines.append(f"| {float(target):.1f} | {row['phase']} | {row['bin']} | {_pct(row['achieved'])} | "
                         f"{error:+.1f} | {row['samples']} |")
    return lines


def _kl(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def kl_table(results: dict) -> list[str]:
    """KL per law and (prefill, decode) target pair; older runs had one target and prefill positions only."""
    lines = ["| law | targets (prefill/decode) | KL, prefill positions | KL, decode positions | achieved prefill | "
             "achieved decode |", "|---|---|---|---|---|---|"]
    for row in results.get("kl", []):
        prefill, decode = row.get("targets") or (row["target"], row["target"])
        lines.append(f"| {row['law']} | {prefill:g}/{decode:g} | {_kl(row.get('kl_prefill', row.get('kl')))} | "
                     f"{_kl(row.get('kl_decode'))} | {_pct(row['achieved']['prefill'])} | "
                     f"{_pct(row['achieved'].get('decode'))} |")
    return lines


def _by_depth(row: dict) -> str:
    """Needles found per third of the prompt (shallow / middle / deep), when the row records them."""
    if "hits" not in row:
        return "—"
    thirds = [[0, 0], [0, 0], [0, 0]]
    for hit, depth in zip(row["hits"], row["depths"]):
        third = thirds[min(int(depth * 3), 2)]
        third[0] += hit
        third[1] += 1
    return " · ".join(f"{found}/{total}" for found, total in thirds)


def niah_table(results: dict) -> list[str]:
    lines = ["| length | config (prefill/decode target) | correct | found by needle depth (0–⅓ · ⅓–⅔ · ⅔–1) | achieved prefill | "
             "achieved decode | time |", "|---|---|---|---|---|---|---|"]
    for row in results.get("niah", []):
        lines.append(f"| {row['length']} | {row['config']} | {row['correct']}/{row['prompts']} | {_by_depth(row)} | "
                     f"{_pct(row['achieved']['prefill'])} | {_pct(row['achieved']['decode'])} | {row['seconds']:.0f} s |")
    return lines


def main(path: str, *niah_paths: str) -> None:
    results = json.loads(open(path).read())
    for extra in niah_paths:  # runs of ``accuracy.py --niah-only`` with the same laws
        results["niah"] = results.get("niah", []) + json.loads(open(extra).read())["niah"]
    law = results.get("law", "global")
    run = f"Run: {results['date']}, {results['device']}, law: {law}, args `{json.dumps(results['args'])}`."
    if results.get("seconds"):
        run += f" Seconds per step: {json.dumps(results['seconds'])}."
    sections = [[run]]
    if results.get("calibration"):  # absent when a run stopped before calibration finished
        sections.append(calibration_table(results))
    if results.get("heldout"):  # absent when the laws came from an earlier run
        sections += [
            ["Held-out check (samples not used for the fit; at each target, laws with per-length offsets are refitted "
             "there from the same measured passes, others are moved there with `set_target`):"],
            heldout_table(results),
        ]
    if results.get("kl"):
        sections += [["Global vs per-site law, KL of next-token distributions vs dense on plain essay text "
                      "(decode positions: the last tokens, fed one at a time after the prefill):"],
                     kl_table(results)]
    if results.get("niah"):
        sections += [["Needle in a haystack over the essays (greedy, 12 new tokens, correct = the 7-digit number appears):"],
                     niah_table(results)]
    print("\n\n".join("\n".join(section) for section in sections))


if __name__ == "__main__":
    main(*sys.argv[1:])
