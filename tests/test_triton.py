"""The Triton backend against the exact PyTorch reference (SPEC §4): skip decisions, stats, outputs.

Without CUDA the kernels run under Triton's interpreter (fp32 / fp16, small shapes; the interpreter's
bf16 dot is unusable). The interpreter must be chosen before ``triton`` is first imported, so on such a
machine this file runs itself in a child pytest with ``TRITON_INTERPRET=1`` (one parent test reports the
child's result) and the flag never touches the parent session. With CUDA the same checks run on the
real kernels, plus the ``gpu`` tests at moderate sizes in bf16/fp16.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fxsparse.ops.masks import is_causal_mask
from fxsparse.ops.reference import reference_attention
from fxsparse.ops.threshold import make_threshold_state

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
IN_CHILD = os.environ.get("FXSPARSE_INTERPRETER_CHILD") == "1"
RUN_HERE = HAS_CUDA or IN_CHILD

pytest.importorskip("triton")
if RUN_HERE:
    from fxsparse.ops import triton_attention


@pytest.mark.skipif(RUN_HERE, reason="the checks run directly in this process")
def test_kernels_under_interpreter():
    """Run this file's CPU checks in a fresh interpreter-mode process."""
    env = dict(os.environ, TRITON_INTERPRET="1", FXSPARSE_INTERPRETER_CHILD="1")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]


here = pytest.mark.skipif(not RUN_HERE, reason="runs in the interpreter child (see test_kernels_under_interpreter)")


