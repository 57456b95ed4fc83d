"""Configuration: the Model Optimizer-shaped ``sparse_cfg`` dict as validated objects.

A config maps fnmatch patterns over attention-site names (``model.layers.3.self_attn``) to partial
site settings, plus an optional ``calibration`` section::

    {"sparse_cfg": {
        "calibration": {"target_sparse_ratio": 0.5, "samples": 64, "max_seqlen": 8192},
        "*attn*": {"method": "flash_skip_softmax", "threshold": {"prefill": 1e-3, "decode": 1e-4},
                   "br": 128, "bc": 128, "backend": "auto", "collect_stats": True, "enable": True},
        "default": {"enable": False}}}

``default`` applies first; later patterns override earlier ones, field by field.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable, Mapping

PHASES = ("prefill", "decode")
BACKENDS = ("auto", "pytorch", "triton")
METHODS = ("flash_skip_softmax",)
TRITON_TILES = (16, 256)  # br, bc range of the Triton kernels: tl.dot needs 16 at least; 256 is the largest tested


class UnmatchedPatternError(ValueError):
    """A config pattern that matches no attention site (the message lists the sites)."""


@dataclass(frozen=True)
class PhaseValues:
    """One number per phase: prefill (Lq > 1) and decode (Lq == 1)."""

    prefill: float
    decode: float

    @classmethod
    def parse(cls, value: Any, name: str, low: float, high: float) -> "PhaseValues":
        """A number (both phases) or ``{"prefill": x, "decode": y}``, each within [low, high]."""
        if isinstance(value, PhaseValues):
            value = asdict(value)
        if isinstance(value, Mapping):
            _check_keys(value, PHASES, name)
            missing = [p for p in PHASES if p not in value]
            if missing:
                raise ValueError(f"{name}: missing phase(s) {missing}; give both 'prefill' and 'decode'")
            return cls(*(_number(value[p], f"{name}.{p}", low, high) for p in PHASES))
        number = _number(value, name, low, high)
        return cls(number, number)

    def to_dict(self) -> dict[str, float]:
        return {"prefill": self.prefill, "decode": self.decode}


@dataclass(frozen=True)
class SiteConfig:
    """Settings of one attention site after pattern resolution.

    Args:
        method: sparsity method; only ``"flash_skip_softmax"``.
        threshold: fixed λ per phase (λ ≥ 0; 0 never skips). Calibration replaces it by a law.
        br, bc: query/key tile sizes of the skip decision (powers of two).
        backend: ``"triton"`` (CUDA), ``"pytorch"`` (exact reference, any device) or ``"auto"``
            (triton for CUDA tensors, pytorch otherwise).
        collect_stats: count valid and skipped tiles per phase.
        enable: skip tiles at this site; a disabled site is still rewritten and runs the op densely (λ = 0).
    """

    method: str = "flash_skip_softmax"
    threshold: PhaseValues = PhaseValues(1e-3, 1e-4)
    br: int = 128
    bc: int = 128
    backend: str = "auto"
    collect_stats: bool = True
    enable: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["threshold"] = self.threshold.to_dict()
        return out


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate λ = a·exp(b·S + o(L))/L^p per phase.

    Args:
        target_sparse_ratio: target tile sparsity S per phase, in [0, 0.99].
        samples: number of RULER-style calibration samples.
        max_seqlen: longest sample; length bins are powers of two down to 1024.
        chunk_size: prefill longer samples in chunks of this many tokens through the KV cache.
        decode_steps: greedy decode steps measured after each prefill.
        per_site: fit one law per attention site (a site whose points cannot be fitted falls back to
            the model-wide law).
        per_site_weight: how far each site keeps its own law, in [0, 1]: ln sf = w·own + (1 − w)·model-wide
            (1 = the site's own fit, 0 = the model-wide law). The default 0.5 measured best on SmolLM2 at
            the default target (less KL at equal sparsity than w = 1 or one model-wide law, and NIAH at 4k
            15/20 vs 10/20 and 13/20); w = 1 measured best above ~50 % achieved sparsity (bench/ACCURACY.md).
        per_site_cap: with per_site, no site may be sparser than this multiple of the phase target on the
            calibration data; the uncapped sites share one λ factor so the mean still meets the target
            (``calibrate.cap_site_laws``). None: no cap. On SmolLM2 (with p = 1) the cap kept the
            needles at 4k that one law loses (NIAH 81/100, dense 80, vs 75/100 uncapped) for about twice the
            uncapped KL on plain text (0.005 vs 0.002 nats); the default with p fitted finds dense's 80/100 at
            0.0038 nats (bench/ACCURACY.md).
        fit_length_exponent: fit p in λ = a·exp(b·S)/L^p (model-wide per phase, shared by the sites) when the
            samples span lengths; False keeps Model Optimizer's p = 1, the law TensorRT-LLM and vLLM compute (an
            exported checkpoint's Model Optimizer group gets the 1/L law equal to the fitted one at 4096 tokens).
            On SmolLM2 the λ a target needs falls like L^−2, so with p = 1 length bins miss the target by up
            to ~15 points.
        match_length_bins: after fitting (and capping), move every site's ln λ by one ``c + d·S − q·ln L`` per
            phase (q only with ``fit_length_exponent``) so that each length bin's mean sparsity on the
            calibration data follows the target over S = 0.2…0.8 (``calibrate.match_length_bins``); what the
            held-out check measures per bin.
        length_offsets: then add a per-length correction o(L) of ln λ per phase, fitted at the target itself so
            that each length bin's mean sparsity on the calibration data equals it, interpolated in log2 L
            between the bins (``calibrate.fit_length_offsets``; 8 knots, 1k…128k tokens, in the threshold
            state). The smooth law misses a short bin near its ceiling (at 1k every query tile keeps its first
            key tile). On SmolLM2 with real skipping it brought the held-out prefill cells within ±5 points from
            10 to 12 of 12, with NIAH at dense's counts at 2k and 4k (H200; bench/ACCURACY.md). A law moved to
            another target with ``set_target`` keeps the offsets fitted at the first (a warning says so).
        refit_while_skipping: after the first fit, measure the samples again with every site skipping at its
            fitted law (at the target) and fit again from those counts. The first pass runs dense, so each site
            counts on the inputs of a dense model; sparse earlier layers make later layers' scores flatter, and
            a model that skips lands 1–3 points (decode up to ~7) under the target. Doubles the measuring time.
            On SmolLM2 it brought the held-out check with real skipping from 10 to 11 of 12 prefill cells within
            ±5 points and from 7 to 9 of 12 decode cells, at the default's KL, but found 79/100 needles at 4k
            against dense's and the default's 80 (38/40 at 2k against 36; bench/ACCURACY.md).
        heldout_samples: samples kept out of the fit to report achieved sparsity.
        seed: sample generation seed (the global RNG is never touched).
        data_dir: directory of Paul Graham essays (None: the fxsparse asset cache).
    """

    target_sparse_ratio: PhaseValues = PhaseValues(0.5, 0.5)
    samples: int = 64
    max_seqlen: int = 8192
    chunk_size: int = 4096
    decode_steps: int = 8
    per_site: bool = True
    per_site_weight: float = 0.5
    per_site_cap: float | None = 1.15
    fit_length_exponent: bool = True
    match_length_bins: bool = True
    length_offsets: bool = True
    refit_while_skipping: bool = False
    heldout_samples: int = 8
    seed: int = 1234
    data_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_sparse_ratio"] = self.target_sparse_ratio.to_dict()
        return out


