"""Calibration speed on a random-weight Llama-3-8B-shaped model (a few layers), SPEC §9.

48 RULER-style samples with length bins up to 16k, measured with the Triton counting kernel (one
dense pass counts every trial λ), then the held-out check. Reports wall time split into sample
building and measuring+fitting, and the fitted laws.

    PYTHONPATH=. python bench/calib_speed.py --tokenizer DIR --essays DIR [--layers 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import fxsparse
from fxsparse.calibration.samples import build_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a saved HF tokenizer directory")
    parser.add_argument("--essays", required=True, help="Paul Graham essays directory")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--max_seqlen", type=int, default=16384)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=args.layers, vocab_size=len(tokenizer), max_position_embeddings=args.max_seqlen + 64,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).eval()

    calibration = {"samples": args.samples, "max_seqlen": args.max_seqlen, "heldout_samples": 4,
                   "data_dir": args.essays, "target_sparse_ratio": 0.5}
    start = time.perf_counter()
    build_samples(tokenizer, args.samples + 4, args.max_seqlen, seed=1234, data_dir=args.essays)  # warms the cache
    samples_s = time.perf_counter() - start

    sparse_cfg = {"calibration": calibration, "*attn*": {"backend": "triton"}}
    start = time.perf_counter()
    fxsparse.sparsify(model, {"sparse_cfg": sparse_cfg}, tokenizer=tokenizer)
    torch.cuda.synchronize()
    total_s = time.perf_counter() - start

    site = next(iter(fxsparse.sites_of(model).values()))
    result = {
        "device": torch.cuda.get_device_name(), "layers": args.layers, "samples": args.samples,
        "max_seqlen": args.max_seqlen, "sample_building_s": round(samples_s, 1),
        "sparsify_with_calibration_s": round(total_s, 1), "law": site.law(),
    }
    print(fxsparse.summary(model, file=None))
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
