"""HuggingFace checkpoints that carry their sparse-attention settings (SPEC §6).

``export_hf(model, dir)`` writes the unchanged weights with ``save_pretrained`` and records the
sites' settings in ``config.json`` under two keys::

    "sparse_attention_config": {                     # what TensorRT-LLM / vLLM read (Model Optimizer schema)
        "config_groups": {"group_0": {
            "algorithm": "skip_softmax",
            "targets": ["LlamaAttention"],           # attention module classes
            "ignore": ["model.layers.0.self_attn"],  # attention modules left dense
            "threshold_scale_factor": {"formula": "a * exp(b * target_sparsity)",
                                       "prefill": {"a": 7.9, "b": 8.6}, "decode": {"a": 0.1, "b": 9.8}},
            "target_sparsity": {"prefill": 0.5, "decode": 0.5}}},
        "producer": {"name": "fxsparse", "version": "0.1.0"}},
    "fxsparse_sparse_attention": {                   # fxsparse's own, exact per-site record
        "version": "0.1.0",
        "sites": {"model.layers.1.self_attn": {"method": ..., "br": 128, "bc": 128, "backend": "auto",
                  "collect_stats": true, "enable": true,
                  "threshold": {"prefill": 1e-3, "decode": 1e-4},
                  "law": {"prefill": {"a": .., "b": .., "p": .., "target": 0.5[, "offsets": [8 knots]]}}
                         | null}}}

A phase without a calibrated law has ``a = b = 0`` and target 0 in the group (λ = 0: dense for a
reader that only knows the law); its fixed λ is in the fxsparse record. When sites were calibrated
one law each, the group carries the law of the median site (by λ at its target) and the exact
laws stay in the fxsparse record. The group's formula is Model Optimizer's λ = sf/L; a law fitted with
another length exponent p (λ = a·exp(b·S)/L^p) goes there as the 1/L law equal to it at 4096 tokens.

``recorded_sparsity(model.config)`` reads either key back (the fxsparse record wins) into a
``RecordedSparsity``: ``.config`` rebuilds the sites, ``.apply(sites)`` restores laws and thresholds.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from torch import nn

from .config import PHASES, SKIP_SOFTMAX_DEFAULT, SiteConfig
from .ops.threshold import knot_offsets, length_offset
from .sites import SparseSite, sites_of

SPARSE_ATTENTION_KEY = "sparse_attention_config"
FXSPARSE_KEY = "fxsparse_sparse_attention"
FORMULA = "a * exp(b * target_sparsity)"
REFERENCE_LENGTH = 4096  # where the group's 1/L law equals a fitted L^-p law: mid-range of the usual 1k-8k calibration
_DEFAULT_THRESHOLD = SKIP_SOFTMAX_DEFAULT["sparse_cfg"]["*attn*"]["threshold"]
_CREATION_FIELDS = ("method", "br", "bc", "backend", "collect_stats")  # fixed when a site is created


# -- export --


def export_hf(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Save ``model`` (weights unchanged) and ``tokenizer`` with the sparse settings in ``config.json``.

    Args:
        model: a sparsified HuggingFace ``PreTrainedModel``.
        directory: output directory (created if needed).
        tokenizer: saved alongside when given.

    Returns the directory. The model's config is left as it was.
    """
    sites = sites_of(model)
    if not sites:
        raise ValueError("the model has no fxsparse attention sites; call fxsparse.sparsify(model) before export_hf")
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ValueError(f"export_hf needs a HuggingFace PreTrainedModel, got {type(model).__name__}")
    directory = Path(directory)
    records = {name: site_record(site) for name, site in sites.items()}
    extra = {
        SPARSE_ATTENTION_KEY: sparse_attention_config(model, sites, records),
        FXSPARSE_KEY: {"version": _version(), "sites": records},
    }
    saved = {key: getattr(model.config, key) for key in extra if hasattr(model.config, key)}
    try:
        for key, value in extra.items():
            setattr(model.config, key, value)
        with _as_plain_checkpoint(model):
            model.save_pretrained(directory)
    finally:
        for key in extra:
            if key in saved:
                setattr(model.config, key, saved[key])
            else:
                delattr(model.config, key)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


@contextlib.contextmanager
def _as_plain_checkpoint(model: nn.Module) -> Iterator[None]:
    """A model loaded from a GGUF file whose weights were dequantized saves as a plain checkpoint.

    transformers refuses ``save_pretrained`` on any model it loaded through its GGUF quantizer; when
    every weight is an ordinary floating tensor the quantizer is only a leftover, so it is detached
    for the save (and put back). Weights still packed in GGUF blocks are an error.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or getattr(method, "value", method) != "gguf":
        yield
        return
    packed = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    packed += [name for name, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise ValueError(f"export_hf: the GGUF weights of {packed[:3]} are still packed; load the model with "
                         "dequantized weights to export it")
    config_value = model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if config_value is not None:
            model.config.quantization_config = config_value


def site_record(site: SparseSite) -> dict[str, Any]:
    """Everything needed to rebuild one site: its settings, fixed λ, law and enable flag."""
    law = site.law()
    record = site.config.to_dict()
    record["enable"] = site.enabled
    record["threshold"] = {phase: _short(value) for phase, value in site.thresholds().items()}
    record["law"] = None if law is None else {
        p: {k: [_short(x) for x in v] if isinstance(v, list) else _short(v) for k, v in params.items()}
        for p, params in law.items()}
    return record


def _short(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (the buffers' dtype): 0.3, not 0.30000001."""
    return float(str(np.float32(value)))


