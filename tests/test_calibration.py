"""Calibration end to end on a tiny Llama whose attention runs through the op with SparseSite buffers,
and the one-pass trial counting checked against per-λ counting through the op's stats."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import fxsparse
from calibration_fixtures import essays, essays_folder, private_cache, tokenizer  # noqa: F401 (fixtures)
from fxsparse.calibration.calibrate import cap_site_laws, fit_laws, fit_length_offsets, match_length_bins
from fxsparse.calibration.fit import tiles_skipped
from fxsparse.calibration.measure import Recorder, run_sample, trial_grid
from fxsparse.ops.threshold import A, B, P, TARGET, make_threshold_state
from fxsparse.sites import PHASE_ROWS
from sparse_llama import tiny_llama
from test_hf_checkpoint import save_tiny_llama

# random weights only skip for λ near 1 and above (SPEC §9), so the tiny model's grid reaches past 0.99
TRIALS = trial_grid(40, low=1e-2, high=1e3)


def _config(essays: Path, **calibration):
    section = {"target_sparse_ratio": {"prefill": 0.5, "decode": 0.5}, "samples": 4, "max_seqlen": 2048,
               "chunk_size": 1024, "decode_steps": 3, "heldout_samples": 2, "data_dir": str(essays), **calibration}
    return {"sparse_cfg": {"calibration": section, "*attn*": {"br": 32, "bc": 32}, "default": {"enable": False}}}


def _structured_qkv(query_len, kv_len, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, query_len, dim, generator=g) * 2
    k = torch.randn(1, kv_heads, kv_len, dim, generator=g)
    k[:, :, :3] += q.mean(dim=(1, 2), keepdim=True)[:, :1] * 3  # a sink that many rows attend to
    return q, k, torch.randn(1, kv_heads, kv_len, dim, generator=g)


@pytest.mark.parametrize("query_len, kv_len", [(200, 200), (64, 200), (1, 333)])
def test_one_pass_counting_equals_per_threshold_counting(query_len, kv_len):
    q, k, v = _structured_qkv(query_len, kv_len)
    trials = torch.logspace(-4, 1, 17)
    state = make_threshold_state(0.0)
    one_pass = torch.zeros(2, 1 + len(trials), dtype=torch.int64)
    dense = torch.ops.fxsparse.skip_softmax_attention(q, k, v, None, True, 0.25, state, 32, 32, "pytorch", one_pass, trials)
    phase = PHASE_ROWS["decode" if query_len == 1 else "prefill"]
    assert torch.allclose(dense, torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=0.25,
        attn_mask=torch.ones(query_len, kv_len, dtype=torch.bool).tril(kv_len - query_len)), atol=1e-5)
    skipped_any = False
    for t, lam in enumerate(trials.tolist()):
        stats = torch.zeros(2, 2, dtype=torch.int64)
        torch.ops.fxsparse.skip_softmax_attention(
            q, k, v, None, True, 0.25, make_threshold_state(lam), 32, 32, "pytorch", stats, None)
        assert stats[phase, 0] == one_pass[phase, 0]
        assert stats[phase, 1] == one_pass[phase, 1 + t], f"λ={lam}"
        skipped_any |= bool(stats[phase, 1] > 0)
    assert skipped_any and one_pass[1 - phase].sum() == 0


def test_measuring_a_model_counts_like_per_threshold_runs(tokenizer):
    """Layer 0 sees the same inputs whatever the threshold, so its one-pass counts must equal sparse runs."""
    model = tiny_llama(vocab=len(tokenizer), br=32, bc=32, sharpness=8.0)
    sites = fxsparse.sites_of(model)
    first = sites["model.model.layers.0.self_attn"]
    ids = tokenizer("The grass is green. " * 60)["input_ids"][:300]
    with Recorder(model, sites, TRIALS) as recorder:
        run_sample(model, ids, chunk_size=128, decode_steps=2)
    prefill = [p for p in recorder.passes if p.phase == "prefill"]
    assert [p.kv_len for p in prefill] == [128, 256, 300]
    assert [p.kv_len for p in recorder.passes if p.phase == "decode"] == [301, 302]
    counted = sum(p.skipped[0] for p in prefill)
    for t in (5, 15, 25, 35):
        first.set_threshold({"prefill": float(TRIALS[t]), "decode": 0.0})
        first.reset_stats()
        run_sample(model, ids, chunk_size=128, decode_steps=0)
        assert int(first.stats[0, 0]) == sum(p.valid[0] for p in prefill)
        assert int(first.stats[0, 1]) == counted[t]
    assert counted[-1] > 0


def test_calibrate_writes_laws_and_reports_them(tokenizer, essays):
    model = tiny_llama(vocab=len(tokenizer), br=32, bc=32, sharpness=8.0)
    config = _config(essays, per_site=False, fit_length_exponent=True)  # samples of 1k and 2k tokens: p is fitted
    result = fxsparse.calibrate(model, config, tokenizer=tokenizer, trials=TRIALS)
    for phase in ("prefill", "decode"):
        law = result.laws[phase]
        assert law is not None and law.a > 0 and law.b > 0 and 0.0 <= law.r2 <= 1.0
        assert law.p != 1.0 and 0.0 <= law.p <= 4.0
    for site in fxsparse.sites_of(model).values():
        state = site.threshold_state
        for phase, row in PHASE_ROWS.items():
            assert float(state[row, A]) == pytest.approx(result.laws[phase].a, rel=1e-6)
            assert float(state[row, B]) == pytest.approx(result.laws[phase].b, rel=1e-6)
            assert float(state[row, P]) == pytest.approx(result.laws[phase].p, rel=1e-6)
            assert float(state[row, TARGET]) == pytest.approx(0.5)
        assert site.stats.shape == (2, 2) and site.trial_thresholds.numel() == 0  # measuring mode left
    text = result.format()
    assert f"{result.laws['prefill'].a:.4g}" in text and f"{result.laws['decode'].b:.3f}" in text
    assert f"{result.laws['prefill'].p:.3f}" in text
    assert "held-out" in text and f"{result.seconds:.1f} s" in text
    assert result.num_samples == 4
    assert {(row.phase, row.bin) for row in result.heldout} == {(p, b) for p in ("prefill", "decode") for b in (2048, 1024)}
    assert all(0.0 <= row.achieved <= 1.0 and row.samples == 1 for row in result.heldout)
    as_dict = result.to_dict()
    assert as_dict["laws"]["prefill"]["a"] == result.laws["prefill"].a and len(as_dict["trials"]) == len(TRIALS)


def test_per_site_laws_differ_and_are_written(tokenizer, essays):
    model = tiny_llama(vocab=len(tokenizer), br=32, bc=32, sharpness=8.0, seed=1)
    result = fxsparse.calibrate(model, _config(essays, per_site=True, heldout_samples=0), tokenizer=tokenizer, trials=TRIALS)
    sites = fxsparse.sites_of(model)
    assert set(result.site_laws) == set(sites) and result.heldout == []
    for name, site in sites.items():
        assert site.law()["prefill"]["a"] == pytest.approx(result.site_laws[name]["prefill"].a, rel=1e-6)
    a_values = {round(laws["prefill"].a, 6) for laws in result.site_laws.values()}
    assert len(a_values) == len(sites)
    text = result.format()
    assert "per-site laws" in text and "pooled toward the model-wide law (weight 0.5)" in text
    assert "capped at 1.15x the target" in text and result.per_site_cap == 1.15
    # the written laws are the sites' own fits (length exponent fitted) pooled with the default weight,
    # refitted from the same passes, then capped: no site sparser than 1.15x the target on the passes, the
    # mean at the target; then matched to the length bins; then offset per length so each bin is at the target
    laws, pooled, _ = fit_laws(result.passes, result.trials, result.targets, list(sites), 0.5, fit_exponent=True)
    capped, held, _ = cap_site_laws(pooled, result.passes, result.trials, result.targets, 1.15)
    assert held == result.capped and result.to_dict()["capped"] == held
    for phase, target in result.targets.items():
        skipped, valid = tiles_skipped(result.passes, phase, result.trials, [capped[n][phase] for n in sites], target)
        assert skipped.sum() / valid.sum() == pytest.approx(target, abs=0.01)
        assert (skipped / valid <= 1.15 * target + 0.01).all()
    laws, matched, corrections = match_length_bins(laws, capped, list(sites), result.passes, result.trials, True)
    assert corrections == result.bin_corrections and "matched to the length bins" in text
    _, offset = fit_length_offsets(laws, matched, list(sites), result.passes, result.trials, result.targets)
    assert offset == result.site_laws and "per-length offsets of ln λ" in text
    assert any(law.offsets for laws in result.site_laws.values() for law in laws.values())


def test_forward_loop_measures_user_data_and_warns_for_unmeasured_decode(tokenizer):
    model = tiny_llama(vocab=len(tokenizer), br=32, bc=32, sharpness=8.0)
    g = torch.Generator().manual_seed(0)

    def loop(m):
        for length in (512, 1024):
            m(input_ids=torch.randint(0, len(tokenizer), (1, length), generator=g))

    result = fxsparse.calibrate(model, {"sparse_cfg": {"calibration": {"heldout_samples": 0}, "*attn*": {}}},
                                forward_loop=loop, trials=TRIALS)
    assert result.laws["prefill"] is not None and result.laws["decode"] is None
    assert any("decode" in w for w in result.warnings)
    site = next(iter(fxsparse.sites_of(model).values()))
    assert set(site.law()) == {"prefill"}


def test_errors(tokenizer):
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no enabled sparse attention sites"):
        fxsparse.calibrate(plain, None, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer="):
        fxsparse.calibrate(tiny_llama(), None)


def test_calibrate_a_model_rewritten_by_sparsify(tokenizer, essays):
    """The product path: a tiny HF Llama through fxsparse.sparsify, then calibrate; laws land in its sites."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096)
    model = tiny_llama(vocab=len(tokenizer), sharpness=8.0)  # same sharpened weights, plain HF attention
    plain = LlamaForCausalLM(config).eval()
    plain.load_state_dict(model.state_dict())
    sparse_cfg = _config(essays, heldout_samples=0, samples=3, max_seqlen=1024, per_site=False)
    sparse_cfg["sparse_cfg"]["*attn*"].update(backend="pytorch", enable=True)
    calibration = sparse_cfg["sparse_cfg"].pop("calibration")
    fxsparse.sparsify(plain, sparse_cfg)
    result = fxsparse.calibrate(plain, {"sparse_cfg": {"calibration": calibration, "*attn*": {}}},
                                tokenizer=tokenizer, trials=TRIALS)
    sites = fxsparse.sites_of(plain)
    assert len(sites) == 2
    for site in sites.values():
        law = site.law()
        assert law["prefill"]["a"] == pytest.approx(result.laws["prefill"].a, rel=1e-6)
        assert law["decode"]["b"] == pytest.approx(result.laws["decode"].b, rel=1e-6)
    assert "prefill" in result.format() and result.num_passes > 0


