"""A/B of the Gluon prefill kernel against its form at a git revision, in one process on one GPU.

    PYTHONPATH=. python bench/kernel_ab.py check --base 3e2595b     # outputs, stats, decisions: bit-identical?
    PYTHONPATH=. python bench/kernel_ab.py bench --base 3e2595b     # times at 8k-32k, each kernel twice, interleaved
    PYTHONPATH=. python bench/kernel_ab.py check --base 3e2595b --head-dims 128 --lengths 2500   # fewer cases

The base kernel is ``fxsparse/ops/gluon_prefill.py`` as of the revision ``--base``, or the kernel file it names,
loaded beside the working tree's. The kernels compared with it are the working tree's, or those ``--variants`` names
(revisions or files, each called by its file's stem). The device machine gets the working tree without ``.git``:
save the base there first (``git show 3e2595b:fxsparse/ops/gluon_prefill.py > base_kernel.py``, an untracked file
travels) and pass ``--base base_kernel.py``. Kernel changes move times by a few percent, about the run-to-run spread
of a full bench, so they are compared here in one session on the same inputs, timed as the full bench times
them. One JSON line per case.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from fxsparse.ops import skip_softmax_attention, triton_attention
from fxsparse.ops.threshold import make_threshold_state, phase_of

KERNEL_PATH = "fxsparse/ops/gluon_prefill.py"
CHECK_LENGTHS = [2500, 2432, 300, 129]
BENCH_LENGTHS = [8192, 16384, 32768]


def kernel_at(where: str, name: str):
    """The launcher of the Gluon prefill kernel of ``where`` (a kernel file, or a git revision), loaded as a module
    beside the current one (its relative imports hold)."""
    if os.path.isfile(where):
        path = where
    else:
        source = subprocess.run(["git", "show", f"{where}:{KERNEL_PATH}"], capture_output=True, text=True, check=True)
        path = os.path.join(tempfile.mkdtemp(), f"gluon_prefill_{name}.py")
        with open(path, "w") as f:
            f.write(source.stdout)
    spec = importlib.util.spec_from_file_location(f"fxsparse.ops.gluon_prefill_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if hasattr(module, "launch"):
        return module.launch
    if hasattr(module, "io_args"):
        sys.exit(f"{where}: the kernels of 70703b5..3a78010 have no launch(); compare against a later revision")
    return launch_with_pointers(module.gluon_prefill_kernel)


def launch_with_pointers(kernel):
    """The launcher of the kernels before 70703b5, which have none of their own: they take Q, K and V as pointers
    and strides and build their TMA descriptors in the kernel, in scratch memory."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))

    def launch(q, k, v, out, is_causal, scale, block_m, block_n, state, count_mode, stats_cols, stats,
               decisions_out):
        dummy = q.new_empty(1)
        dec = decisions_out if decisions_out is not None else dummy
        kernel[(triton.cdiv(q.shape[2], block_m), q.shape[0] * q.shape[1])](
            q, k, v, out, state, stats if stats is not None else dummy, dec,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            *(dec.stride()[:3] if decisions_out is not None else (0, 0, 0)),
            q.shape[1], q.shape[1] // k.shape[1], q.shape[2], k.shape[2], float(scale), phase_of(q.shape[2]),
            stats_cols, HEAD_DIM=q.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=bool(is_causal),
            COUNT=count_mode == 1, DEBUG=decisions_out is not None, num_warps=8)

    return launch


def use(launch):
    """Route the op's Gluon prefill through ``launch`` (one of ``kernel_at``)."""
    triton_attention.gluon_prefill_launch = launch