# -- validation helpers: small and loud, each error names the field and what is allowed --


def _check_keys(given: Iterable[str], allowed: Iterable[str], where: str) -> None:
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; valid keys are {allowed}")


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


def _integer(value: Any, name: str, low: int, power_of_two: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if power_of_two and value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _optional_path(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a directory path or None, got {value!r}")
    return value


def _parse_site_fields(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate a partial site dict; returns only the fields it sets."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a dict of site settings, got {type(raw).__name__}")
    _check_keys(raw, [f.name for f in fields(SiteConfig)], where)
    parsers = {
        "method": lambda v, n: _choice(v, n, METHODS),
        "threshold": lambda v, n: PhaseValues.parse(v, n, 0.0, math.inf),
        "br": lambda v, n: _integer(v, n, 1, power_of_two=True),
        "bc": lambda v, n: _integer(v, n, 1, power_of_two=True),
        "backend": lambda v, n: _choice(v, n, BACKENDS),
        "collect_stats": _flag,
        "enable": _flag,
    }
    return {key: parsers[key](value, f"{where}.{key}") for key, value in raw.items()}


def _parse_calibration(raw: Mapping[str, Any]) -> CalibrationConfig:
    where = "sparse_cfg.calibration"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(raw).__name__}")
    _check_keys(raw, [f.name for f in fields(CalibrationConfig)], where)
    parsers = {
        "target_sparse_ratio": lambda v, n: PhaseValues.parse(v, n, 0.0, 0.99),
        "samples": lambda v, n: _integer(v, n, 1),
        "max_seqlen": lambda v, n: _integer(v, n, 1024),
        "chunk_size": lambda v, n: _integer(v, n, 16),
        "decode_steps": lambda v, n: _integer(v, n, 0),
        "per_site": _flag,
        "per_site_weight": lambda v, n: _number(v, n, 0.0, 1.0),
        "per_site_cap": lambda v, n: None if v is None else _number(v, n, 1.0, 10.0),
        "fit_length_exponent": _flag,
        "match_length_bins": _flag,
        "length_offsets": _flag,
        "refit_while_skipping": _flag,
        "heldout_samples": lambda v, n: _integer(v, n, 0),
        "seed": lambda v, n: _integer(v, n, 0),
        "data_dir": _optional_path,
    }
    return CalibrationConfig(**{k: parsers[k](v, f"{where}.{k}") for k, v in raw.items()})


@dataclass
class SparseAttentionConfig:
    """A validated ``sparse_cfg``: ordered pattern → partial site settings, and calibration.

    Example::

        cfg = SparseAttentionConfig.from_dict(SKIP_SOFTMAX_DEFAULT)
        cfg.resolve(["model.layers.0.self_attn"])  # {"model.layers.0.self_attn": SiteConfig(...)}
    """

    patterns: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: CalibrationConfig | None = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | "SparseAttentionConfig") -> "SparseAttentionConfig":
        if isinstance(config, SparseAttentionConfig):
            return copy.deepcopy(config)
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a dict with a 'sparse_cfg' key, got {type(config).__name__}")
        _check_keys(config, ["sparse_cfg"], "config")
        if "sparse_cfg" not in config:
            raise ValueError("config: missing 'sparse_cfg'; see fxsparse.SKIP_SOFTMAX_DEFAULT for the shape")
        sparse_cfg = config["sparse_cfg"]
        if not isinstance(sparse_cfg, Mapping):
            raise ValueError(f"sparse_cfg must be a dict, got {type(sparse_cfg).__name__}")
        calibration = None
        patterns: dict[str, dict[str, Any]] = {}
        if "default" in sparse_cfg:  # default applies first, wherever it is written
            patterns["default"] = _parse_site_fields(sparse_cfg["default"], "sparse_cfg.default")
        for key, value in sparse_cfg.items():
            if key == "calibration":
                calibration = _parse_calibration(value)
            elif not isinstance(key, str):
                raise ValueError(f"sparse_cfg keys are fnmatch patterns over site names (str), got {key!r}")
            elif key != "default":
                patterns[key] = _parse_site_fields(value, f"sparse_cfg[{key!r}]")
        return cls(patterns, calibration)

    def to_dict(self) -> dict[str, Any]:
        sparse_cfg: dict[str, Any] = {}
        if self.calibration is not None:
            sparse_cfg["calibration"] = self.calibration.to_dict()
        for pattern, settings in self.patterns.items():
            sparse_cfg[pattern] = {
                k: v.to_dict() if isinstance(v, PhaseValues) else v for k, v in settings.items()
            }
        return {"sparse_cfg": sparse_cfg}

    def check_no_calibration(self, entry: str) -> None:
        """Ways in that only rewrite refuse a calibration section: dropping it would leave the fixed thresholds
        without a word."""
        if self.calibration is not None:
            raise ValueError(f"{entry} does not calibrate: remove the config's 'calibration' section, or calibrate "
                             "the model with fxsparse.sparsify(model, config, tokenizer=...) first")

    def check_patterns(self, site_names: Iterable[str]) -> None:
        """A pattern that matches no site is an error listing the site names."""
        site_names = list(site_names)
        for pattern in self.patterns:
            if pattern != "default" and not any(fnmatch.fnmatchcase(s, pattern) for s in site_names):
                raise UnmatchedPatternError(
                    f"config pattern {pattern!r} matches no attention site; sites are: {site_names}"
                )

    def resolve(self, site_names: Iterable[str], check_patterns: bool = True) -> dict[str, SiteConfig]:
        """Settings for each site: ``default`` first, then each matching pattern in order.

        With ``check_patterns``, a pattern that matches no site is an error listing the site names
        (callers that discover sites piecewise check once they have them all).
        """
        site_names = list(site_names)
        if check_patterns:
            self.check_patterns(site_names)
        resolved = {}
        for site in site_names:
            settings = SiteConfig()
            for pattern, overrides in self.patterns.items():
                if pattern == "default" or fnmatch.fnmatchcase(site, pattern):
                    settings = replace(settings, **overrides)
            _check_triton_tiles(site, settings)
            resolved[site] = settings
        return resolved


