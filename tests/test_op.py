"""The skip-softmax op against an independent brute-force oracle, SDPA, and the PyTorch 2 stack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

from brute_force import allowed_and_bias, brute_force_attention
from fxsparse.ops import DECODE, PREFILL, make_threshold_state, masks, reference_attention, skip_softmax_attention

LAMBDAS = [0.0, 1e-6, 1e-3, 0.1, 0.5, 1.0, 5.0]
TILE_SIZES = [16, 32, 64, 128]
FUZZ_SETTINGS = settings(
    max_examples=300,
    derandomize=True,  # the same cases on every run: CI is deterministic
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def as_float32(lam: float) -> float:
    """λ as the (2, 5) float32 threshold state holds it."""
    return float(torch.tensor(lam, dtype=torch.float32))


def random_inputs(shape, *, generator, dtype=torch.float64, magnitude=1.0, sink_strength=0.0):
    """q, k, v for ``shape = (B, Hq, Hkv, Lq, Lk, D, Dv)``.

    ``sink_strength`` > 0 adds a shared direction to every query and to a few "sink" keys (key 0 and
    one random key), the structure of real attention that makes later key tiles fall far below the
    running maximum, so that small λ really skips.
    """
    batch, num_heads, num_kv_heads, query_len, kv_len, head_dim, value_dim = shape

    def randn(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64)

    q = randn(batch, num_heads, query_len, head_dim) * magnitude
    k = randn(batch, num_kv_heads, kv_len, head_dim) * magnitude
    v = randn(batch, num_kv_heads, kv_len, value_dim)
    if sink_strength:
        direction = randn(head_dim)
        direction = sink_strength * direction / direction.norm()
        sinks = [0, int(torch.randint(kv_len, (1,), generator=generator))]
        q += direction
        k[:, :, sinks] += direction
    return q.to(dtype), k.to(dtype), v.to(dtype)


def random_mask(mask_shape, kind, *, generator, dtype=torch.float32, density=0.7, masked_row_fraction=0.2):
    """A bool (False = masked) or additive mask of ``dtype`` with some fully masked rows.

    ``kind``: "bool", "additive_inf" (−inf = masked) or "additive_min" (finfo.min = masked, HF style);
    "causal_bool" / "causal_additive" give exactly the bottom-right causal mask (as HF materialises it).
    """
    if kind.startswith("causal"):
        query_len, kv_len = mask_shape[-2], mask_shape[-1]
        allowed = torch.arange(kv_len) <= torch.arange(query_len)[:, None] + (kv_len - query_len)
        allowed = allowed.expand(mask_shape)
        return allowed if kind == "causal_bool" else torch.zeros(mask_shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    allowed = torch.rand(mask_shape, generator=generator) < density
    fully_masked_rows = torch.rand(mask_shape[:-1], generator=generator) < masked_row_fraction
    allowed &= ~fully_masked_rows[..., None]
    if kind == "bool":
        return allowed
    masked_value = float("-inf") if kind == "additive_inf" else torch.finfo(dtype).min
    bias = (torch.randn(mask_shape, generator=generator) * 0.5).to(dtype)
    return torch.where(allowed, bias, masked_value)


def sink_inputs(query_len, kv_len=256, seed=0):
    """Structured q, k, v (GQA 4:2) where small λ already skips tiles."""
    generator = torch.Generator().manual_seed(seed)
    return random_inputs((1, 4, 2, query_len, kv_len, 16, 16), generator=generator, magnitude=2.0, sink_strength=6.0)


# -- 1. the op against the brute-force oracle, on fuzzed shapes, masks and thresholds --


@st.composite
def attention_cases(draw, structured: bool) -> dict:
    """One fuzz case. Lengths are mostly small; big ones get few heads so the oracle stays quick.

    Structured cases have at least two key tiles: the first tile of a row is always kept, so a
    single key tile can never show a skip.
    """
    br, bc = draw(st.sampled_from(TILE_SIZES)), draw(st.sampled_from(TILE_SIZES))
    decode = draw(st.integers(0, 4)) == 0  # a share of the cases decode (Lq = 1)
    query_len = 1 if decode else draw(st.one_of(st.integers(2, 48), st.integers(2, 300)))
    if structured:
        kv_len = draw(st.integers(bc + 1, 300))
    else:
        kv_len = draw(st.one_of(st.integers(1, 48), st.integers(1, 300)))
    big = query_len * kv_len > 4096
    batch = 1 if big else draw(st.sampled_from([1, 2]))
    num_kv_heads = 1 if big else draw(st.sampled_from([1, 2]))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2, 4, 8]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    value_dim = draw(st.sampled_from([head_dim, 3]))
    mask_kind = draw(st.sampled_from([None, "bool", "additive_inf", "additive_min"]))
    mask_shape = (
        draw(st.sampled_from([1, batch])),
        draw(st.sampled_from([1, num_heads])),
        draw(st.sampled_from([1, query_len])),
        kv_len,
    )
    leading_ones = 2 if mask_shape[:2] == (1, 1) else int(mask_shape[0] == 1)
    return {
        "shape": (batch, num_heads, num_kv_heads, query_len, kv_len, head_dim, value_dim),
        "is_causal": draw(st.booleans()),
        "mask_kind": mask_kind,
        "mask_shape": mask_shape,
        "mask_dtype": draw(st.sampled_from([torch.float64, torch.float32, torch.float16])),
        "mask_rank": 4 - draw(st.integers(0, leading_ones)),  # SDPA-style masks may drop leading 1s
        "scale": draw(st.sampled_from([None, 0.5, 1.0])),
        "lam": draw(st.sampled_from(LAMBDAS)),
        "br": br,
        "bc": bc,
        "magnitude": draw(st.sampled_from([2.0, 4.0])) if structured else 1.0,
        "sink_strength": draw(st.sampled_from([0.0, 6.0])) if structured else 0.0,
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_against_brute_force(case: dict) -> bool:
    """Assert the op and the oracle agree on outputs, skip decisions and stats; True if tiles were skipped."""
    generator = torch.Generator().manual_seed(case["seed"])
    q, k, v = random_inputs(
        case["shape"], generator=generator, magnitude=case["magnitude"], sink_strength=case["sink_strength"]
    )
    mask = None
    if case["mask_kind"] is not None:
        mask = random_mask(case["mask_shape"], case["mask_kind"], generator=generator, dtype=case["mask_dtype"])
        mask = mask.reshape(case["mask_shape"][4 - case["mask_rank"] :])
    lam, br, bc, is_causal = as_float32(case["lam"]), case["br"], case["bc"], case["is_causal"]
    scale = q.shape[-1] ** -0.5 if case["scale"] is None else case["scale"]

    out, stats = skip_softmax_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=case["scale"], threshold=lam, br=br, bc=bc,
        return_stats=True,
    )
    tile_gaps: list[torch.Tensor] = []
    state = make_threshold_state(lam)
    reference_attention(q, k, v, mask, is_causal, scale, state, br, bc, tile_gaps_out=tile_gaps)
    expected = brute_force_attention(q, k, v, mask, is_causal, scale, lam, br, bc)

    np.testing.assert_allclose(out.numpy(), expected.out, rtol=0, atol=1e-6)
    gaps = torch.stack(tile_gaps, dim=-1).numpy()  # (B, Hq, nI, nJ)
    log_lam = math.log(lam) if lam > 0 else -math.inf
    np.testing.assert_array_equal(gaps < log_lam, expected.skipped)
    np.testing.assert_array_equal(gaps > -math.inf, expected.valid)
    phase = DECODE if q.shape[2] == 1 else PREFILL
    assert tuple(stats[phase].tolist()) == expected.counts
    assert stats[1 - phase].tolist() == [0, 0]
    return expected.counts[1] > 0


@pytest.mark.parametrize("mask_kind", ["causal_bool", "causal_additive"])
@pytest.mark.parametrize("query_len, kv_len", [(45, 45), (30, 100), (100, 30), (1, 70)])
@pytest.mark.parametrize("lam", [0.0, 0.05, 0.5])
def test_exactly_causal_masks_match_brute_force(mask_kind, query_len, kv_len, lam):
    """An explicit causal mask takes the op's causal path (fewer rows per key tile): same answers."""
    case = {
        "shape": (2, 4, 2, query_len, kv_len, 16, 16), "is_causal": False, "mask_kind": mask_kind,
        "mask_shape": (2, 1, query_len, kv_len), "mask_dtype": torch.float32, "mask_rank": 4, "scale": None,
        "lam": lam, "br": 16, "bc": 16, "magnitude": 2.0, "sink_strength": 6.0, "seed": query_len * kv_len,
    }
    skipped = check_against_brute_force(case)
    assert skipped == (lam == 0.5) or 0 < lam < 0.5  # the decision path really ran


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("edit_row", [None, 3, 44])
def test_causal_mask_check_in_row_chunks(monkeypatch, dtype, edit_row):
    """The check compares 8-row chunks here: a change in any chunk, the last included, is seen."""
    monkeypatch.setattr(masks, "ROWS_PER_CHUNK", 8)
    query_len, kv_len = 45, 70
    causal = torch.arange(kv_len)[None, :] <= torch.arange(query_len)[:, None] + (kv_len - query_len)
    mask = causal[None, None].expand(2, 1, query_len, kv_len).clone()
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(dtype).min)
    if edit_row is not None and dtype == torch.bool:
        mask[1, 0, edit_row, 0] = False  # one key masked off the causal pattern
    elif edit_row is not None:
        mask[1, 0, edit_row, 0] = 0.25  # a bias on an attended key
    assert masks.is_causal_mask(mask, query_len, kv_len) == (edit_row is None)


