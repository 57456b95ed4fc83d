"""The sparse_cfg dict: validation messages, presets, pattern resolution and the dict round trip."""

from __future__ import annotations

import copy

import pytest

from fxsparse.config import (
    SKIP_SOFTMAX_CALIB,
    SKIP_SOFTMAX_DEFAULT,
    CalibrationConfig,
    PhaseValues,
    SiteConfig,
    SparseAttentionConfig,
)

SITES = [f"model.layers.{i}.self_attn" for i in range(3)] + ["model.vision.attn"]


def config_with(**site_settings) -> dict:
    return {"sparse_cfg": {"*self_attn": site_settings}}


# -- validation: each error is one line naming the field and what is allowed --

BAD_CONFIGS = {
    "unknown_top_key": ({"sparse_cfg": {}, "sparse": {}}, r"config: unknown key 'sparse'; valid keys are \['sparse_cfg'\]"),
    "missing_sparse_cfg": ({}, "missing 'sparse_cfg'"),
    "not_a_dict": ([], "must be a dict"),
    "unknown_site_key": (config_with(treshold=1e-3), r"unknown key 'treshold'; valid keys are \[.*'threshold'.*\]"),
    "unknown_calibration_key": (
        {"sparse_cfg": {"calibration": {"sample": 8}}},
        r"sparse_cfg.calibration: unknown key 'sample'; valid keys are \[.*'samples'.*\]",
    ),
    "unknown_phase": (config_with(threshold={"prefill": 1e-3, "prefil": 1e-4}), r"unknown key 'prefil'.*'decode'"),
    "missing_phase": (config_with(threshold={"prefill": 1e-3}), r"threshold: missing phase\(s\) \['decode'\]"),
    "negative_threshold": (config_with(threshold=-1e-3), r"threshold must be in \[0.0, inf\], got -0.001"),
    "threshold_not_number": (config_with(threshold="1e-3"), r"threshold must be a number"),
    "threshold_nan": (config_with(threshold=float("nan")), r"threshold must be a number"),
    "decode_threshold_negative": (
        config_with(threshold={"prefill": 1e-3, "decode": -1.0}),
        r"threshold.decode must be in \[0.0, inf\]",
    ),
    "br_not_power_of_two": (config_with(br=96), r"\.br must be a power of two, got 96"),
    "bc_zero": (config_with(bc=0), r"\.bc must be an integer >= 1, got 0"),
    "br_float": (config_with(br=128.0), r"\.br must be an integer >= 1"),
    "bad_backend": (config_with(backend="cuda"), r"\.backend must be one of \['auto', 'pytorch', 'triton'\], got 'cuda'"),
    "bad_method": (config_with(method="topk"), r"\.method must be one of \['flash_skip_softmax'\]"),
    "enable_not_bool": (config_with(enable=1), r"\.enable must be True or False, got 1"),
    "site_not_dict": ({"sparse_cfg": {"*attn*": 1e-3}}, r"sparse_cfg\['\*attn\*'\] must be a dict"),
    "pattern_not_str": ({"sparse_cfg": {3: {"enable": True}}}, r"sparse_cfg keys are fnmatch patterns .*, got 3"),
    "target_out_of_range": (
        {"sparse_cfg": {"calibration": {"target_sparse_ratio": 1.0}}},
        r"target_sparse_ratio must be in \[0.0, 0.99\], got 1.0",
    ),
    "max_seqlen_too_small": (
        {"sparse_cfg": {"calibration": {"max_seqlen": 512}}},
        r"calibration.max_seqlen must be an integer >= 1024, got 512",
    ),
    "data_dir_not_path": ({"sparse_cfg": {"calibration": {"data_dir": 3}}}, r"data_dir must be a directory path"),
    "site_weight_above_one": (
        {"sparse_cfg": {"calibration": {"per_site_weight": 1.5}}},
        r"calibration.per_site_weight must be in \[0.0, 1.0\], got 1.5",
    ),
    "length_exponent_not_flag": (
        {"sparse_cfg": {"calibration": {"fit_length_exponent": "yes"}}},
        r"calibration.fit_length_exponent must be True or False",
    ),
    "site_cap_below_one": (  # a cap under the target could not keep the mean at the target
        {"sparse_cfg": {"calibration": {"per_site_cap": 0.9}}},
        r"calibration.per_site_cap must be in \[1.0, 10.0\], got 0.9",
    ),
}


@pytest.mark.parametrize("bad_config", list(BAD_CONFIGS))
def test_bad_config_is_one_clear_error(bad_config):
    config, message = BAD_CONFIGS[bad_config]
    with pytest.raises(ValueError, match=message) as error:
        SparseAttentionConfig.from_dict(config)
    assert "\n" not in str(error.value)


