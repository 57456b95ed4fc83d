"""How many V tiles decode must read on a real model: tiles kept per query head vs by any head of a GQA group.

For Lq = 1 every query head votes for itself (SPEC §4), but the G = Hq/Hkv heads of one KV head share
its V, so a decode kernel reads V for every tile that *any* of them keeps. Decode's bytes, and so its
best speed-up over dense, follow the group's union, not the per-head sparsity the stats report
(``bench/RESULTS.md``). This measures both on SmolLM2-135M-Instruct (9 query heads, 3 KV heads), with
calibrated laws at the same target in both phases, on essay text: a prefill of ``--length`` tokens,
then ``--decode`` greedy steps::

    PYTHONPATH=. python bench/gqa_union.py --laws-from bench/results/accuracy_gpu_calib_pooled.json

Every decode call of every site is run through the exact reference with its tile gaps recorded; a tile
is kept by a head iff its gap m̃ − m ≥ ln λ, with λ the call's own (the site's law at its target).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from unittest import mock

import torch

from fxsparse.calibration.calibrate import write_laws
from fxsparse.calibration.measure import run_sample
from fxsparse.ops import op as op_module
from fxsparse.ops.reference import reference_attention
from fxsparse.ops.threshold import DECODE, log_threshold

from bench.accuracy import PRESET, SavedRun, _kl_text, saved_laws, sparse_smollm2


class UnionCounter:
    """Wraps ``reference_attention``: for decode calls, valid tiles kept per head and per KV-head group."""

    def __init__(self):
        self.valid_heads = self.kept_heads = self.valid_groups = self.kept_groups = 0

    def __call__(self, q, k, v, attn_mask, is_causal, scale, threshold_state, br, bc, stats=None, trials=None):
        if q.shape[2] != 1:
            return reference_attention(q, k, v, attn_mask, is_causal, scale, threshold_state, br, bc, stats, trials)
        gaps: list[torch.Tensor] = []
        out = reference_attention(q, k, v, attn_mask, is_causal, scale, threshold_state, br, bc, stats, trials, gaps)
        gap = torch.stack(gaps, -1)[:, :, 0]  # (B, Hq, key tiles)
        log_lam = log_threshold(threshold_state, DECODE, k.shape[2])
        valid, keep = gap > float("-inf"), gap >= log_lam
        batch, num_kv_heads = k.shape[:2]
        grouped = (batch, num_kv_heads, q.shape[1] // num_kv_heads, gap.shape[-1])
        self.valid_heads += int(valid.sum())
        self.kept_heads += int(keep.sum())
        self.valid_groups += int(valid.reshape(grouped).any(2).sum())
        self.kept_groups += int(keep.reshape(grouped).any(2).sum())
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--laws-from", required=True, help="a bench/accuracy.py JSON with calibrated laws")
    parser.add_argument("--site-weight", type=float, default=0.5, help="pooling weight of the per-site laws")
    parser.add_argument("--targets", default="0.5,0.7", help="targets, the same for both phases")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model, tokenizer, sites = sparse_smollm2()
    cfg = dataclasses.replace(PRESET, per_site_weight=args.site_weight, per_site_cap=None, fit_length_exponent=False,
                              match_length_bins=False, length_offsets=False)  # the laws this measurement was made with (bench/ACCURACY.md)
    fitted = saved_laws(SavedRun.load(args.laws_from), list(sites), cfg)
    write_laws(sites, fitted.laws, fitted.site_laws, 0.5)
    ids = _kl_text(tokenizer, args.length)[0].tolist()
    rows = []
    for target in [float(t) for t in args.targets.split(",")]:
        for site in sites.values():
            site.set_enabled(True)
            site.set_target({"prefill": target, "decode": target})
        counter = UnionCounter()
        with mock.patch.object(op_module, "reference_attention", counter):
            run_sample(model, ids, args.length, args.decode)
        row = {"target": target, "per_head_kept": counter.kept_heads / counter.valid_heads,
               "group_union_kept": counter.kept_groups / counter.valid_groups}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
