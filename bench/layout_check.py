"""The prefill kernel on HF's q/k/v layout, (B, L, H, D) memory viewed as (B, H, L, D), against contiguous
(B, H, L, D): with and without stats, and with a copy to contiguous first; cuDNN on the HF layout for scale.
Random normal bf16 inputs, causal, dense (λ = 0), B = 1, Hq = 32, Hkv = 8, D = 128.

    PYTHONPATH=. python bench/layout_check.py
"""

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from fxsparse.ops.op import skip_softmax_attention

B, HQ, HKV, D = 1, 32, 8, 128


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300)


def main():
    torch.manual_seed(0)
    for seq_len in (16384, 32768):
        contiguous = [torch.randn(B, h, seq_len, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV)]
        hf_layout = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in contiguous]
        for name, (q, k, v) in (("contiguous", contiguous), ("hf_layout", hf_layout)):
            for stats in (False, True):
                run = lambda: skip_softmax_attention(q, k, v, is_causal=True, threshold=0.0, backend="triton",
                                                     return_stats=stats)
                print(seq_len, name, f"stats={stats}", f"{ms(run):.3f} ms")
        q, k, v = hf_layout
        copied = lambda: skip_softmax_attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True,
                                                threshold=0.0, backend="triton")
        print(seq_len, "hf_layout + copy", f"{ms(copied):.3f} ms")
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            print(seq_len, "cudnn on hf_layout", f"{ms(cudnn):.3f} ms")


if __name__ == "__main__":
    main()
