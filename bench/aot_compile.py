"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, not whether Triton can
compile them: compiler errors and assertions (and a loop the pipeliner leaves unbuffered, or shared
memory past the 227 KiB a block may use) otherwise show up only on the GPU. This compiles every
kernel ahead of time for an H100/H200 with the Triton of your choice (the device has 3.6)::

    pip install --no-deps triton==3.6.0 --target /tmp/triton36
    python bench/aot_compile.py --triton /tmp/triton36

One line per kernel variant: OK with shared memory and the number of asynchronous-copy waits in the
TTGIR (0 = nothing pipelined), or FAIL with the compiler's message.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

OPS = Path(__file__).resolve().parent.parent / "fxsparse" / "ops"
POINTERS = dict(
    q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", out_ptr="*bf16", mask_ptr="*u8", kinds_ptr="*i8",
    state_ptr="*fp32", trials_ptr="*fp32", stats_ptr="*i64", dec_ptr="*i8", scores_ptr="*fp16",
    tile_max_ptr="*fp32", part_acc_ptr="*fp32", part_l_ptr="*fp32", part_m_ptr="*fp32",
    keep_heads_ptr="*i32", kept_ptr="*i32",
)
FLOATS = {"scale", "mask_min"}
# the Gluon kernel's host TMA descriptors, and the constexpr giving each one's rows per box
DESCRIPTORS = {"q_desc": "BLOCK_M", "k_desc": "BLOCK_N", "v_desc": "BLOCK_N", "o_desc": "BLOCK_M"}


def descriptor_type(name, constexprs):
    """The signature of a Gluon kernel's host descriptor argument: a 4-D box of one (batch, head)'s rows."""
    from triton.experimental.gluon import language as gl

    box = [1, 1, constexprs[DESCRIPTORS[name]], constexprs["HEAD_DIM"]]
    layout = gl.NVMMASharedLayout.get_default_for(box, gl.bfloat16)
    return f"tensordesc<bf16{box},{layout!r}>"

CONSTEXPRS = dict(
    HEAD_DIM=128, VALUE_DIM=128, D_PAD=128, DV_PAD=128, BLOCK_M=128, BLOCK_N=128, BLOCK_G=16, BLOCK_T=1, T_PAD=2,
    IS_CAUSAL=True, MASK_KIND=0, COUNT_MODE=0, SKIP_V_LOAD=True, DEBUG=False, DOT_PRECISION="tf32",
    USE_TMA=True, PREFIX_CHUNK=256, DECIDE_CHUNK=16, S_PAD=64, COUNT=False, PDL=True, SCORES_FP16=True, num_warps=8,
)
# (kernel, overrides of CONSTEXPRS, num_warps, num_stages): the launch configs the host code uses
VARIANTS = [
    ("prefill_kernel", {}, 8, 3),
    ("prefill_kernel", dict(COUNT_MODE=1), 8, 3),  # stats on: λ = 0 still takes the dense loop
    ("prefill_kernel", dict(COUNT_MODE=2, T_PAD=64), 8, 3),
    ("prefill_kernel", dict(MASK_KIND=1, USE_TMA=False, HEAD_DIM=80), 8, 3),
    ("decode_scores_kernel", dict(IS_CAUSAL=False), 4, 3),
    ("decode_attend_kernel", {}, 4, 3),
    ("decode_attend_kernel", dict(COUNT_MODE=2, T_PAD=64, DEBUG=True), 4, 3),
    ("decode_attend_kernel", dict(PDL=False, SCORES_FP16=False), 4, 3),  # float32 inputs, before Hopper
    ("decode_scores_kernel", dict(BLOCK_G=4, BLOCK_T=4), 4, 3),  # a speculative step: 4 heads × 4 rows
    ("decode_attend_kernel", dict(BLOCK_G=4, BLOCK_T=4), 4, 3),
    ("decode_scores_kernel", dict(BLOCK_G=8, BLOCK_T=8, MASK_KIND=2), 8, 3),  # 64 rows
    ("decode_attend_kernel", dict(BLOCK_G=8, BLOCK_T=8, COUNT_MODE=2, T_PAD=64), 8, 3),
    ("decode_combine_kernel", {}, 4, 1),
    ("gluon_prefill_kernel", {}, 8, 1),
    ("gluon_prefill_kernel", dict(HEAD_DIM=64, IS_CAUSAL=False, COUNT=True, DEBUG=True), 8, 1),
]


def load_kernels():
    """The kernel modules, imported by path: fxsparse itself (and torch) need not be importable."""
    package = types.ModuleType("fxsparse_ops")
    package.__path__ = [str(OPS)]
    sys.modules["fxsparse_ops"] = package
    kernels = {}
    for name in ("triton_prefill", "triton_decode", "gluon_prefill"):
        spec = importlib.util.spec_from_file_location(f"fxsparse_ops.{name}", OPS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        kernels.update({k: v for k, v in vars(module).items() if k.endswith("_kernel")})
    return kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triton", help="a folder holding the triton package to use (pip install --target)")
    args = parser.parse_args()
    if args.triton:
        sys.path.insert(0, args.triton)
    import triton
    from triton.backends.compiler import GPUTarget

    print(f"triton {triton.__version__}")
    kernels = load_kernels()
    failures = 0
    for name, overrides, num_warps, num_stages in VARIANTS:
        fn = kernels[name]
        constexprs = {a: v for a, v in {**CONSTEXPRS, **overrides}.items() if a in fn.arg_names}
        signature = {a: "constexpr" if a in constexprs else descriptor_type(a, constexprs) if a in DESCRIPTORS
                     else POINTERS.get(a, "fp32" if a in FLOATS else "i32") for a in fn.arg_names}
        label = f"{name} {overrides or ''} warps={num_warps} stages={num_stages}"
        try:
            # what the launcher's specialisation sees on real tensors: 16-byte aligned bases, and q/k/v/out
            # strides that are multiples of 16 (masks, scratch and partials may have any stride)
            aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                       if a in POINTERS or a[:8] in ("stride_q", "stride_k", "stride_v", "stride_o")}
            source_type = triton.compiler.ASTSource
            if getattr(fn, "is_gluon", lambda: False)():
                from triton.experimental.gluon._runtime import GluonASTSource as source_type
            source = source_type(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
        except Exception as exc:  # the compiler's message is the result
            failures += 1
            print(f"FAIL {label}: {exc.__cause__ or exc}")
            continue
        ttgir = compiled.asm["ttgir"]
        waits = ttgir.count("async_wait") + ttgir.count("wait_barrier")
        print(f"OK   {label}: shared {compiled.metadata.shared} B, async waits {waits}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
