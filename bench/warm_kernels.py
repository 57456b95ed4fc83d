"""Compile the Triton kernels a SmolLM2 accuracy run needs, before the model is on the machine.

A fresh GPU machine spends minutes compiling on the first sparse forward of ``bench/accuracy.py``
(one kernel per count mode, phase and integer specialisation of the lengths). The GGUF needs two device
calls (``bench/accuracy_gpu_part1.sh``), so the first call runs this: a random-weight model with
SmolLM2-135M's attention shape (float32, Hq = 9, Hkv = 3, D = 64, 128×128 tiles) goes through what the
accuracy run does — measuring (calibration), a calibrated law, dense, chunked prefill and decode — at
lengths with and without 16-divisible residues, and Triton's on-disk cache keeps the binaries for the
second call. Prints the seconds each step took (the first of a kind is the compile)::

    python bench/warm_kernels.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxsparse
from fxsparse.calibration.measure import Recorder, run_sample, trial_grid

SMOLLM2_ATTENTION = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192)
LENGTHS = (1000, 2048, 4090, 8183)  # the calibration bins' sizes, 16-divisible and not
CHUNK = 4096  # calibration's chunk_size: 8k samples run as two chunks, NIAH at 8k as one
LAW = {"prefill": {"a": 50.0, "b": 8.0, "p": 1.8}, "decode": {"a": 5.0, "b": 8.0, "p": 1.6}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=args.layers, **SMOLLM2_ATTENTION)
    model = LlamaForCausalLM(config).to(args.device, torch.float32).eval()
    backend = "triton" if model.device.type == "cuda" else "pytorch"  # pytorch: a CPU rehearsal
    fxsparse.sparsify(model, {"sparse_cfg": {"*attn*": {"br": 128, "bc": 128, "backend": backend, "enable": True},
                                             "default": {"enable": False}}})
    sites = fxsparse.sites_of(model)

    def timed(label: str, chunk: int, length: int) -> None:
        ids = torch.randint(0, config.vocab_size, (length,)).tolist()
        start = time.perf_counter()
        run_sample(model, ids, chunk, decode_steps=4)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{label:>10} L={length:5d} chunk={chunk}: {time.perf_counter() - start:6.1f} s", flush=True)

    with Recorder(model, sites, trial_grid()):
        for length in LENGTHS:
            timed("measuring", CHUNK, length)
    for site in sites.values():
        site.set_law(LAW, 0.5)
    for length in LENGTHS:
        timed("sparse", length, length)
    timed("sparse", CHUNK, LENGTHS[-1])
    for site in sites.values():
        site.set_enabled(False)
    for length in LENGTHS:
        timed("dense", length, length)


if __name__ == "__main__":
    main()