@pytest.fixture
def one_thread():
    """Thousands of tiny matmuls: with a busy machine, intra-op thread sync costs far more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("structured", [False, True], ids=["random", "structured"])
def test_matches_brute_force_on_fuzzed_cases(structured, one_thread):
    cases_with_skips = []

    @FUZZ_SETTINGS
    @given(case=attention_cases(structured))
    def check(case):
        cases_with_skips.append(check_against_brute_force(case))

    check()
    assert len(cases_with_skips) >= FUZZ_SETTINGS.max_examples
    # skipping must really be exercised, not only the dense path; on random Gaussian inputs it is
    # rare (only λ >= 1 skips), which is why the structured cases exist
    min_fraction = 0.3 if structured else 0.02
    assert np.mean(cases_with_skips) >= min_fraction, f"only {np.mean(cases_with_skips):.0%} of cases skipped"


def test_tile_whose_maximum_ties_the_running_maximum_is_kept():
    """Skip iff m̃ − m < ln λ: at λ = 1 a gap of exactly 0 keeps the tile (integer inputs: exact scores)."""
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).expand(1, 1, 2, 2)
    key_tile = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    k = torch.cat([key_tile, key_tile]).expand(1, 1, 4, 2)  # key tile 1 repeats key tile 0
    v = torch.randn(1, 1, 4, 3, generator=torch.Generator().manual_seed(0))
    for lam, expected_skipped in [(1.0, 0), (1.5, 1)]:
        out, stats = skip_softmax_attention(q, k, v, scale=1.0, threshold=lam, br=2, bc=2, return_stats=True)
        expected = brute_force_attention(q, k, v, None, False, 1.0, lam, 2, 2)
        assert tuple(stats[PREFILL].tolist()) == expected.counts == (2, expected_skipped)
        np.testing.assert_allclose(out.numpy(), expected.out, rtol=0, atol=1e-6)


def test_non_contiguous_inputs():
    """HF passes q, k, v transposed from (B, L, H, D); the result must not depend on the layout."""
    q, k, v = sink_inputs(query_len=70)
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q_t.is_contiguous()
    expected = skip_softmax_attention(q, k, v, is_causal=True, threshold=0.1, br=32, bc=32)
    out = skip_softmax_attention(q_t, k_t, v_t, is_causal=True, threshold=0.1, br=32, bc=32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


# -- 2. λ = 0 is dense attention: F.scaled_dot_product_attention --


def bottom_right_causal(query_len, kv_len):
    """The bool mask of SPEC §4 causal alignment (SDPA's is_causal is top-left aligned)."""
    rows = torch.arange(query_len)[:, None]
    return torch.arange(kv_len)[None, :] <= rows + (kv_len - query_len)


def sdpa(q, k, v, mask):
    """Dense SDPA; a float mask is cast to q's dtype as SDPA requires."""
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


# the slack added to 2x SDPA's own error; float64 is compared against itself, so only rounding remains
DTYPE_SLACK = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("dtype", list(DTYPE_SLACK), ids=str)
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive_min"])
@pytest.mark.parametrize("query_len", [1, 37, 100])
def test_dense_threshold_matches_sdpa(dtype, mask_kind, query_len):
    generator = torch.Generator().manual_seed(query_len)
    shape, kv_len = (2, 4, query_len, 100), 100
    q64, k64, v64 = random_inputs((2, 4, 2, query_len, kv_len, 16, 16), generator=generator)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    is_causal = mask_kind == "causal"
    if is_causal:
        op_mask, sdpa_mask = None, bottom_right_causal(query_len, kv_len)
    else:
        op_mask = sdpa_mask = random_mask((2, 1, query_len, kv_len), mask_kind, generator=generator)
    out = skip_softmax_attention(q, k, v, attn_mask=op_mask, is_causal=is_causal, threshold=0.0, br=32, bc=32)

    # rows with nothing unmasked: SDPA's output there is undefined (NaN), the op's must be 0
    has_keys = torch.from_numpy(allowed_and_bias(sdpa_mask, shape, is_causal=False)[0].any(-1))
    assert torch.all(out[~has_keys] == 0)
    expected = sdpa(q64, k64, v64, sdpa_mask)
    sdpa_error = (sdpa(q, k, v, sdpa_mask).double() - expected)[has_keys].abs().max()
    op_error = (out.double() - expected)[has_keys].abs().max()
    # flash-attention's rule: at most 2x PyTorch's own error in this dtype, plus a little slack
    assert op_error <= 2 * sdpa_error + DTYPE_SLACK[dtype]


# -- 3. thresholds: monotone error, the calibrated law, enable, trial counting --


def run_op(q, k, v, threshold, trial_thresholds=None):
    """The registered op with a fresh stats accumulator, causal, 32x32 tiles: (out, stats)."""
    columns = 1 + (1 if trial_thresholds is None else len(trial_thresholds))
    stats = torch.zeros(2, columns, dtype=torch.int64)
    state = threshold if isinstance(threshold, torch.Tensor) else make_threshold_state(threshold)
    out = torch.ops.fxsparse.skip_softmax_attention(
        q, k, v, None, True, q.shape[-1] ** -0.5, state, 32, 32, "pytorch", stats, trial_thresholds
    )
    return out, stats


def test_error_and_sparsity_grow_with_threshold():
    q, k, v = sink_inputs(query_len=256)
    dense, _ = run_op(q, k, v, 0.0)
    errors, skipped = [], []
    for lam in [1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0, 5.0]:
        out, stats = run_op(q, k, v, lam)
        errors.append(float((out - dense).abs().max()))
        skipped.append(int(stats[PREFILL, 1]))
    assert skipped == sorted(skipped) and skipped[0] < skipped[-1]
    assert errors == sorted(errors) and errors[0] < errors[-1]


LAW = {"prefill": {"a": 12.0, "b": 5.0, "p": 1.6}, "decode": {"a": 2.0, "b": 3.0}}  # decode: p = 1 by default
TARGET = {"prefill": 0.5, "decode": 0.8}


@pytest.mark.parametrize("phase, query_len", [("prefill", 200), ("decode", 1)])
def test_calibrated_law_equals_fixed_threshold(phase, query_len):
    q, k, v = sink_inputs(query_len)
    kv_len = k.shape[2]
    # the fixed λ in the state must be ignored where a law is present
    state = make_threshold_state(5.0, law=LAW, target=TARGET)
    law_out, law_stats = run_op(q, k, v, state)

    expected_lam = LAW[phase]["a"] * math.exp(LAW[phase]["b"] * TARGET[phase]) / kv_len ** LAW[phase].get("p", 1.0)
    fixed_out, fixed_stats = run_op(q, k, v, expected_lam)
    assert torch.equal(law_stats, fixed_stats)
    torch.testing.assert_close(law_out, fixed_out, rtol=0, atol=1e-12)
    # the test can tell phases apart: the other phase's λ skips a different number of tiles
    other = "decode" if phase == "prefill" else "prefill"
    other_lam = LAW[other]["a"] * math.exp(LAW[other]["b"] * TARGET[other]) / kv_len ** LAW[other].get("p", 1.0)
    assert not torch.equal(run_op(q, k, v, other_lam)[1], fixed_stats)


@pytest.mark.parametrize("kv_len", [700, 1024, 1400, 2048, 140_000])
def test_law_with_length_offsets_equals_fixed_threshold(kv_len):
    """o(L) interpolates its knots (at 1k … 128k tokens) linearly in log2 L and stays flat past either end;
    the expected λ is computed here from the knots directly."""
    q, k, v = sink_inputs(query_len=16, kv_len=kv_len)
    knots = [0.9, -0.4, 0.2, 0.0, 0.0, 0.0, 0.0, 1.3]
    plain = {"prefill": {"a": 2.6, "b": 5.0, "p": 0.5}}  # λ ~ 1 at 1k: where these inputs' counts move with λ
    law = {"prefill": {**plain["prefill"], "offsets": knots}}
    offset = float(np.interp(math.log2(kv_len), np.arange(10, 18), knots))
    expected_lam = 2.6 * math.exp(5.0 * 0.5 + offset) / kv_len**0.5
    law_out, law_stats = run_op(q, k, v, make_threshold_state(0.0, law=law, target=0.5))
    fixed_out, fixed_stats = run_op(q, k, v, expected_lam)
    assert torch.equal(law_stats, fixed_stats)
    torch.testing.assert_close(law_out, fixed_out, rtol=0, atol=1e-12)
    # the test can tell: without the offsets the law skips a different number of tiles
    assert not torch.equal(run_op(q, k, v, make_threshold_state(0.0, law=plain, target=0.5))[1], fixed_stats)


def test_disabled_state_is_dense():
    q, k, v = sink_inputs(query_len=100)
    dense, dense_stats = run_op(q, k, v, 0.0)
    out, stats = run_op(q, k, v, make_threshold_state(5.0, law=LAW, target=TARGET, enabled=False))
    assert torch.equal(out, dense) and torch.equal(stats, dense_stats)
    assert stats[PREFILL, 0] > 0 and stats[PREFILL, 1] == 0


@pytest.mark.parametrize("query_len", [1, 200], ids=["decode", "prefill"])
def test_trial_thresholds_count_like_single_runs(query_len):
    q, k, v = sink_inputs(query_len)
    trials = torch.tensor([0.0, 1e-5, 1e-3, 0.05, 0.5, 5.0])
    # the counts use the trials, the output still the state's λ (dense at 0, sparse at 5.0)
    for lam in (0.0, 5.0):
        out, stats = run_op(q, k, v, lam, trial_thresholds=trials)
        torch.testing.assert_close(out, run_op(q, k, v, lam)[0], rtol=0, atol=1e-12)
    assert not torch.allclose(out, run_op(q, k, v, 0.0)[0])  # λ = 5 does skip here

    phase = DECODE if query_len == 1 else PREFILL
    single_runs = [run_op(q, k, v, float(lam))[1][phase] for lam in trials]
    assert stats[phase].tolist() == [int(single_runs[0][0])] + [int(run[1]) for run in single_runs]
    assert stats[1 - phase].eq(0).all()
    assert 0 < stats[phase, -1] and stats[phase, 1] == 0  # the grid spans dense to sparse


# -- 4. torch.compile, torch.export, opcheck --


def causal_attention(q, k, v, threshold_state, stats):
    return torch.ops.fxsparse.skip_softmax_attention(
        q, k, v, None, True, 0.25, threshold_state, 32, 32, "pytorch", stats, None
    )


def assert_compiled_matches_eager(compiled, q, k, v, state) -> torch.Tensor:
    """Same output and same stats as the eager op; returns the compiled output."""
    eager_stats, compiled_stats = torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64)
    expected = causal_attention(q, k, v, state, eager_stats)
    out = compiled(q, k, v, state, compiled_stats)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(compiled_stats, eager_stats)
    return out


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_matches_eager_without_recompiling(backend):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(causal_attention, backend=counter, fullgraph=True)
    q, k, v = (t.float() for t in sink_inputs(query_len=100))
    state = make_threshold_state(0.0)
    outputs = []
    for lam in [1e-3, 0.5]:
        state.copy_(make_threshold_state(lam))  # in place, as SparseSite.set_threshold does
        outputs.append(assert_compiled_matches_eager(compiled, q, k, v, state))
    assert counter.frame_count == 1
    assert not torch.equal(outputs[0], outputs[1])  # the new threshold was read, not baked in