def _inputs(b, hq, hkv, lq, lk, d, dtype, seed, dv=None, device=DEVICE):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen)
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, dv or d, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def compare(q, k, v, *, lam=0.0, mask=None, causal=False, br=16, bc=16, trials=None, rtol=None):
    """Run both backends; assert identical decisions (up to exact near-threshold ties), stats and outputs."""
    scale = q.shape[-1] ** -0.5
    state = make_threshold_state(lam, device=q.device)
    columns = 1 + (1 if trials is None else len(trials))
    stats_ref = torch.zeros(2, columns, dtype=torch.int64, device=q.device)
    stats_tri = stats_ref.clone()
    trial_t = None if trials is None else torch.tensor(trials, device=q.device)
    gaps = []
    ref = reference_attention(q, k, v, mask, causal, scale, state, br, bc, stats_ref, trial_t, tile_gaps_out=gaps)
    num_i = 1 if q.shape[2] == 1 else -(-q.shape[2] // br)
    decisions = torch.zeros(q.shape[0], q.shape[1], num_i, -(-k.shape[2] // bc), dtype=torch.int8, device=q.device)
    out = triton_attention.skip_softmax_attention(
        q, k, v, mask, causal, scale, state, br, bc, stats_tri, trial_t, decisions_out=decisions
    )

    gaps = torch.stack(gaps, -1)
    log_lam = math.log(lam) if lam > 0 else float("-inf")
    ref_decisions = ((gaps > float("-inf")) & (gaps >= log_lam)).to(torch.int8)
    differ = decisions != ref_decisions
    near_tie = (gaps - log_lam).abs() < 1e-4
    assert not (differ & ~near_tie).any(), f"{int(differ.sum())} tile decisions differ from the reference"
    if not differ.any():
        assert torch.equal(stats_tri, stats_ref), (stats_tri.tolist(), stats_ref.tolist())
    assert not out.isnan().any()
    if not differ.any():
        tol = rtol if rtol is not None else (2e-5 if q.dtype == torch.float32 else 5e-3)
        err = (out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
        assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"
        # rows that attend nothing are exactly 0
        empty_rows = (ref == 0).all(-1)
        assert (out[empty_rows] == 0).all()
    return out, stats_tri, decisions


# -- prefill: odd lengths, GQA, causal (bottom-right), λ from never to very aggressive --
PREFILL_CASES = [
    # b, hq, hkv, lq, lk, d, lam, causal, br, bc
    (1, 2, 1, 40, 40, 16, 0.0, True, 16, 16),
    (1, 4, 2, 37, 53, 24, 0.3, False, 16, 16),
    (2, 4, 2, 45, 45, 32, 0.5, True, 16, 32),
    (1, 4, 1, 67, 40, 16, 1.5, True, 32, 16),  # Lq > Lk: early rows see nothing
    (1, 2, 2, 20, 90, 16, 3.0, True, 16, 16),  # Lq < Lk: bottom-right diagonal
    (1, 6, 2, 50, 75, 80, 2.0, False, 16, 16),  # head dim padded to 128
    (1, 16, 1, 9, 100, 16, 1.0, True, 16, 16),  # Lq < br, 16 heads × 9 rows a KV head: one short query tile
]


@here
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_matches_reference(case, dtype):
    b, hq, hkv, lq, lk, d, lam, causal, br, bc = case
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, dtype, seed=hash(case) % 1000)
    compare(q, k, v, lam=lam, causal=causal, br=br, bc=bc)


@here
def test_skips_happen_and_value_dim_may_differ():
    q, k, v = _inputs(1, 4, 2, 64, 96, 16, torch.float32, seed=3, dv=32)
    _, stats, decisions = compare(q, k, v, lam=4.0, causal=True)
    assert stats[0, 1] > 0 and (decisions == 0).any()


# -- explicit masks: bool and additive, broadcast shapes, rows that attend nothing --
def _masks(b, hq, lq, lk, seed):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, 1, lq, lk, generator=gen) > 0.4
    keep[:, :, 3] = False  # a fully masked row outputs 0
    keep[:, :, :, 16:32] = False  # a fully masked key tile is never visited
    lengths = torch.tensor([lk, lk // 2])[:b]
    padding = torch.arange(lk)[None, :] < lengths[:, None]
    bias = torch.randn(b, hq, lq, lk, generator=gen) * 0.5
    additive = torch.where(torch.rand(b, hq, lq, lk, generator=gen) > 0.3, bias, torch.finfo(torch.float32).min)
    return {
        "bool_per_row": keep.to(DEVICE),
        "bool_padding": padding[:, None, None, :].to(DEVICE),
        "additive_per_head": additive.to(DEVICE),
        "additive_neg_inf_3d": torch.where(padding, 0.0, float("-inf"))[:, None, :].expand(b, lq, lk).to(DEVICE),
    }


@here
@pytest.mark.parametrize("kind", ["bool_per_row", "bool_padding", "additive_per_head", "additive_neg_inf_3d"])
@pytest.mark.parametrize("causal", [False, True])
def test_masks_match_reference(kind, causal):
    b, hq, hkv, lq, lk = 2, 4, 2, 33, 70
    q, k, v = _inputs(b, hq, hkv, lq, lk, 16, torch.float32, seed=7)
    mask = _masks(b, hq, lq, lk, seed=8)[kind]
    if kind == "additive_neg_inf_3d":
        mask = mask[:, None] if mask.dim() == 3 and mask.shape[0] == b else mask
    compare(q, k, v, lam=0.7, mask=mask, causal=causal)


@here
@pytest.mark.parametrize("form", ["bool", "additive_min", "additive_biased"])
@pytest.mark.parametrize("lq, lk", [(45, 45), (30, 70)])
def test_explicit_causal_mask_runs_as_causal(form, lq, lk):
    """HF materialises the causal mask when traced; an exactly-causal mask takes the causal path."""
    q, k, v = _inputs(2, 4, 2, lq, lk, 16, torch.float32, seed=7)
    causal = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    mask = causal[None, None].expand(2, 1, lq, lk).to(q.device)
    if form != "bool":
        mask = torch.zeros(2, 1, lq, lk, device=q.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    if form == "additive_biased":
        mask[0, 0, -1, 0] = 0.5  # a real bias: not a pure causal mask, the mask path must run
    assert is_causal_mask(mask, lq, lk) == (form != "additive_biased")
    out, stats, decisions = compare(q, k, v, lam=0.5, mask=mask, causal=False)
    if form != "additive_biased":
        _, causal_stats, causal_decisions = compare(q, k, v, lam=0.5, causal=True)
        assert torch.equal(stats, causal_stats) and torch.equal(decisions, causal_decisions)


@here
def test_mask_summary_is_cached_and_follows_in_place_edits():
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool, device=DEVICE)
    first = triton_attention.mask_summary(mask, 16, 16, 40, 40)
    assert triton_attention.mask_summary(mask, 16, 16, 40, 40) is first  # every layer reuses it
    assert (first == 2).all()
    mask[:, :, :, :16] = False  # in-place edit bumps the version counter
    again = triton_attention.mask_summary(mask, 16, 16, 40, 40)
    assert again is not first and (again[..., 0] == 0).all() and (again[..., 1:] == 2).all()


# -- decode: Lq = 1, split-K, GQA packing, batch with different KV lengths --
@here
@pytest.mark.parametrize("waves, min_tiles", [(8, 1), (0, 1), (8, 3)])  # waves 0: one split walks every tile;
# min_tiles 3: several tiles a split after a prefix, so the kept list and per-row flags span tiles
@pytest.mark.parametrize("lam", [0.0, 0.2, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_matches_reference(lam, dtype, waves, min_tiles, monkeypatch):
    monkeypatch.setattr(triton_attention, "DECODE_WAVES", waves)
    monkeypatch.setitem(triton_attention.DECODE_OVERRIDES, "min_tiles_per_split", min_tiles)
    q, k, v = _inputs(3, 8, 2, 1, 150, 32, dtype, seed=11)
    lengths = torch.tensor([150, 61, 1])
    keep = (torch.arange(150)[None, :] < lengths[:, None])[:, None, None, :].to(DEVICE)
    compare(q, k, v, lam=lam, mask=keep, bc=16)
    compare(q, k, v, lam=lam, bc=32)


@here
@pytest.mark.parametrize("lam", [0.05, 1.0])
def test_decode_split_longer_than_a_decide_chunk(lam, monkeypatch):
    """One split of 25 tiles: the attend kernel decides in chunks of 16, carrying m across them."""
    monkeypatch.setattr(triton_attention, "DECODE_WAVES", 0)
    q, k, v = _inputs(2, 4, 2, 1, 400, 16, torch.float32, seed=5)
    keep = (torch.arange(400)[None, :] < torch.tensor([400, 260])[:, None])[:, None, None, :].to(DEVICE)
    compare(q, k, v, lam=lam, mask=keep, bc=16)
    compare(q, k, v, lam=lam, bc=16, trials=[0.01, 0.1, 1.0])


@here
def test_decode_additive_mask_and_empty_sequence():
    q, k, v = _inputs(2, 4, 4, 1, 64, 16, torch.float32, seed=12)
    bias = torch.zeros(2, 1, 1, 64, device=DEVICE)
    bias[1] = float("-inf")  # a sequence that attends nothing outputs 0
    out, _, _ = compare(q, k, v, lam=0.5, mask=bias, bc=16)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


# -- short queries (speculative / chunked steps): Lq <= br runs split-K like decode, one query tile a head --
SHORT_CASES = [
    # b, hq, hkv, lq, lk, d, causal, br
    (2, 8, 2, 4, 150, 32, True, 16),
    (1, 4, 4, 3, 77, 16, False, 16),  # MHA: heads padded to 16 packed rows
    (2, 6, 2, 5, 130, 24, True, 32),  # G = 3 and Lq = 5: padded heads and positions
]


@here
@pytest.mark.parametrize("case", SHORT_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("lam", [0.0, 0.2, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_short_query_runs_split_k_and_matches_reference(case, lam, dtype, monkeypatch):
    b, hq, hkv, lq, lk, d, causal, br = case

    def no_prefill(*args, **kwargs):
        raise AssertionError("a short query went to the prefill kernel")

    monkeypatch.setattr(triton_attention, "_launch_prefill", no_prefill)
    monkeypatch.setitem(triton_attention.DECODE_OVERRIDES, "min_tiles_per_split", 2)  # several splits
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, dtype, seed=hash(case) % 1000)
    compare(q, k, v, lam=lam, causal=causal, br=br, bc=16)
    # per-sequence KV lengths as a boolean mask, and an additive mask that differs per query row
    lengths = torch.tensor([lk, lk // 2])[:b]
    keep = (torch.arange(lk)[None, :] < lengths[:, None])[:, None, None, :].to(DEVICE)
    compare(q, k, v, lam=lam, mask=keep, br=br, bc=16)
    gen = torch.Generator(device="cpu").manual_seed(7)
    bias = torch.randn(b, 1, lq, lk, generator=gen) * 2
    bias[..., : lk // 3] = torch.finfo(torch.float32).min  # early keys masked for every row
    compare(q, k, v, lam=lam, mask=bias.to(DEVICE), br=br, bc=16)


# -- counting (calibration's measuring mode): every trial λ counted in one pass, the output at the state's λ --
@here
@pytest.mark.parametrize("lam", [0.0, 2.0], ids=["dense", "skipping"])
@pytest.mark.parametrize("lq", [1, 5, 45])  # decode, a short query (split-K), prefill
def test_counting_matches_reference(lq, lam):
    q, k, v = _inputs(2, 4, 2, lq, 90, 16, torch.float32, seed=13)
    trials = [1e-4, 1e-2, 0.1, 0.5, 0.99, 2.0, 5.0]
    out, stats, _ = compare(q, k, v, lam=lam, causal=True, trials=trials, bc=16)
    expected = reference_attention(q, k, v, None, True, 16**-0.5, make_threshold_state(lam, device=DEVICE), 16, 16)
    assert torch.allclose(out, expected, atol=1e-5)
    phase = 1 if lq == 1 else 0
    counts = stats[phase, 1:]
    assert (counts[1:] >= counts[:-1]).all() and counts[-1] > 0  # monotone in λ, and some skipping
    if lam:
        dense = reference_attention(q, k, v, None, True, 16**-0.5, make_threshold_state(0.0, device=DEVICE), 16, 16)
        assert counts[trials.index(lam)] > 0 and not torch.allclose(out, dense, atol=1e-5)  # λ = 2 skips tiles here


def _kernel_matches_reference(q, k, v, state) -> torch.Tensor:
    """The causal op through both backends with a state tensor: equal stats, close outputs; returns the stats."""
    stats_ref = torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)
    stats_tri = stats_ref.clone()
    ref = reference_attention(q, k, v, None, True, 0.25, state, 16, 16, stats_ref)
    out = triton_attention.skip_softmax_attention(q, k, v, None, True, 0.25, state, 16, 16, stats_tri)
    assert torch.equal(stats_tri, stats_ref)
    assert torch.allclose(out, ref, atol=2e-5)
    return stats_tri


@here
def test_threshold_state_law_and_disable_are_read_in_kernel():
    q, k, v = _inputs(1, 2, 1, 48, 48, 16, torch.float32, seed=14)
    law = make_threshold_state(0.0, law={"prefill": {"a": 280.0, "b": 2.0, "p": 1.5}, "decode": {"a": 1.0, "b": 1.0}},
                               target=0.6, device=DEVICE)
    compare(q, k, v, lam=0.0, causal=True)  # sanity
    for state in (law, make_threshold_state(5.0, enabled=False, device=DEVICE)):
        _kernel_matches_reference(q, k, v, state)


@here
@pytest.mark.parametrize("query_len", [16, 1])  # the prefill and the decode kernel
def test_length_offsets_are_read_in_kernel(query_len):
    """The law's per-length correction o(L) (knots at 1k … 128k tokens, linear in log2 L): at 1500 keys the kernel
    interpolates between the first two knots as the reference does."""
    q, k, v = _inputs(1, 2, 1, query_len, 1500, 16, torch.float32, seed=16)
    law = {"prefill": {"a": 30.0, "b": 2.0, "p": 0.5}, "decode": {"a": 3.5, "b": 2.0, "p": 0.5}}  # λ ~ 3 and 0.3
    offsets = [0.9, -0.4, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0]  # o(1500) = 0.9 − 0.55·1.3
    with_offsets = {phase: {**fit, "offsets": offsets} for phase, fit in law.items()}
    stats = [_kernel_matches_reference(q, k, v, make_threshold_state(0.0, law=chosen, target=0.6, device=DEVICE))
             for chosen in (with_offsets, law)]
    assert not torch.equal(*stats)  # the offsets change what is skipped: the test can fail


@here
def test_unsupported_inputs_fail_clearly():
    q, k, v = _inputs(1, 2, 1, 8, 8, 16, torch.float32, seed=15)
    state = make_threshold_state(0.0, device=DEVICE)
    with pytest.raises(ValueError, match="br"):
        triton_attention.skip_softmax_attention(q, k, v, None, False, 0.25, state, 8, 16)
    with pytest.raises(ValueError, match="float16"):
        triton_attention.skip_softmax_attention(q.double(), k.double(), v.double(), None, False, 0.25, state, 16, 16)


@here
def test_tma_alignment_covers_every_stride_above_the_last():
    """Both prefill kernels' TMA descriptors start at base + b·stride_b + h·stride_h, so a misaligned batch or head
    stride rules TMA out just as a misaligned base or row stride does."""
    shape = (2, 4, 8, 64)
    storage = torch.zeros(2 * 4 * 8 * 64 * 2, dtype=torch.bfloat16, device=DEVICE)
    t = storage[: 2 * 4 * 8 * 64].view(shape)
    assert triton_attention._tma_aligned(t)
    assert triton_attention._tma_aligned(t.transpose(1, 2).contiguous().transpose(1, 2))  # HF's (B, L, H, D) memory
    head_stride = 8 * 64 + 4  # 1032 bytes
    assert not triton_attention._tma_aligned(storage.as_strided(shape, (4 * head_stride, head_stride, 64, 1)))
    assert not triton_attention._tma_aligned(storage[1:].as_strided(shape, t.stride()))  # base 2 bytes off


# -- GPU: the real kernels in bf16/fp16 at moderate sizes --
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_gpu_prefill_head_dims(dtype, d):
    q, k, v = _inputs(1, 8, 2, 700, 1100, d, dtype, seed=d)
    compare(q, k, v, lam=1.5, causal=True, br=128, bc=128, rtol=1e-2)
    compare(q, k, v, lam=0.0, causal=False, br=128, bc=64, rtol=1e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", ["gluon", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_prefill_kernels_skip_and_keep(kernel, dtype, d, monkeypatch):
    """Both Hopper prefill kernels (Gluon, Triton) from no skip to most tiles skipped: ragged lengths, GQA,
    Lq < Lk and Lq > Lk (rows that see nothing), causal and not, HF's (B, L, H, D) memory layout, stats on."""
    if kernel == "gluon" and (triton_attention.gluon_prefill_launch is None
                              or torch.cuda.get_device_capability() != (9, 0)):
        pytest.skip(f"the Gluon prefill kernel runs on Hopper (sm_90) with Triton {triton_attention.GLUON_TRITON}x")
    monkeypatch.setitem(triton_attention.PREFILL_OVERRIDES, "gluon", kernel == "gluon")
    launches, launch = [], triton_attention.gluon_prefill_launch
    monkeypatch.setattr(triton_attention, "gluon_prefill_launch", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    q, k, v = _inputs(2, 8, 2, 2500, 2500, d, torch.float32, seed=d)
    q, k, v = (q * 2.5).to(dtype), k.to(dtype), v.to(dtype)  # peaked scores: gaps of several nats between tiles
    for lam in (0.0, 0.05, 0.5, 3.0):
        compare(q, k, v, lam=lam, causal=True, br=128, bc=128, rtol=1e-2)
    compare(q[:, :, 700:1900], k, v, lam=0.3, causal=True, br=128, bc=128, rtol=1e-2)  # Lq < Lk, bottom-right
    compare(q, k[:, :, :1000], v[:, :, :1000], lam=0.3, causal=True, br=128, bc=128, rtol=1e-2)  # Lq > Lk
    compare(q[:, :, :1000], k[:, :, :1999], v[:, :, :1999], lam=0.1, causal=False, br=128, bc=128, rtol=1e-2)
    hf = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # HF's (B, L, H, D) memory, seen as BHLD
    compare(*hf, lam=0.5, causal=True, br=128, bc=128, rtol=1e-2)
    assert len(launches) == (8 if kernel == "gluon" else 0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_masks_decode_counting(dtype):
    q, k, v = _inputs(2, 8, 2, 300, 900, 128, dtype, seed=21)
    pad = (torch.arange(900, device="cuda")[None, :] >= torch.tensor([0, 200], device="cuda")[:, None])
    compare(q, k, v, lam=1.0, mask=pad[:, None, None, :], causal=True, br=128, bc=128, rtol=1e-2)
    compare(q, k, v, trials=[1e-3, 0.1, 1.0, 4.0], causal=True, br=128, bc=128, rtol=1e-2)
    qd, kd, vd = _inputs(3, 32, 8, 1, 9000, 128, dtype, seed=22)
    lengths = torch.tensor([9000, 4000, 130], device="cuda")
    keep = (torch.arange(9000, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    compare(qd, kd, vd, lam=2.0, mask=keep, br=128, bc=128, rtol=1e-2)
    compare(qd, kd, vd, trials=[1e-3, 0.1, 1.0, 4.0], br=128, bc=128, rtol=1e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_short_query_split_k(dtype):
    """A speculative step of 4 rows on a long cache: split-K, causal bottom-right, ragged lengths, counting."""
    q, k, v = _inputs(3, 32, 8, 4, 9000, 128, dtype, seed=23)
    lengths = torch.tensor([9000, 4000, 130], device="cuda")
    keep = (torch.arange(9000, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    compare(q, k, v, lam=2.0, causal=True, br=128, bc=128, rtol=1e-2)
    compare(q, k, v, lam=0.5, mask=keep, br=128, bc=64, rtol=1e-2)
    compare(q, k, v, trials=[1e-3, 0.1, 1.0, 4.0], causal=True, br=128, bc=128, rtol=1e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        "inductor",
    ],
)
def test_gpu_dense_matches_sdpa_and_compiles(backend):
    import torch.nn.functional as F

    q, k, v = _inputs(1, 8, 8, 2048, 2048, 128, torch.bfloat16, seed=31)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    state = make_threshold_state(0.0, device="cuda")

    def attend(q, k, v, state):
        no_stats = torch.zeros(0, 2, dtype=torch.int64, device="cuda")
        return torch.ops.fxsparse.skip_softmax_attention(q, k, v, None, True, 128**-0.5, state, 128, 128, "triton",
                                                         no_stats, None)

    out = attend(q, k, v, state)
    assert ((out.double() - expected).norm() / expected.norm()) < 1e-2
    compiled = torch.compile(attend, fullgraph=True, backend=backend)
    assert torch.equal(compiled(q, k, v, state), out)
    state.copy_(make_threshold_state(0.5, device="cuda"))  # a new λ reaches the compiled kernel as data
    assert torch.equal(compiled(q, k, v, state), attend(q, k, v, state))
