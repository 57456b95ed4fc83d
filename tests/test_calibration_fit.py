"""The law fit sf = a·exp(b·S): recovery from synthetic points, point extraction, decode merging, and the
per-site sparsity cap computed from measured passes."""

from __future__ import annotations

import numpy as np
import pytest

from fxsparse.calibration.calibrate import cap_site_laws
from fxsparse.calibration.fit import LawFit, fit_law, law_points, tiles_skipped
from fxsparse.calibration.measure import Pass, merge_decode, trial_grid


def test_fit_recovers_a_and_b_from_synthetic_points():
    rng = np.random.default_rng(0)
    a, b = 3.5, 9.0
    sparsity = rng.uniform(0.0, 1.0, 400)
    sf = a * np.exp(b * sparsity) * np.exp(rng.normal(0.0, 0.05, sparsity.size))
    outside = (sparsity < 0.1) | (sparsity > 0.9)
    sf[outside] *= 50.0  # points outside [0.1, 0.9] are garbage and must be ignored
    law = fit_law(sf / 1000, np.full(sf.shape, 1000.0), sparsity)  # one length: the 1/L law
    assert law.p == 1.0
    assert law.a == pytest.approx(a, rel=0.05)
    assert law.b == pytest.approx(b, rel=0.02)
    assert law.r2 > 0.99
    assert law.points == int((~outside).sum())
    assert law.observed_min == pytest.approx(sparsity.min()) and law.observed_max == pytest.approx(sparsity.max())
    assert law.threshold(0.5, kv_len=1000) == pytest.approx(law.a * np.exp(law.b * 0.5) / 1000)
    assert law.covers(0.5) and not law.covers(1.5)


def test_fit_recovers_exactly_without_noise():
    sparsity = np.linspace(0.12, 0.88, 20)
    law = fit_law(0.02 * np.exp(12.0 * sparsity), np.ones(20), sparsity)
    assert law.a == pytest.approx(0.02, rel=1e-9) and law.b == pytest.approx(12.0, rel=1e-9)
    assert law.r2 == pytest.approx(1.0)


def test_fit_recovers_the_length_exponent_across_lengths():
    rng = np.random.default_rng(1)
    a, b, p = 40.0, 10.0, 2.2
    sparsity = rng.uniform(0.1, 0.9, 600)
    kv_len = rng.choice([1024.0, 2048.0, 4096.0, 8192.0], sparsity.size)
    thresholds = a * np.exp(b * sparsity) / kv_len**p * np.exp(rng.normal(0.0, 0.05, sparsity.size))
    law = fit_law(thresholds, kv_len, sparsity)
    assert (law.a, law.b, law.p) == pytest.approx((a, b, p), rel=0.03)
    assert law.threshold(0.5, 4096) == pytest.approx(a * np.exp(b * 0.5) / 4096**p, rel=0.05)
    assert law.r2 > 0.99  # of ln(λ·L^p) on S: the lengths' spread does not inflate it
    # a site's fit keeps the exponent it is given; the 1/L law misses the spread across lengths
    fixed = fit_law(thresholds, kv_len, sparsity, exponent=1.0)
    assert fixed.p == 1.0 and fixed.r2 < 0.9
    assert fit_law(thresholds, kv_len, sparsity, exponent=p).b == pytest.approx(b, rel=0.02)


def test_pooled_law_interpolates_log_scale_factors():
    own = LawFit(a=8.0, b=12.0, r2=0.7, points=30, observed_min=0.0, observed_max=0.9)
    model_wide = LawFit(a=0.5, b=6.0, r2=0.9, points=900, observed_min=0.0, observed_max=0.95)
    assert own.pooled_toward(model_wide, 1.0) == own
    flat = own.pooled_toward(model_wide, 0.0)
    assert (flat.a, flat.b) == pytest.approx((0.5, 6.0)) and flat.r2 == own.r2  # fit statistics stay the site's
    half = own.pooled_toward(model_wide, 0.5)
    for s in (0.2, 0.5, 0.8):  # at every S, ln sf is the mean of the two laws' ln sf
        expected = 0.5 * (np.log(own.scale_factor(s)) + np.log(model_wide.scale_factor(s)))
        assert np.log(half.scale_factor(s)) == pytest.approx(expected)
    back = half.pooled_toward(model_wide, 2.0)  # weight 1/w undoes pooling with w
    assert (back.a, back.b) == pytest.approx((own.a, own.b))