def test_inductor_compiles_the_op_without_stats():
    """An empty stats tensor means "don't count"; Inductor cannot lower a None mutated argument."""
    torch._dynamo.reset()
    q, k, v = (t.float() for t in sink_inputs(query_len=100))
    state, no_stats = make_threshold_state(0.5), torch.zeros(0, 2, dtype=torch.int64)
    compiled = torch.compile(causal_attention, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, state, no_stats), causal_attention(q, k, v, state, no_stats), rtol=0, atol=1e-6)
    assert no_stats.numel() == 0


@pytest.mark.parametrize(
    "lengths",
    [[(50, 100), (70, 130), (3, 200)], [(1, 131), (1, 132), (1, 140)]],
    ids=["prefill", "decode"],
)
def test_dynamic_shapes_compile_once_per_phase(lengths):
    """A growing KV cache must not recompile (Dynamo specialises size 1, so decode is its own graph)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(causal_attention, backend=counter, fullgraph=True, dynamic=True)
    state = make_threshold_state(0.1)
    for query_len, kv_len in lengths:
        q, k, v = (t.float() for t in sink_inputs(query_len, kv_len))
        assert_compiled_matches_eager(compiled, q, k, v, state)
    assert counter.frame_count == 1


class CausalSkipAttention(torch.nn.Module):
    """A module whose threshold state and stats are buffers, as rewritten sites carry them."""

    def __init__(self, lam):
        super().__init__()
        self.register_buffer("threshold_state", make_threshold_state(lam))
        self.register_buffer("stats", torch.zeros(2, 2, dtype=torch.int64))

    def forward(self, q, k, v):
        return causal_attention(q, k, v, self.threshold_state, self.stats)


@pytest.mark.parametrize("decompose", [False, True], ids=["training_ir", "inference_ir"])
def test_export_matches_eager_and_reads_buffers(decompose):
    q, k, v = (t.float() for t in sink_inputs(query_len=100))
    eager = CausalSkipAttention(1e-3)
    program = torch.export.export(CausalSkipAttention(1e-3), (q, k, v))
    if decompose:  # functionalized: the stats update becomes an explicit buffer mutation
        program = program.run_decompositions()
        assert "stats" in program.graph_signature.buffers_to_mutate.values()
    exported = program.module()
    for lam in [1e-3, 0.5]:
        for module in (eager, exported):
            module.threshold_state.copy_(make_threshold_state(lam))
            module.stats.zero_()
        torch.testing.assert_close(exported(q, k, v), eager(q, k, v), rtol=0, atol=1e-6)
        assert torch.equal(exported.stats, eager.stats)
    assert eager.stats[PREFILL, 1] > 0  # λ = 0.5 skips: the exported program counted real skips


def opcheck_samples():
    """(args) of the op: no mask, bool and additive masks, GQA decode, trial counting."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = random_inputs((1, 4, 2, 20, 50, 8, 8), generator=generator, dtype=torch.float32)
    decode_q = q[:, :, :1].clone()
    bool_mask = random_mask((1, 1, 20, 50), "bool", generator=generator)
    additive_mask = random_mask((1, 4, 20, 50), "additive_min", generator=generator)
    state = make_threshold_state(0.5)
    trials = torch.tensor([1e-3, 0.5, 2.0])

    def stats(trial_count=1):
        return torch.zeros(2, 1 + trial_count, dtype=torch.int64)

    return [
        (q, k, v, None, True, 0.3, state, 16, 16, "pytorch", torch.zeros(0, 2, dtype=torch.int64), None),
        (q, k, v, bool_mask, False, 0.3, state, 16, 32, "pytorch", stats(), None),
        (q, k, v, additive_mask, True, 0.3, state, 32, 16, "pytorch", stats(3), trials),
        (decode_q, k, v, None, True, 0.3, state, 16, 16, "auto", stats(), None),
    ]


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.fxsparse.skip_softmax_attention.default, opcheck_samples()[sample])


