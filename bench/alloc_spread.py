"""How much the prefill bench's ratio to cuDNN moves with where the inputs land, and with what ran before.

``bench/test_prefill.py``'s case at one length, timed as it times it (cuDNN on GQA-expanded K/V, fxsparse at each
target's λ), on fresh copies of the same inputs (new allocations), then on fresh copies again after the case of
another length has run in the process. One JSON line per copy (bench/RESULTS.md, "Eleventh session")::

    PYTHONPATH=. python bench/alloc_spread.py --length 16384 --before 8192
"""

from __future__ import annotations

import argparse
import json

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.conftest import cuda_ms
from bench.test_prefill import HKV, HQ, _case
from fxsparse.ops import skip_softmax_attention
from fxsparse.ops.threshold import make_threshold_state


def fx_ms(q, k, v, lam: float) -> float:
    state = make_threshold_state(lam, device="cuda")
    return cuda_ms(lambda: skip_softmax_attention(q, k, v, is_causal=True, threshold=state, backend="triton"))


def time_copy(tag: str, q, k, v, lambdas) -> None:
    row = {"tag": tag}
    k_full, v_full = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        row["cudnn"] = cuda_ms(lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True))
    row.update({name: fx_ms(q, k, v, lam) for name, (lam, _) in lambdas.items()})
    row["fx_s70_x_cudnn"] = row["cudnn"] / row["fx_s70"]
    print(json.dumps({key: round(x, 4) if isinstance(x, float) else x for key, x in row.items()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--before", type=int, default=8192, help="the length whose case runs between the two rounds")
    parser.add_argument("--copies", type=int, default=3)
    args = parser.parse_args()
    q, k, v, lambdas = _case(args.length)
    kept = []  # every copy stays allocated, so the next one lands elsewhere
    for stage in ("fresh", f"after {args.before}"):
        if stage != "fresh":
            q_other, k_other, v_other, lambdas_other = _case(args.before)
            for lam, _ in lambdas_other.values():
                fx_ms(q_other, k_other, v_other, lam)
        for i in range(args.copies):
            copy = (q.clone(), k.clone(), v.clone())
            kept += copy
            time_copy(f"{stage} {i}", *copy, lambdas)


if __name__ == "__main__":
    main()
