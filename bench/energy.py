"""Joules per call of the prefill bench's implementations, with the SM clock and power they ran at.

Every prefill benchmark on the H200 runs at the board's power cap (~690 of 700 W, NVML's throttle reason
"SW power cap"), with the SM clock moving between ~1.6 and ~1.9 GHz. There a kernel's time is its energy per call
divided by the cap, so an instruction reordering that only overlaps work can leave the time unchanged, and the
way to go faster is less energy per tile. This runs each implementation of ``bench/test_prefill.py`` back to back for
a few seconds, twice in turn (to show drift), and reads NVML's energy counter around each run, through ctypes
(no pynvml needed)::

    PYTHONPATH=. python bench/energy.py --lengths 16384 32768 > energy.jsonl

One JSON line per (length, implementation, round): ms per call, J per call, mean W, mean SM MHz, sparsity.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import threading
import time

import torch

NVML_CLOCK_SM = 1


class Nvml:
    """The few NVML calls this needs, on the GPU CUDA calls device 0."""

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self.lib.nvmlInit_v2())
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        self.handle = ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByIndex_v2(int(visible or 0), ctypes.byref(self.handle)))

    @staticmethod
    def _check(status):
        if status != 0:
            raise RuntimeError(f"NVML call failed with status {status}")

    def _read(self, fn, *args, kind=ctypes.c_uint):
        value = kind()
        self._check(fn(self.handle, *args, ctypes.byref(value)))
        return value.value

    def energy_mj(self) -> int:
        return self._read(self.lib.nvmlDeviceGetTotalEnergyConsumption, kind=ctypes.c_ulonglong)

    def sm_mhz(self) -> int:
        return self._read(self.lib.nvmlDeviceGetClockInfo, NVML_CLOCK_SM)

    def watts(self) -> float:
        return self._read(self.lib.nvmlDeviceGetPowerUsage) / 1000


def measure(nvml: Nvml, call, seconds: float) -> dict:
    """Run ``call`` back to back for about ``seconds``; NVML sampled every 50 ms meanwhile."""
    samples, done = [], threading.Event()

    def sample():
        while not done.wait(0.05):
            samples.append((nvml.sm_mhz(), nvml.watts()))

    for _ in range(3):  # warm
        call()
    torch.cuda.synchronize()
    t = time.perf_counter()
    call()
    torch.cuda.synchronize()
    calls = max(10, int(seconds / (time.perf_counter() - t)))
    sampler = threading.Thread(target=sample)
    sampler.start()
    energy, t0 = nvml.energy_mj(), time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    elapsed, joules = time.perf_counter() - t0, (nvml.energy_mj() - energy) / 1000
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
    nvml = Nvml()
    for seq_len in args.lengths:
        q, k, v, lambdas = _case(seq_len)
        runners = {impl: _runner(impl, q, k, v, lambdas) for impl in args.impls}
        for round_ in range(args.rounds):
            for impl, (call, lam, sparsity) in runners.items():
                row = dict(L=seq_len, impl=impl, round=round_, lam=lam, sparsity=sparsity)
                row.update(measure(nvml, call, args.seconds))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
