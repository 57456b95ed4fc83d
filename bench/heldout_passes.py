"""Counting passes of SmolLM2 calibration samples on the CPU, for ``bench/law_length.py`` and ``--laws-from``.

Builds the same samples as ``fxsparse.calibrate`` with ``SKIP_SOFTMAX_CALIB``'s defaults (seed 1234,
``--samples`` fitted + ``--heldout`` held out, up to ``--max-seqlen``), keeps the ``--heldout`` last ones, and
runs them once in measuring mode (dense, every trial λ counted) on the CPU reference: any law's sparsity on
them can then be read off without running the model again. Counts equal the GPU counting kernel's. With
``--samples 0 --heldout 80`` it measures all 80 (indices 0–79): fit on the first 64 with
``law_length.py --split 64`` or ``accuracy.py --laws-from FILE --fit-samples 64``::

    PYTHONPATH=. python bench/heldout_passes.py --samples 0 --heldout 80 --out bench/results/passes80_cpu.json  # ~55 min, 2 cores

``--skipping-laws-from FILE`` measures with every site skipping at the ``SKIP_SOFTMAX_CALIB`` laws refitted from
the first ``--fit-samples`` of FILE's passes, at their target (calibration's ``refit_while_skipping`` round)::

    PYTHONPATH=. python bench/heldout_passes.py --samples 0 --heldout 64 --skipping-laws-from bench/results/passes80_cpu.json \
        --fit-samples 64 --out bench/results/passes64_skipping_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.accuracy import PRESET, SavedRun, saved_laws, sparse_smollm2
from fxsparse.calibration.calibrate import write_laws
from fxsparse.calibration.measure import Recorder, merge_decode, run_sample, trial_grid
from fxsparse.calibration.samples import build_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=PRESET.samples)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--max-seqlen", type=int, default=PRESET.max_seqlen)
    parser.add_argument("--skipping-laws-from", help="a run with passes: measure while skipping at the laws they give")
    parser.add_argument("--fit-samples", type=int, help="with --skipping-laws-from: fit on that run's first N samples")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer, sites = sparse_smollm2()
    if args.skipping_laws_from:
        saved = SavedRun.load(args.skipping_laws_from, args.fit_samples)
        fitted = saved_laws(saved, list(sites))
        write_laws(sites, fitted.laws, fitted.site_laws, saved.targets)
    samples = build_samples(tokenizer, args.samples + args.heldout, args.max_seqlen, seed=PRESET.seed)[args.samples:]
    trials = trial_grid()
    out = {"trials": trials.tolist(), "args": vars(args), "samples": [{"bin": s.bin, "tokens": len(s.input_ids)}
                                                                     for s in samples]}
    model.eval()
    with torch.no_grad(), Recorder(model, sites, trials, dense=not args.skipping_laws_from) as recorder:
        for index, sample in enumerate(samples):
            start, recorder.sample = time.perf_counter(), index
            run_sample(model, sample.input_ids, PRESET.chunk_size, PRESET.decode_steps)
            print(f"sample {index} ({sample.bin} bin): {time.perf_counter() - start:.0f} s", flush=True)
    out["passes"] = [{"phase": p.phase, "sample": p.sample, "kv_len": p.kv_len, "valid": p.valid.tolist(),
                      "skipped": p.skipped.tolist()} for p in merge_decode(recorder.passes)]
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