# -- presets --


def test_default_preset_has_fixed_thresholds_per_phase():
    resolved = SparseAttentionConfig.from_dict(SKIP_SOFTMAX_DEFAULT).resolve(SITES)
    assert resolved["model.layers.0.self_attn"] == SiteConfig(threshold=PhaseValues(1e-3, 1e-4))
    assert SparseAttentionConfig.from_dict(SKIP_SOFTMAX_DEFAULT).calibration is None


def test_calib_preset_targets_half_sparsity_per_phase():
    config = SparseAttentionConfig.from_dict(SKIP_SOFTMAX_CALIB)
    assert config.calibration == CalibrationConfig(target_sparse_ratio=PhaseValues(0.5, 0.5), samples=64, max_seqlen=8192)
    assert all(site.enable for site in config.resolve(SITES).values())


def test_parsing_does_not_mutate_presets():
    before = copy.deepcopy(SKIP_SOFTMAX_CALIB)
    SparseAttentionConfig.from_dict(SKIP_SOFTMAX_CALIB).resolve(SITES)
    assert SKIP_SOFTMAX_CALIB == before


# -- pattern resolution --


def test_default_applies_first_and_later_patterns_override():
    config = SparseAttentionConfig.from_dict(
        {
            "sparse_cfg": {
                "*self_attn": {"threshold": 0.1, "br": 64},
                "*layers.1.*": {"threshold": {"prefill": 0.2, "decode": 0.3}},
                "default": {"enable": False, "bc": 32},  # written last, still applied first
            }
        }
    )
    resolved = config.resolve(SITES)
    assert resolved["model.layers.0.self_attn"] == SiteConfig(threshold=PhaseValues(0.1, 0.1), br=64, bc=32, enable=False)
    assert resolved["model.layers.1.self_attn"] == SiteConfig(threshold=PhaseValues(0.2, 0.3), br=64, bc=32, enable=False)
    assert resolved["model.vision.attn"] == SiteConfig(bc=32, enable=False)


def test_later_pattern_wins_over_earlier():
    config = SparseAttentionConfig.from_dict(
        {"sparse_cfg": {"*layers.2.*": {"enable": False}, "*attn": {"enable": True}}}
    )
    assert config.resolve(SITES)["model.layers.2.self_attn"].enable


def test_triton_tiles_out_of_range_are_an_error_at_resolve():
    config = SparseAttentionConfig.from_dict(
        {"sparse_cfg": {"*attn": {"backend": "triton"}, "*layers.1.*": {"bc": 8}, "*vision*": {"br": 512}}}
    )
    with pytest.raises(ValueError, match=r"site model.layers.1.self_attn: backend 'triton' needs 16 <= bc <= 256, got bc=8"):
        config.resolve(SITES)
    # the same tiles are fine for the PyTorch backend, and a later pattern can bring them into range
    SparseAttentionConfig.from_dict({"sparse_cfg": {"*attn": {"backend": "pytorch", "bc": 8}}}).resolve(SITES)
    SparseAttentionConfig.from_dict(
        {"sparse_cfg": {"*attn": {"backend": "triton", "br": 512}, "*": {"br": 64}}}
    ).resolve(SITES)


def test_pattern_matching_no_site_lists_the_sites():
    config = SparseAttentionConfig.from_dict({"sparse_cfg": {"*cross_attn": {"enable": True}}})
    with pytest.raises(ValueError, match=r"'\*cross_attn' matches no attention site; sites are: \[") as error:
        config.resolve(SITES)
    assert all(site in str(error.value) for site in SITES)


# -- dict round trip --


@pytest.mark.parametrize(
    "config",
    [
        SKIP_SOFTMAX_DEFAULT,
        SKIP_SOFTMAX_CALIB,
        {
            "sparse_cfg": {
                "calibration": {"target_sparse_ratio": {"prefill": 0.3, "decode": 0.7}, "per_site": True, "data_dir": "/d"},
                "*attn*": {"threshold": 0.0, "backend": "pytorch", "collect_stats": False},
                "*layers.0.*": {"br": 16, "bc": 256},
            }
        },
    ],
    ids=["default", "calib", "custom"],
)
def test_dict_round_trip(config):
    parsed = SparseAttentionConfig.from_dict(config)
    as_dict = parsed.to_dict()
    assert SparseAttentionConfig.from_dict(as_dict) == parsed
    assert SparseAttentionConfig.from_dict(as_dict).to_dict() == as_dict
    assert parsed.resolve(SITES) == SparseAttentionConfig.from_dict(as_dict).resolve(SITES)
