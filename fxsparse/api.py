"""``sparsify`` a HuggingFace model in place, and steer its attention sites afterwards.

    model = fxsparse.sparsify(model, config=SKIP_SOFTMAX_DEFAULT)
    model.generate(...)                          # attention runs through the sparse op
    fxsparse.set_threshold(model, 1e-2, "*layers.0.*")
    print(fxsparse.summary(model, file=None))

How it works: ``model.forward`` becomes ``torch.compile(original forward, backend=SiteCompiler)``
with Inductor off, so Dynamo captures the model, the backend rewrites every attention into the
op, and the rewritten graph runs as is. A short warm-up forward creates the sites
(``<attention module>.fxsparse_site``, buffers non-persistent: ``state_dict`` and
``save_pretrained`` are unchanged) and validates the config against them. The graphs read the
site buffers at call time, so every helper here takes effect without recompiling. ``copy.deepcopy``
gives an independent sparsified copy (its own weights, sites and compiled forward).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import inspect
import io
import sys
import types
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .backend import SITE_ATTRIBUTE, SiteCompiler
from .config import SKIP_SOFTMAX_DEFAULT, SparseAttentionConfig
from .sites import PHASE_ROWS, SparseSite, sites_of

WARM_UP_LENGTH = 16
COMPILER_ATTRIBUTE = "fxsparse_compiler"
INSTALLED_ATTRIBUTES = ("forward", COMPILER_ATTRIBUTE, "__deepcopy__")  # what _install sets on the model


def _dynamo_limits():
    """Generation compiles a graph per phase and shape regime; running out of recompiles must
    raise, never fall back to the dense eager forward."""
    return torch._dynamo.config.patch(
        recompile_limit=64, accumulated_recompile_limit=4096, fail_on_recompile_limit_hit=True
    )


def sparsify(model: nn.Module, config: Mapping[str, Any] | None = None,
             forward_loop: Callable | None = None, tokenizer=None) -> nn.Module:
    """Rewrite every attention of a HuggingFace causal LM into the skip-softmax op, in place.

    Args:
        model: a ``PreTrainedModel`` (``attn_implementation`` "eager" or "sdpa").
        config: a ``sparse_cfg`` dict; None uses the sparsity recorded in the model's config
            (an fxsparse export) or else ``SKIP_SOFTMAX_DEFAULT``.
        forward_loop, tokenizer: passed to calibration when the config has a calibration section
            (without either, the tokenizer saved at the model's ``name_or_path`` is loaded).

    Returns the same model, whose ``forward`` and ``generate()`` run the sparse op.
    """
    _validate_model(model)
    recorded = _recorded_sparsity(model) if config is None else None
    if config is None:
        config = recorded.config if recorded is not None else SKIP_SOFTMAX_DEFAULT
    config = SparseAttentionConfig.from_dict(config)
    if config.calibration is not None:  # a missing tokenizer or essays folder fails here, not after the rewrite
        from .calibration.calibrate import check_inputs

        tokenizer = check_inputs(model, config.calibration, forward_loop, tokenizer)
    compiler = _install(model, config)
    try:
        _warm_up(model)
        if not sites_of(model):
            dense = "; ".join(f"{site}: {reason}" for site, reason in compiler.report.left_dense)
            raise ValueError(f"no attention found in {type(model).__name__}" + (f" (left dense: {dense})" if dense else ""))
        config.check_patterns(sites_of(model))
    except Exception:
        _undo(model)
        raise
    if getattr(model, "generation_config", None) is not None:
        # generate() would torch.compile the model again for a static cache on GPU, and Dynamo cannot
        # trace into an already compiled forward with fullgraph=True: the model compiles itself.
        model.generation_config.disable_compile = True
    if recorded is not None:
        recorded.apply(sites_of(model))
    if config.calibration is not None:
        from .calibration import calibrate  # lazy: calibration pulls in samples and fitting

        calibrate(model, config.to_dict(), forward_loop=forward_loop, tokenizer=tokenizer)
    return model


def _install(model: nn.Module, config: SparseAttentionConfig) -> SiteCompiler:
    """Route ``model.forward`` through Dynamo and a ``SiteCompiler`` (compiled on the first call; attention
    modules that already carry a site keep it, with its settings)."""
    compiler = SiteCompiler(config, inductor=False, root=model)
    original = model.forward
    compiled = torch.compile(_own_frame(original), backend=compiler, dynamic=True)

    @functools.wraps(original)  # HF generate() inspects forward's signature
    def forward(*args, **kwargs):
        with _dynamo_limits():
            return compiled(*args, **kwargs)

    model.forward = forward
    setattr(model, COMPILER_ATTRIBUTE, compiler)
    # the forward above runs this model's weights and sites: a copy needs its own
    model.__deepcopy__ = functools.partial(_deepcopy_sparsified, model)
    return compiler


def _deepcopy_sparsified(model: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a sparsified model: the weights and sites (thresholds, laws, stats) are copied, and the
    copy gets a forward of its own. Without this the copy's forward would be the original's, silently."""
    installed = {name: model.__dict__.pop(name) for name in INSTALLED_ATTRIBUTES}
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        model.__dict__.update(installed)
    _install(clone, installed[COMPILER_ATTRIBUTE].config)
    return clone


def _own_frame(forward: Callable) -> Callable:
    """``forward`` with a code object of its own (a bound method is copied; anything else is kept).

    Dynamo caches compiled frames per code object, and the recompile limit counts per code object.
    HF forwards share theirs with every model of the class (their decorators' wrappers, with every
    HF model), so without the copy each sparsified model and every other ``torch.compile`` of an HF
    model in the process spend the same budget, and once it is spent Dynamo runs that code eagerly
    for good: a later ``sparsify`` would find no attention.
    """
    if not inspect.ismethod(forward):
        return forward
    function = forward.__func__
    own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                             function.__defaults__, function.__closure__)
    own.__kwdefaults__ = function.__kwdefaults__
    return types.MethodType(own, forward.__self__)