def test_sparsify_calibrates_with_the_tokenizer_saved_with_the_model(tmp_path, caplog):
    """No tokenizer=: as with HuggingFace, the tokenizer is the one at the model's name_or_path."""
    from transformers import AutoModelForCausalLM

    save_tiny_llama(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    config = copy.deepcopy(fxsparse.SKIP_SOFTMAX_CALIB)
    config["sparse_cfg"]["calibration"].update(samples=2, max_seqlen=1024, heldout_samples=0, per_site=False,
                                               data_dir=str(essays_folder(tmp_path)))
    with caplog.at_level(logging.INFO, logger="fxsparse.calibration.calibrate"):
        fxsparse.sparsify(model, config)
    assert f"loaded from the model's path {tmp_path / 'model'}" in caplog.text
    laws = [site.law() for site in fxsparse.sites_of(model).values()]
    assert len(laws) == 2 and laws[0] and all(law == laws[0] for law in laws)  # one model-wide law in every site
    for values in laws[0].values():
        assert values["a"] > 0 and values["b"] > 0 and values["target"] == pytest.approx(0.5)


def test_no_tokenizer_at_the_models_path_names_the_path(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320)
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # weights only, no tokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"calibration needs tokenizer= .* or forward_loop=") as error:
        fxsparse.sparsify(model, fxsparse.SKIP_SOFTMAX_CALIB)
    assert f"no tokenizer at the model's path '{tmp_path}'" in str(error.value) and "\n" not in str(error.value)
    assert not fxsparse.sites_of(model)  # refused before the rewrite


def test_refit_while_skipping_fits_the_counts_of_a_skipping_model(tokenizer, essays):
    from fxsparse.calibration.calibrate import laws_from_passes
    from fxsparse.config import SparseAttentionConfig

    results = {}
    for refit in (False, True):
        model = tiny_llama(vocab=len(tokenizer), br=32, bc=32, sharpness=8.0, seed=2)
        config = _config(essays, per_site=True, heldout_samples=0, refit_while_skipping=refit)
        results[refit] = fxsparse.calibrate(model, config, tokenizer=tokenizer, trials=TRIALS)
    dense, skipping = results[False].passes, results[True].passes
    assert [(p.phase, p.sample, p.kv_len) for p in dense] == [(p.phase, p.sample, p.kv_len) for p in skipping]
    # the first layer sees the same inputs either way, so counts the same; later layers see a sparse model's
    first = [p for p in dense if p.phase == "prefill"][0]
    for d, s in zip(dense, skipping):
        if d.phase == "prefill" and d.sample == first.sample and d.kv_len == first.kv_len:
            assert np.array_equal(d.skipped[0], s.skipped[0])
    assert any(not np.array_equal(d.skipped[1:], s.skipped[1:]) for d, s in zip(dense, skipping))
    assert "refitted on a skipping model's counts" in results[True].format()
    assert "refitted" not in results[False].format() and results[True].to_dict()["refit_while_skipping"]
    # the laws written are the ones the skipping passes give
    cfg = SparseAttentionConfig.from_dict(config).calibration
    refitted = laws_from_passes(skipping, results[True].trials, results[True].targets, list(results[True].site_laws), cfg)
    assert refitted.site_laws == results[True].site_laws != results[False].site_laws
    for name, site in fxsparse.sites_of(model).items():
        assert site.law()["prefill"]["a"] == pytest.approx(results[True].site_laws[name]["prefill"].a, rel=1e-6)