# -- 5. bad input: one clear ValueError each --


def valid_call() -> dict:
    """Keyword arguments of a valid public call (GQA 4:2, Lq = 8, Lk = 12)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = random_inputs((1, 4, 2, 8, 12, 16, 16), generator=generator, dtype=torch.float32)
    return {"q": q, "k": k, "v": v, "attn_mask": None, "threshold": 0.1, "br": 16, "bc": 16, "backend": "pytorch"}


BAD_INPUTS = {
    "q_not_4d": (lambda c: {"q": c["q"][0]}, "must be 4-D"),
    "head_dim_mismatch": (lambda c: {"k": c["k"][..., :8], "v": c["v"][..., :8]}, "head dims differ"),
    "batch_mismatch": (lambda c: {"k": c["k"].expand(2, -1, -1, -1)}, "batch sizes differ"),
    "kv_length_mismatch": (lambda c: {"v": c["v"][:, :, :5]}, "must share heads and length"),
    "dtype_mismatch": (lambda c: {"k": c["k"].double()}, "share one floating dtype"),
    "integer_dtype": (lambda c: {name: c[name].int() for name in "qkv"}, "floating dtype"),
    "device_mismatch": (lambda c: {"k": c["k"].to("meta")}, "one device"),
    "heads_not_divisible": (lambda c: {"q": c["q"][:, :3]}, "Hq=3 is not a multiple of Hkv=2"),
    "negative_threshold": (lambda c: {"threshold": -0.1}, "λ >= 0"),
    "nan_threshold": (lambda c: {"threshold": float("nan")}, "λ >= 0"),
    "threshold_missing_phase": (lambda c: {"threshold": {"prefill": 0.1}}, "'prefill' and 'decode'"),
    "threshold_state_shape": (lambda c: {"threshold": torch.zeros(2, 6)}, r"shape \(2, 14\)"),  # the layout before o(L)
    "br_zero": (lambda c: {"br": 0}, "br must be a positive power of two"),
    "br_not_power_of_two": (lambda c: {"br": 24}, "br must be a positive power of two"),
    "bc_negative": (lambda c: {"bc": -16}, "bc must be a positive power of two"),
    "mask_wrong_key_length": (lambda c: {"attn_mask": torch.ones(8, 13, dtype=torch.bool)}, "does not broadcast"),
    "mask_wrong_heads": (lambda c: {"attn_mask": torch.ones(1, 2, 8, 12, dtype=torch.bool)}, "does not broadcast"),
    "mask_5d": (lambda c: {"attn_mask": torch.ones(1, 1, 1, 8, 12, dtype=torch.bool)}, "does not broadcast"),
    "mask_integer": (lambda c: {"attn_mask": torch.ones(8, 12, dtype=torch.int32)}, "bool or floating"),
    "mask_device": (lambda c: {"attn_mask": torch.ones(8, 12, dtype=torch.bool, device="meta")}, "attn_mask is on"),
    "unknown_backend": (lambda c: {"backend": "cuda"}, "backend must be one of"),
    "triton_on_cpu": (lambda c: {"backend": "triton"}, "needs a CUDA device"),
}


@pytest.mark.parametrize("bad_input", list(BAD_INPUTS))
def test_bad_input_raises_value_error(bad_input):
    make_overrides, message = BAD_INPUTS[bad_input]
    call = valid_call()
    call.update(make_overrides(call))
    q, k, v = call.pop("q"), call.pop("k"), call.pop("v")
    with pytest.raises(ValueError, match=message):
        skip_softmax_attention(q, k, v, **call)


def test_valid_call_runs():
    """The baseline of the bad-input cases is itself valid, so each failure above is the one change."""
    call = valid_call()
    q, k, v = call.pop("q"), call.pop("k"), call.pop("v")
    assert skip_softmax_attention(q, k, v, **call).shape == (1, 4, 8, 16)