def run(kernel, q, k, v, lam, causal, record=False):
    """One call through the launcher with ``kernel``; with ``record``, also its stats and per-tile decisions."""
    use(kernel)
    state = make_threshold_state(lam, device="cuda")
    stats = torch.zeros(2, 2, dtype=torch.int64, device="cuda") if record else None
    tiles = (q.shape[0], q.shape[1], -(-q.shape[2] // 128), -(-k.shape[2] // 128))
    decisions = torch.zeros(tiles, dtype=torch.int8, device="cuda") if record else None
    out = triton_attention.skip_softmax_attention(q, k, v, None, causal, q.shape[-1] ** -0.5, state, 128, 128, stats,
                                                  None, decisions_out=decisions)
    torch.cuda.synchronize()
    return out, stats, decisions


def check(kernels, head_dims, lengths):
    """Ragged lengths (an odd and an even number of key tiles), GQA, Lq < Lk, Lq > Lk, non-causal, λ from 0 to 3."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for d in head_dims:
        for n in lengths:
            q = (torch.randn(2, 8, n, d, generator=gen, device="cuda") * 2.5).bfloat16()  # gaps of several nats
            k = torch.randn(2, 2, n, d, generator=gen, device="cuda").bfloat16()
            v = torch.randn(2, 2, n, d, generator=gen, device="cuda").bfloat16()
            cases = [(q, k, v, lam, True) for lam in (0.0, 0.05, 0.5, 3.0)] + [
                (q[:, :, n // 4:], k, v, 0.3, True), (q, k[:, :, :n // 2], v[:, :, :n // 2], 0.3, True),
                (q[:, :, :n // 2], k, v, 0.1, False)]
            for case, (qq, kk, vv, lam, causal) in enumerate(cases):
                base, base_stats, base_dec = run(kernels["base"], qq, kk, vv, lam, causal, record=True)
                base_fast = run(kernels["base"], qq, kk, vv, lam, causal)[0].float()
                for name in list(kernels)[1:]:
                    new, new_stats, new_dec = run(kernels[name], qq, kk, vv, lam, causal, record=True)
                    fast_diff = (base_fast - run(kernels[name], qq, kk, vv, lam, causal)[0].float()).abs().max().item()
                    print(json.dumps(dict(kernel=name, d=d, n=n, case=case, lam=lam,
                                          max_diff=(base.float() - new.float()).abs().max().item(),
                                          max_diff_unrecorded=fast_diff, stats_equal=torch.equal(base_stats, new_stats),
                                          stats=new_stats.tolist(), decisions_differ=int((base_dec != new_dec).sum()))),
                          flush=True)


def bench(kernels, lengths):
    """bench/test_prefill.py's case (its shape, inputs and λ per target) and its timing (``cuda_ms``, through the
    public op); cuDNN SDPA (GQA expanded), the yardstick."""
    from bench.conftest import cuda_ms
    from bench.test_prefill import HKV, HQ, TARGETS, _case

    for seq_len in lengths:
        q, k, v, lambdas = _case(seq_len)
        k_full, v_full = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = cuda_ms(lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True))
        for target, lam in [(0.0, 0.0)] + [(TARGETS[name], lam) for name, (lam, _) in lambdas.items()]:
            row = dict(L=seq_len, target=target, lam=lam, cudnn_ms=round(cudnn, 4))
            for name in list(kernels) * 2:
                use(kernels[name])
                state = make_threshold_state(lam, device="cuda")
                ms = cuda_ms(lambda: skip_softmax_attention(q, k, v, is_causal=True, threshold=state, backend="triton"))
                row.setdefault(f"{name}_ms", []).append(round(ms, 4))
            row.update({f"{name}_x_cudnn": round(cudnn / min(row[f"{name}_ms"]), 3) for name in kernels})
            print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["check", "bench"])
    parser.add_argument("--base", required=True, help="the kernel to compare against: a git revision or a file")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="kernels compared with it (revisions or files); default: the working tree's")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64], help="check's head dims")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help=f"sequence lengths (default: check {CHECK_LENGTHS}, bench {BENCH_LENGTHS})")
    args = parser.parse_args()
    if triton_attention.gluon_prefill_launch is None or not torch.cuda.is_available():
        sys.exit("the Gluon prefill kernel needs a Hopper GPU and Triton 3.6")
    kernels = {"base": kernel_at(args.base, "base")}
    for where in args.variants:
        name = os.path.splitext(os.path.basename(where))[0]
        kernels[name] = kernel_at(where, name)
    if not args.variants:
        kernels["new"] = triton_attention.gluon_prefill_launch
    if args.mode == "check":
        check(kernels, args.head_dims, args.lengths or CHECK_LENGTHS)
    else:
        bench(kernels, args.lengths or BENCH_LENGTHS)


if __name__ == "__main__":
    main()