def _check_triton_tiles(site: str, settings: SiteConfig) -> None:
    """Tiles the Triton kernels cannot run are a config error now, not a launch error at the first forward
    (``auto`` picks the Triton backend only on a GPU, so its launch checks them there)."""
    low, high = TRITON_TILES
    for name in ("br", "bc"):
        size = getattr(settings, name)
        if settings.backend == "triton" and not low <= size <= high:
            raise ValueError(f"site {site}: backend 'triton' needs {low} <= {name} <= {high}, got {name}={size}")


ATTENTION_PATTERN = "*attn*"
"""The presets' site pattern: matches ``self_attn`` (Llama, Qwen, Mistral, Phi) and ``attn`` (GPT-2), not
``attention`` (GPT-NeoX, Falcon, Bloom), which need their own pattern."""

_SKIP_SOFTMAX_SITE = {
    "method": "flash_skip_softmax",
    "threshold": {"prefill": 1e-3, "decode": 1e-4},
    "br": 128,
    "bc": 128,
    "backend": "auto",
    "collect_stats": True,
    "enable": True,
}

SKIP_SOFTMAX_DEFAULT: dict[str, Any] = {
    "sparse_cfg": {ATTENTION_PATTERN: dict(_SKIP_SOFTMAX_SITE), "default": {"enable": False}}
}
"""Fixed thresholds: λ = 1e-3 in prefill, 1e-4 in decode."""

SKIP_SOFTMAX_CALIB: dict[str, Any] = {
    "sparse_cfg": {
        "calibration": {"target_sparse_ratio": {"prefill": 0.5, "decode": 0.5}, "samples": 64, "max_seqlen": 8192},
        ATTENTION_PATTERN: dict(_SKIP_SOFTMAX_SITE),
        "default": {"enable": False},
    }
}
"""Calibrated thresholds for a target sparsity S = 0.5: λ = a·exp(b·S + o(L))/L^p per phase and per site (pooled
toward the model-wide law, capped, matched to the length bins, offset per length; ``CalibrationConfig``'s defaults)."""