def sparse_attention_config(
    model: nn.Module, sites: Mapping[str, SparseSite], records: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The Model Optimizer-shaped ``sparse_attention_config`` (one group) for ``model``'s sites."""
    modules = {name: _module_of(model, name) for name in sites}
    targets = sorted({type(m).__name__ for _, m in modules.values() if m is not None}) or sorted(
        {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention")}
    )
    enabled = [name for name, record in records.items() if record["enable"]]
    sparse_modules = {id(modules[name][1]) for name in enabled if modules[name][1] is not None}
    ignore = [modules[name][0] for name in sites if name not in enabled]
    ignore += [
        path for path, module in model.named_modules()
        if type(module).__name__ in targets and id(module) not in sparse_modules and path not in ignore
    ]
    scale_factor: dict[str, Any] = {"formula": FORMULA}
    target_sparsity = {}
    for phase in PHASES:
        law = _group_law([records[name]["law"][phase] for name in enabled if phase in (records[name]["law"] or {})])
        scale_factor[phase] = {"a": law["a"], "b": law["b"]}
        target_sparsity[phase] = law["target"]
    group = {
        "algorithm": "skip_softmax",
        "targets": targets,
        "ignore": ignore,
        "threshold_scale_factor": scale_factor,
        "target_sparsity": target_sparsity,
    }
    return {"config_groups": {"group_0": group}, "producer": {"name": "fxsparse", "version": _version()}}


def _group_law(laws: list[Mapping[str, float]]) -> dict[str, float]:
    """One law for the group: the median site's (by λ at its target and ``REFERENCE_LENGTH``); zeros when none.

    The group's formula has λ = sf/L (p = 1); a law with another length exponent p or a per-length correction
    o(L) is written there exact at ``REFERENCE_LENGTH`` (a·e^o(L0)·L0^(1−p)), and exact at every length in the
    fxsparse record."""
    if not laws:
        return {"a": 0.0, "b": 0.0, "target": 0.0}
    as_one_over_l = [{"a": law["a"] * REFERENCE_LENGTH ** (1.0 - law.get("p", 1.0))
                      * math.exp(length_offset(knot_offsets(law.get("offsets")), REFERENCE_LENGTH)),
                      "b": law["b"], "target": law["target"]} for law in laws]
    ranked = sorted(as_one_over_l, key=lambda law: law["a"] * math.exp(law["b"] * law["target"]))
    return {key: float(ranked[(len(ranked) - 1) // 2][key]) for key in ("a", "b", "target")}


def _module_of(model: nn.Module, site_name: str) -> tuple[str, nn.Module | None]:
    """The module a site sits on: its path in ``model`` and the module (None if not found).

    Site names are module paths relative to whatever was captured (``model.layers.0.self_attn`` for
    the whole causal LM, ``layers.0.self_attn`` for its inner model), so a suffix match on whole
    path components is accepted.
    """
    for path, module in model.named_modules():
        if path == site_name or path.endswith("." + site_name) or site_name.endswith("." + path) and path:
            return path, module
    return site_name, None


def _version() -> str:
    from . import __version__

    return __version__


# -- reload --


@dataclass(frozen=True)
class RecordedSparsity:
    """Sparse settings read back from a checkpoint's config.

    Attributes:
        sites: per-site records (``site_record`` layout), when the fxsparse record is present.
        group: the ``group_0`` of ``sparse_attention_config`` (used when ``sites`` is empty).
        producer: ``{"name", "version"}`` of the tool that wrote it.
    """

    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    group: dict[str, Any] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        """A ``{"sparse_cfg": ...}`` (no calibration section) for ``sparsify``; ``apply`` then restores the rest.

        The settings most sites share go to ``default``. A site gets a pattern of its own (its exact
        name) only where its tiles, backend or method differ — sites are created with those and they
        cannot change afterwards; a site's enable flag, fixed λ and law are restored by ``apply``.
        """
        if not self.sites:
            sparse_cfg = {"default": {"enable": True, "threshold": dict(_DEFAULT_THRESHOLD)}}
            for pattern in self.group.get("ignore", []):
                sparse_cfg[pattern] = {"enable": False}
            return {"sparse_cfg": sparse_cfg}
        settings = {name: _site_settings(record) for name, record in self.sites.items()}
        keys = [json.dumps(value, sort_keys=True) for value in settings.values()]
        common = json.loads(max(keys, key=keys.count))
        sparse_cfg = {"default": common}
        sparse_cfg.update({
            name: value for name, value in settings.items()
            if any(value[key] != common[key] for key in _CREATION_FIELDS if key in value)
        })
        return {"sparse_cfg": sparse_cfg}

    def laws(self) -> dict[str, Any]:
        """Per-site laws (fxsparse record) or the group law ``{phase: {a, b, target}}``."""
        if self.sites:
            return {name: record["law"] for name, record in self.sites.items() if record.get("law")}
        return _group_phases(self.group)

    def apply(self, sites: Mapping[str, SparseSite]) -> None:
        """Write the recorded thresholds, laws, targets and enable flags into ``sites``."""
        if self.sites:
            missing = [name for name in self.sites if name not in sites]
            if missing:
                raise ValueError(f"recorded sites {missing} are not in the model; its sites are {list(sites)}")
            for name, record in self.sites.items():
                _write(sites[name], record["threshold"], record.get("law"), record["enable"])
            return
        law = _group_phases(self.group)
        ignore = self.group.get("ignore", [])
        for name, site in sites.items():
            enable = not any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore)
            _write(site, site.thresholds(), law, enable and site.enabled)

    def describe(self) -> str:
        """One line: where it came from and what it sets."""
        producer = f"{self.producer.get('name', '?')} {self.producer.get('version', '')}".strip()
        if self.sites:
            enabled = sum(bool(r["enable"]) for r in self.sites.values())
            calibrated = sum(bool(r.get("law")) for r in self.sites.values())
            kind = f"{calibrated} with a calibrated law" if calibrated else "fixed thresholds"
            return f"{len(self.sites)} sites ({enabled} enabled, {kind}), written by {producer}"
        law = ", ".join(f"{p} a={v['a']:.4g} b={v['b']:.4g} target={v['target']:.2f}" for p, v in self.laws().items())
        return f"one calibrated law for {self.group.get('targets')} ({law or 'no law'}), written by {producer}"


def recorded_sparsity(hf_config: Any) -> RecordedSparsity | None:
    """The sparse settings recorded in a HuggingFace config (object or dict), or None if it has none."""
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda key: getattr(hf_config, key, None)
    own, shared = get(FXSPARSE_KEY), get(SPARSE_ATTENTION_KEY)
    producer = dict((shared or {}).get("producer") or {})
    if own:
        sites = own.get("sites") if isinstance(own, Mapping) else None
        if not isinstance(sites, Mapping) or not sites:
            raise ValueError(f"config.json {FXSPARSE_KEY!r} has no 'sites' record")
        return RecordedSparsity(sites={name: dict(record) for name, record in sites.items()}, producer=producer)
    if not shared:
        return None
    groups = [
        g for g in (shared.get("config_groups") or {}).values()
        if isinstance(g, Mapping) and g.get("algorithm") == "skip_softmax"
    ]
    if len(groups) != 1:
        raise ValueError(f"config.json {SPARSE_ATTENTION_KEY!r} needs exactly one skip_softmax group, found {len(groups)}")
    formula = (groups[0].get("threshold_scale_factor") or {}).get("formula")
    if formula != FORMULA:
        raise ValueError(f"config.json threshold_scale_factor formula {formula!r} is not supported; expected {FORMULA!r}")
    _group_phases(groups[0])  # a malformed law is an error when the checkpoint is read, not when it is applied
    return RecordedSparsity(group=dict(groups[0]), producer=producer)


def _group_phases(group: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The group's law per phase, {phase: {a, b, target}}; phases with a ≤ 0 (never calibrated) left out."""
    factor, targets = group.get("threshold_scale_factor") or {}, group.get("target_sparsity") or {}
    if not isinstance(targets, Mapping):
        targets = {phase: targets for phase in PHASES}
    laws = {}
    for phase in (p for p in PHASES if p in factor):
        params, where = factor[phase], f"config.json threshold_scale_factor.{phase}"
        if not isinstance(params, Mapping) or not {"a", "b"} <= params.keys():
            raise ValueError(f"{where} needs numbers 'a' and 'b', got {params!r}")
        try:
            law = {"a": float(params["a"]), "b": float(params["b"]), "target": float(targets.get(phase, 0.0))}
        except (TypeError, ValueError):
            raise ValueError(f"{where}: a, b and target_sparsity.{phase} must be numbers, got {params!r} and "
                             f"{targets.get(phase)!r}") from None
        if law["a"] > 0:
            laws[phase] = law
    return laws


def _site_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    return {key: copy.deepcopy(record[key]) for key in SiteConfig.__dataclass_fields__ if key in record}


def _write(site: SparseSite, threshold: Mapping[str, float], law: Mapping[str, Mapping[str, float]] | None,
           enable: bool) -> None:
    site.set_threshold(dict(threshold))  # also clears any previous law
    if law:
        targets = {phase: float(law[phase]["target"]) if phase in law else 0.0 for phase in PHASES}
        site.set_law({phase: {"a": v["a"], "b": v["b"], "p": v.get("p", 1.0), "offsets": v.get("offsets")}
                      for phase, v in law.items()}, targets)
    site.set_enabled(bool(enable))