def test_fit_refuses_unusable_points():
    ones = np.ones(3)
    assert fit_law(np.zeros(0), np.zeros(0), np.zeros(0)) is None
    assert fit_law(np.array([1.0, 2.0, 3.0]), ones, np.array([0.0, 0.05, 0.95])) is None  # none in range
    assert fit_law(np.array([1.0, 2.0, 3.0]), ones, np.array([0.5, 0.5, 0.5])) is None  # no spread
    assert fit_law(np.array([3.0, 2.0, 1.0]), ones, np.array([0.2, 0.5, 0.8])) is None  # falling: not a law


def _pass(phase, sample, kv_len, valid, skipped):
    return Pass(phase, sample, kv_len, np.array(valid), np.array(skipped))


def test_law_points_global_and_per_site():
    trials = [0.01, 0.1]
    passes = [
        _pass("prefill", 0, 1000.0, [10, 30], [[1, 5], [3, 15]]),
        _pass("decode", 0, 1001.0, [4, 4], [[0, 4], [2, 4]]),
    ]
    lam, kv_len, s = law_points(passes, "prefill", trials)
    assert np.allclose(lam, trials) and np.allclose(kv_len, 1000.0) and np.allclose(s, [4 / 40, 20 / 40])
    _, _, s = law_points(passes, "prefill", trials, site=0)
    assert np.allclose(s, [0.1, 0.5])
    lam, kv_len, s = law_points(passes, "decode", trials, site=1)
    assert np.allclose(kv_len, 1001.0) and np.allclose(s, [0.5, 1.0])


def test_merge_decode_sums_steps_per_sample():
    passes = [
        _pass("prefill", 0, 100.0, [5], [[1]]),
        _pass("decode", 0, 101.0, [2], [[1]]),
        _pass("decode", 0, 103.0, [2], [[2]]),
        _pass("decode", 1, 50.0, [3], [[0]]),
    ]
    merged = merge_decode(passes)
    decode = sorted((p for p in merged if p.phase == "decode"), key=lambda p: p.sample)
    assert [p.kv_len for p in decode] == [102.0, 50.0]
    assert decode[0].valid.tolist() == [4] and decode[0].skipped.tolist() == [[3]]
    assert sum(p.phase == "prefill" for p in merged) == 1


def test_trial_grid():
    grid = trial_grid()
    assert len(grid) == 48 and float(grid[0]) == pytest.approx(1e-6) and float(grid[-1]) == pytest.approx(100.0)
    assert float(trial_grid(40, 1e-6, 0.99)[-1]) == pytest.approx(0.99)
    assert bool((grid[1:] > grid[:-1]).all())


def test_per_site_fit_falls_back_to_the_model_wide_law():
    from fxsparse.calibration.calibrate import fit_laws

    trials = np.logspace(-3, 1, 20)
    passes = []
    for sample, kv_len in enumerate((1000.0, 2000.0, 1500.0)):
        share = np.clip(np.log10(trials * kv_len) / 4.0, 0, 1)  # site 0 skips more as λ grows; site 1 never
        skipped = np.stack([np.round(100 * share), np.zeros_like(share)]).astype(np.int64)
        for phase in ("prefill", "decode"):
            passes.append(Pass(phase, sample, kv_len, np.array([100, 100]), skipped))
    laws, site_laws, warnings = fit_laws(passes, trials, {"prefill": 0.3, "decode": 0.3}, ["layers.0", "layers.1"])
    assert laws["prefill"] is not None and laws["prefill"].observed_max <= 0.5
    assert site_laws["layers.0"]["prefill"] != laws["prefill"]
    assert site_laws["layers.1"]["prefill"] == laws["prefill"]
    assert any("layers.1" in w and "model-wide" in w for w in warnings)
    # pooled: the site's own fit moved halfway (in ln sf) toward the model-wide law; the fallback is unchanged
    _, pooled, _ = fit_laws(passes, trials, {"prefill": 0.3, "decode": 0.3}, ["layers.0", "layers.1"], site_weight=0.5)
    own, model_wide = site_laws["layers.0"]["prefill"], laws["prefill"]
    assert pooled["layers.0"]["prefill"].b == pytest.approx((own.b + model_wide.b) / 2)
    assert pooled["layers.0"]["prefill"].a == pytest.approx(np.sqrt(own.a * model_wide.a))
    assert pooled["layers.1"]["prefill"] == model_wide