def _validate_model(model) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not hasattr(model, "main_input_name"):
        raise ValueError(
            f"sparsify needs a HuggingFace PreTrainedModel, got {type(model).__name__}; for other modules use "
            "torch.compile(module, backend='fxsparse') or fxsparse.transform(torch.export.export(...))"
        )
    if hasattr(model, COMPILER_ATTRIBUTE):
        raise ValueError("model is already sparsified; steer it with fxsparse.set_threshold / enable_sparsity")


def _recorded_sparsity(model):
    try:
        from .hf_checkpoint import recorded_sparsity
    except ImportError as error:
        raise ValueError(f"config=None needs fxsparse.hf_checkpoint to read recorded sparsity: {error}") from None
    return recorded_sparsity(getattr(model, "config", None))


def _warm_up(model: nn.Module) -> None:
    """One short forward: Dynamo captures, the backend creates the sites. Backend errors (a config
    pattern matching no site) surface as themselves, not wrapped by Dynamo."""
    device = next(iter(model.parameters())).device
    ids = torch.full((2, WARM_UP_LENGTH), 1, dtype=torch.long, device=device)  # batch 2: no 0/1 specialisation
    try:
        with torch.no_grad():
            model(ids)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        inner = getattr(error, "inner_exception", None)
        raise (inner if isinstance(inner, ValueError) else error) from None


def _undo(model: nn.Module) -> None:
    """Restore the model after a failed sparsify: original forward, no sites."""
    for name in INSTALLED_ATTRIBUTES:
        delattr(model, name)
    for module in model.modules():
        if isinstance(getattr(module, SITE_ATTRIBUTE, None), SparseSite):
            delattr(module, SITE_ATTRIBUTE)


# -- steering helpers (all in place; nothing recompiles) --


