"""SparseSite buffers: shapes per collect_stats, measuring mode restore, and dtype casts."""

import warnings

import pytest
import torch

from fxsparse.config import SiteConfig
from fxsparse.ops import skip_softmax_attention_op
from fxsparse.ops.threshold import ENABLED, THRESHOLD
from fxsparse.sites import SparseSite


def _attend(site, q, k, v):
    return skip_softmax_attention_op(
        q, k, v, None, True, 1.0, site.threshold_state, 4, 4, "pytorch", site.stats, site.trial_thresholds
    )


def test_site_without_stats_counts_nothing_and_measuring_restores_that():
    site = SparseSite("m.attn", SiteConfig(collect_stats=False, threshold=SiteConfig().threshold))
    q = k = v = torch.randn(1, 1, 12, 8)
    _attend(site, q, k, v)
    assert site.stats.shape == (0, 2) and site.sparsity() == {"prefill": None, "decode": None}
    with site.measuring(torch.tensor([0.1, 10.0])):
        _attend(site, q, k, v)
        assert site.stats.shape == (2, 3) and site.stats[0, 0] == 6  # 3 causal row tiles: 1 + 2 + 3 tiles
    assert site.stats.shape == (0, 2)


def test_half_cast_keeps_threshold_state_float32():
    site = SparseSite("m.attn", SiteConfig())
    site.set_threshold(1.0001e-4)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.add_module("site", site)
    model.half()
    assert model[0].weight.dtype == torch.float16
    assert site.threshold_state.dtype == torch.float32 and site.trial_thresholds.dtype == torch.float32
    assert site.threshold_state[0, THRESHOLD].item() == torch.tensor(1.0001e-4).item()


def test_measuring_counts_the_same_dense_or_skipping_and_restores_the_enable_flag():
    site = SparseSite("m.attn", SiteConfig(threshold=SiteConfig().threshold))
    site.set_threshold(10.0)  # skips most tiles of these inputs
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 40, 8) for _ in range(3))
    sparse = _attend(site, q, k, v)
    trials = torch.tensor([0.1, 10.0])
    counts, outputs = [], []
    for dense in (True, False):
        with site.measuring(trials, dense=dense):
            outputs.append(_attend(site, q, k, v))
            counts.append(site.stats.clone())
        assert site.enabled
    assert torch.equal(counts[0], counts[1]) and counts[0][0, 2] > 0
    site.set_enabled(False)
    torch.testing.assert_close(outputs[0], _attend(site, q, k, v), rtol=0, atol=0)  # dense: as a disabled site
    torch.testing.assert_close(outputs[1], sparse, rtol=0, atol=0)  # skipping: as the site runs normally
    assert not torch.allclose(outputs[0], outputs[1])


def test_dense_block_runs_as_disabled_and_restores_each_phase_flag():
    site = SparseSite("m.attn", SiteConfig(threshold=SiteConfig().threshold))
    site.set_threshold(10.0)
    site.threshold_state[1, ENABLED] = 0.0  # decode off, prefill on: both must come back as they were
    before = site.threshold_state.clone()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 40, 8) for _ in range(3))
    sparse = _attend(site, q, k, v)
    try:
        with site.dense():
            dense = _attend(site, q, k, v)
            assert not site.enabled
            raise KeyboardInterrupt  # an interrupted run restores the flags too
    except KeyboardInterrupt:
        pass
    assert torch.equal(site.threshold_state, before)
    site.set_threshold(0.0)  # λ = 0 never skips: the independent dense result
    torch.testing.assert_close(dense, _attend(site, q, k, v), rtol=0, atol=0)
    assert not torch.allclose(dense, sparse)


def test_set_target_warns_only_when_it_moves_a_law_with_length_offsets():
    site = SparseSite("m.attn", SiteConfig())
    offsets = [0.5, -0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]
    site.set_law({"prefill": {"a": 2.0, "b": 3.0, "offsets": offsets}, "decode": {"a": 1.0, "b": 2.0}}, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        site.set_target(0.5)  # the calibrated target: the offsets still hold
        site.set_target({"prefill": 0.5, "decode": 0.7})  # decode has no offsets
    with pytest.warns(UserWarning, match="offsets of the prefill law were fitted at the calibrated target"):
        site.set_target(0.7)
    assert site.law()["prefill"]["target"] == pytest.approx(0.7)
    assert site.law()["prefill"]["offsets"] == pytest.approx(offsets)  # kept, not dropped
