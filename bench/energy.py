"""Joules per call of the prefill bench's implementations, with the SM clock and power they ran at.

Every prefill benchmark on the H200 runs at the board's power cap (~690 of 700 W, NVML's throttle reason
"SW power cap"), with the SM clock moving between ~1.6 and ~1.9 GHz. There a kernel's time is its energy per call
divided by the cap, so an instruction reordering that only overlaps work can leave the time unchanged, and the
way to go faster is less energy per tile. This runs each implementation of ``bench/test_prefill.py`` back to back for
a few seconds, twice in turn (to show drift), and reads NVML's energy counter around each run::

    PYTHONPATH=. python bench/energy.py --lengths 16384 32768 > energy.jsonl

One JSON line per (length, implementation, round): ms per call, J per call, mean W, mean SM MHz, sparsity.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch


def energy_counter():
    """Reads the board's energy counter (mJ) of CUDA's device 0, through NVML: the pynvml that
    ``torch.cuda.clock_rate`` and ``torch.cuda.power_draw`` read through (as ``bench/tile_costs.py`` does)."""
    import pynvml

    pynvml.nvmlInit()
    index = int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0)
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)


def measure(energy_mj, call, seconds: float) -> dict:
    """Run ``call`` back to back for about ``seconds``; SM clock and power sampled every 50 ms meanwhile."""
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(0.05):
            samples.append((torch.cuda.clock_rate(), torch.cuda.power_draw() / 1000))

    for _ in range(3):  # warm
        call()
    torch.cuda.synchronize()
    t = time.perf_counter()
    call()
    torch.cuda.synchronize()
    calls = max(10, int(seconds / (time.perf_counter() - t)))
    sampler = threading.Thread(target=sample)
    sampler.start()
    energy, t0 = energy_mj(), time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    elapsed, joules = time.perf_counter() - t0, (energy_mj() - energy) / 1000
    done.set()
    sampler.join()
    clocks, watts = zip(*samples) if samples else ((0,), (0,))
    return dict(calls=calls, ms=round(1000 * elapsed / calls, 4), joules=round(joules / calls, 5),
                mean_w=round(joules / elapsed, 1), nvml_w=round(sum(watts) / len(watts), 1),
                sm_mhz=round(sum(clocks) / len(clocks)), sm_mhz_min=min(clocks), sm_mhz_max=max(clocks))


def main():
    from bench.test_prefill import _case, _runner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--impls", nargs="+", default=["sdpa_cudnn", "fx_dense", "fx_s50", "fx_s70", "fx_s90"])
    parser.add_argument("--seconds", type=float, default=3.0, help="per implementation and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    energy_mj = energy_counter()
    for seq_len in args.lengths:
        q, k, v, lambdas = _case(seq_len)
        runners = {impl: _runner(impl, q, k, v, lambdas) for impl in args.impls}
        for round_ in range(args.rounds):
            for impl, (call, lam, sparsity) in runners.items():
                row = dict(L=seq_len, impl=impl, round=round_, lam=lam, sparsity=sparsity)
                row.update(measure(energy_mj, call, args.seconds))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