def _sites(model: nn.Module, pattern: str) -> list[SparseSite]:
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be an fnmatch pattern over site names (str, e.g. '*layers.0.*'), got {pattern!r}")
    sites = sites_of(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no sparse attention sites; call fxsparse.sparsify first")
    chosen = [site for name, site in sites.items() if fnmatch.fnmatchcase(name, pattern)]
    if not chosen:
        raise ValueError(f"pattern {pattern!r} matches no attention site; sites are: {list(sites)}")
    return chosen


def enable_sparsity(model: nn.Module, pattern: str = "*") -> None:
    for site in _sites(model, pattern):
        site.set_enabled(True)


def disable_sparsity(model: nn.Module, pattern: str = "*") -> None:
    """The matching sites run dense (through the op, so enabling again needs no recompile)."""
    for site in _sites(model, pattern):
        site.set_enabled(False)


def set_threshold(model: nn.Module, threshold: float | Mapping[str, float], pattern: str = "*") -> None:
    """Fixed λ (one number or per phase) for the matching sites; clears calibrated laws."""
    for site in _sites(model, pattern):
        site.set_threshold(threshold)


def set_target_sparsity(model: nn.Module, target: float | Mapping[str, float], pattern: str = "*") -> None:
    """New target sparsity S for calibrated sites: λ = a·exp(b·S + o(L))/L^p, no recalibration (per-length offsets
    o(L) stay those fitted at the calibrated target, which warns)."""
    sites = _sites(model, pattern)
    uncalibrated = [site.name for site in sites if site.law() is None]
    if uncalibrated:
        raise ValueError(f"sites {uncalibrated} have no calibrated law; calibrate first or use set_threshold")
    for site in sites:
        site.set_target(target)


def get_stats(model: nn.Module) -> dict[str, dict[str, dict[str, Any]]]:
    """Per site and phase: ``{"valid": tiles, "skipped": tiles, "sparsity": skipped/valid or None}``."""
    stats = {}
    for name, site in sites_of(model).items():
        counts = site.stats.detach().cpu()
        stats[name] = {
            phase: {"valid": int(counts[row, 0]), "skipped": int(counts[row, 1]),
                    "sparsity": float(counts[row, 1] / counts[row, 0]) if counts[row, 0] > 0 else None}
            for phase, row in PHASE_ROWS.items()
        }
    return stats


def reset_stats(model: nn.Module) -> None:
    for site in sites_of(model).values():
        site.reset_stats()


def summary(model: nn.Module, file=sys.stdout) -> str:
    """A per-site table (written to ``file`` unless None, and returned)."""
    out = io.StringIO()
    rows = [("site", "on", "br×bc", "backend", "threshold / law", "sparsity p / d")]
    for name, site in sites_of(model).items():
        info = site.describe()
        sparsity = " / ".join("-" if s is None else f"{s:.1%}" for s in info["sparsity"].values())
        rows.append((name, "y" if info["enabled"] else "n", f"{info['br']}×{info['bc']}", info["backend"],
                     _describe_threshold(info), sparsity))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:  # columns as wide as their longest entry: laws and site names vary a lot in length
        print(" ".join(cell.ljust(width) for cell, width in zip(row, widths)), row[-1], file=out)
    compiler = getattr(model, COMPILER_ATTRIBUTE, None)
    for site, reason in dict(compiler.report.left_dense if compiler else []).items():
        print(f"{site.ljust(widths[0])} dense: {reason}", file=out)
    text = out.getvalue()
    if file is not None:
        file.write(text)
    return text


def _describe_threshold(info: dict) -> str:
    law, fixed = info["law"] or {}, info["threshold"]
    parts = []
    for phase in PHASE_ROWS:
        if phase in law:
            fit = law[phase]
            length = "L" if fit["p"] == 1.0 else f"L^{fit['p']:.3g}"
            offsets = " + o(L)" if fit.get("offsets") else ""  # the per-length correction (calibration's step 6)
            parts.append(f"{phase[0]}: {fit['a']:.3g}·exp({fit['b']:.3g}·{fit['target']:.2f}{offsets})/{length}")
        else:
            parts.append(f"{phase[0]}: λ={fixed[phase]:.3g}")
    return ", ".join(parts)