def _reached(passes, trials, laws, target):
    """Reference for tiles_skipped: np.interp of every (pass, site) count at that site's ln λ."""
    skipped, valid = np.zeros(len(laws)), np.zeros(len(laws))
    for p in passes:
        for i, law in enumerate(laws):
            skipped[i] += np.interp(np.log(law.threshold(target, p.kv_len)), np.log(trials), p.skipped[i])
            valid[i] += p.valid[i]
    return skipped, valid


def _easy_and_hard_sites(trials, ease=(0.02, 0.1, 3.0, 10.0, 30.0)):
    """Prefill passes of sites whose sparsity grows with ln λ, each from a different λ on (easy sites skip
    early), at three lengths."""
    passes = []
    for sample, kv_len in enumerate((1024.0, 2048.0, 4096.0)):
        share = np.stack([np.clip(np.log10(trials * kv_len * e) / 5.0, 0.0, 0.95) for e in ease])
        valid = np.array([kv_len // 16] * len(ease))
        passes.append(Pass("prefill", sample, kv_len, valid, np.round(share * valid[:, None])))
    return passes


def test_tiles_skipped_interpolates_each_pass_at_its_threshold():
    trials = np.logspace(-4, 1, 30)
    passes = _easy_and_hard_sites(trials)
    laws = [LawFit(a, 6.0, 1.0, 10, 0.1, 0.9) for a in (1e-3, 0.5, 4.0, 30.0, 1e6)]  # the last is past the grid
    skipped, valid = tiles_skipped(passes, "prefill", trials, laws, 0.4)
    expected_skipped, expected_valid = _reached(passes, trials, laws, 0.4)
    np.testing.assert_allclose(skipped, expected_skipped, rtol=1e-9)
    np.testing.assert_array_equal(valid, expected_valid)
    assert skipped[-1] == sum(p.skipped[-1, -1] for p in passes)  # clamped to the last trial
    assert tiles_skipped(passes, "decode", trials, laws, 0.4)[1].sum() == 0  # no decode passes measured


def test_cap_holds_easy_sites_at_the_cap_and_the_mean_at_the_target():
    trials = np.logspace(-4, 1, 30)
    passes = _easy_and_hard_sites(trials)
    names = [f"layers.{i}" for i in range(5)]
    base = LawFit(2.0, 5.0, 0.9, 100, 0.1, 0.9)
    site_laws = {name: {"prefill": base} for name in names}
    target, cap = 0.5, 1.15
    laws, capped, warnings = cap_site_laws(site_laws, passes, trials, {"prefill": target}, cap)
    chosen = [laws[name]["prefill"] for name in names]
    skipped, valid = _reached(passes, trials, chosen, target)
    assert skipped.sum() / valid.sum() == pytest.approx(target, abs=2e-3) and warnings == []
    sparsity = skipped / valid
    assert (sparsity <= cap * target + 2e-3).all()
    assert capped["prefill"] == names[2:]  # the three easiest sites reach the cap
    np.testing.assert_allclose(sparsity[2:], cap * target, atol=2e-3)
    assert chosen[0].a == pytest.approx(chosen[1].a) and chosen[0].a > base.a  # the others share one factor
    assert all(law.b == base.b for law in chosen)
    # without a binding cap every site keeps the common factor: one law, its mean moved to the target
    loose, capped, _ = cap_site_laws(site_laws, passes, trials, {"prefill": target}, 10.0)
    assert capped["prefill"] == [] and len({loose[name]["prefill"].a for name in names}) == 1
    skipped, valid = _reached(passes, trials, [loose[name]["prefill"] for name in names], target)
    assert skipped.sum() / valid.sum() == pytest.approx(target, abs=2e-3)


def test_fit_laws_share_the_model_wide_length_exponent():
    from fxsparse.calibration.calibrate import fit_laws

    trials = np.logspace(-9, 1, 40)
    passes = []
    for sample, kv_len in enumerate((1024.0, 2048.0, 4096.0, 8192.0)):
        # sparsity grows with ln(λ·L²): the λ a target needs falls like 1/L², site 1 a little later than site 0
        share = np.stack([np.clip((np.log(trials * kv_len**2) - shift) / 12.0, 0.0, 0.95) for shift in (0.0, 1.0)])
        valid = np.array([400, 400])
        for phase in ("prefill", "decode"):
            passes.append(Pass(phase, sample, kv_len, valid, np.round(share * 400)))
    targets = {"prefill": 0.5, "decode": 0.5}
    laws, site_laws, _ = fit_laws(passes, trials, targets, ["a", "b"], fit_exponent=True)
    assert laws["prefill"].p == pytest.approx(2.0, abs=0.05)
    assert {site_laws[name][phase].p for name in "ab" for phase in targets} == {laws["prefill"].p, laws["decode"].p}
    for kv_len in (1024, 8192):  # the fitted law reaches the target at every length; the 1/L law cannot
        assert tiles_skipped([p for p in passes if p.kv_len == kv_len], "prefill", trials, [laws["prefill"]] * 2,
                             0.5)[0].sum() / 800 == pytest.approx(0.5, abs=0.03)
    one_over_l, _, _ = fit_laws(passes, trials, targets, fit_exponent=False)
    assert one_over_l["prefill"].p == 1.0
    reached = [tiles_skipped([p for p in passes if p.kv_len == kv_len], "prefill", trials, [one_over_l["prefill"]] * 2,
                             0.5)[0].sum() / 800 for kv_len in (1024, 8192)]
    assert reached[1] - reached[0] > 0.15  # ln 8 / 12 = 0.17 apart


def _law_shaped_passes(trials, log_a, b, p, sites=2):
    """Passes of 4 samples (one per length bin) whose sparsity is exactly the law ln λ = log_a + b·S − p·ln L,
    the same at every site, for prefill (two chunks at 8k, as chunked prefill measures) and decode."""
    passes = []
    for sample, kv_len in enumerate((1024.0, 2048.0, 4096.0, 8192.0)):
        chunks = (kv_len,) if kv_len < 8192 else (4096.0, 8192.0)
        for phase, length in [("prefill", c) for c in chunks] + [("decode", kv_len + 4)]:
            share = np.clip((np.log(trials) - log_a + p * np.log(length)) / b, 0.0, 1.0)
            valid = np.full(sites, 1000.0)
            passes.append(Pass(phase, sample, length, valid, np.tile(1000.0 * share, (sites, 1))))
    return passes


def test_match_length_bins_recovers_the_law_the_bins_follow():
    from fxsparse.calibration.calibrate import match_length_bins
    from fxsparse.calibration.fit import length_bins_of

    trials = np.logspace(-9, 2.5, 200)
    log_a, b, p = 10.0, 8.0, 2.0
    passes = _law_shaped_passes(trials, log_a, b, p)
    assert length_bins_of(passes) == {0: 1024, 1: 2048, 2: 4096, 3: 8192}
    start = LawFit(1.0, 5.0, 0.9, 100, 0.1, 0.9)  # a, b and p all wrong
    laws, site_laws, corrections = match_length_bins({"prefill": start, "decode": start},
                                                     {"s0": {"prefill": start}, "s1": {"prefill": start.scaled(2.0)}},  # decode: model-wide
                                                     ["s0", "s1"], passes, trials, fit_exponent=True)
    for phase in ("prefill", "decode"):
        for target in (0.3, 0.5, 0.7):  # every bin reaches every target
            for sample in range(4):
                group = [x for x in passes if x.sample == sample]
                chosen = [site_laws[name].get(phase, laws[phase]) for name in ("s0", "s1")]
                skipped, valid = tiles_skipped(group, phase, trials, chosen, target)
                assert skipped.sum() / valid.sum() == pytest.approx(target, abs=0.01), (phase, target, sample)
    decode = laws["decode"]  # one law everywhere: it becomes the bins' own (decode passes sit at L + 4)
    assert np.log(decode.a) == pytest.approx(log_a, abs=0.1) and decode.b == pytest.approx(b, abs=0.1)
    assert decode.p == pytest.approx(p, abs=0.02)
    c, d, q = corrections["decode"]
    assert (c, d, q) == pytest.approx((log_a, b - 5.0, p - 1.0), abs=0.1)
    s0, s1 = site_laws["s0"]["prefill"], site_laws["s1"]["prefill"]  # one correction for all: ratios kept
    assert s1.a / s0.a == pytest.approx(2.0) and s1.b == s0.b and s1.p == s0.p
    # without the exponent only a and b move, and p stays the fit's
    laws, _, corrections = match_length_bins({"prefill": start}, {}, ["s0", "s1"], passes, trials, fit_exponent=False)
    assert laws["prefill"].p == 1.0 and corrections["prefill"][2] == 0.0


def test_length_offsets_bring_each_bin_to_the_target():
    """A bin off the smooth law (the 1k bin needs e^1.5 times the λ the others follow) is reached by o(L) alone;
    the bins on the law get offsets of ~0, and every site gets the same knots."""
    from fxsparse.calibration.calibrate import fit_length_offsets

    trials = np.logspace(-9, 2.5, 200)
    log_a, b, p = 10.0, 8.0, 2.0
    passes = _law_shaped_passes(trials, log_a, b, p)
    short = _law_shaped_passes(trials, log_a + 1.5, b, p)
    passes = [x for x in passes if x.sample > 0] + [x for x in short if x.sample == 0]
    exact = LawFit(float(np.exp(log_a)), b, 1.0, 100, 0.1, 0.9, p)
    site_laws = {"s0": {"prefill": exact}, "s1": {"prefill": exact.scaled(1.0)}}
    for target in (0.3, 0.7):
        laws, sites = fit_length_offsets({"prefill": exact, "decode": exact}, site_laws, ["s0", "s1"], passes, trials,
                                         {"prefill": target, "decode": 0.0})
        offsets = laws["prefill"].offsets
        assert offsets[0] == pytest.approx(1.5, abs=0.05) and offsets[1] == pytest.approx(0.0, abs=0.05)
        assert sites["s0"]["prefill"].offsets == sites["s1"]["prefill"].offsets == offsets
        assert laws["decode"].offsets == ()  # target 0: nothing to reach
        for sample in range(4):
            group = [x for x in passes if x.sample == sample]
            skipped, valid = tiles_skipped(group, "prefill", trials, [laws["prefill"]] * 2, target)
            assert skipped.sum() / valid.sum() == pytest.approx(target, abs=0.01), (target, sample)
        before, valid = tiles_skipped([x for x in passes if x.sample == 0], "prefill", trials, [exact] * 2, target)
        assert before.sum() / valid.sum() < target - 0.1  # without the offsets the short bin misses


def test_bin_shortfalls_name_the_bins_that_miss_the_target():
    from fxsparse.calibration.calibrate import bin_shortfalls

    trials = np.logspace(-9, 2.5, 200)
    passes = _law_shaped_passes(trials, 10.0, 8.0, 2.0)
    for p in passes:
        if p.sample == 0:  # the 1k bin: 40 % of its tiles are never skipped, as with an always-kept first tile
            np.minimum(p.skipped, 600.0, out=p.skipped)
    exact = LawFit(float(np.exp(10.0)), 8.0, 1.0, 100, 0.1, 0.9, 2.0)  # the law the other bins follow
    laws = {"prefill": exact, "decode": exact}
    assert bin_shortfalls(laws, {}, ["s0", "s1"], passes, trials, {"prefill": 0.5, "decode": 0.5}) == []
    warnings = bin_shortfalls(laws, {}, ["s0", "s1"], passes, trials, {"prefill": 0.7, "decode": 0.0})
    assert warnings == ["prefill: the 1024-token length bin reaches 0.60 on the calibration samples, not the target "
                        "0.70 (at most 0.60 at the largest trial λ)"]
