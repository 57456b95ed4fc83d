"""The ``fxsparse`` torch.compile backend: Dynamo capture → attention rewrite → eager or Inductor.

    torch.compile(model, backend="fxsparse")                                  # Inductor after
    torch.compile(model, backend="fxsparse", options={"config": cfg, "inductor": False})

Each rewritten site gets a ``SparseSite`` submodule next to its attention module
(``model.layers.3.self_attn.fxsparse_site``), so ``fxsparse.sites_of(model)`` and the helpers in
``fxsparse.api`` steer it. How the graph reads the site's buffers at call time:

- Inductor off: ``get_attr`` nodes on the GraphModule, which holds the site as a submodule; a
  replaced buffer (``site.measuring`` swaps ``stats``) is picked up on the next call.
- Inductor on: the buffers are extra graph inputs that a wrapper fetches from the site on every
  call, so Inductor never bakes them as constants. Their shapes are fixed at compile time, so
  measuring (which reshapes ``stats``) needs Inductor off.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

import torch
from torch import nn

from .config import SKIP_SOFTMAX_DEFAULT, SiteConfig, SparseAttentionConfig
from .graph.names import FRAME_ROOT, full_site_name
from .graph.rewrite import RewriteReport, SiteInputs, rewrite_attention
from .sites import SparseSite

log = logging.getLogger(__name__)

SITE_ATTRIBUTE = "fxsparse_site"
SITE_BUFFERS = ("threshold_state", "stats", "trial_thresholds")
OPTIONS = ("config", "inductor", "backend")


class SiteCompiler:
    """A Dynamo backend that rewrites attention and keeps the sites on the compiled model.

    Args:
        config: a ``sparse_cfg`` dict (default ``SKIP_SOFTMAX_DEFAULT``); resolves new sites only,
            sites that already exist keep their settings.
        inductor: compile the rewritten graph with Inductor (else run it as is).
        root: the model whose site names are module paths from it (``sparsify``); without it,
            names are relative to the compiled frame's module.
    """

    def __init__(self, config: Any = None, inductor: bool = False, root: nn.Module | None = None):
        self.config = SparseAttentionConfig.from_dict(SKIP_SOFTMAX_DEFAULT if config is None else config)
        self.inductor = inductor
        # weakly: torch.compile keeps every backend alive for the whole process, and a strong
        # reference would keep the model (its weights on the GPU) alive with it
        self._root = weakref.ref(root) if root is not None else None
        self.compiles = 0
        self.report = RewriteReport()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **_) -> Callable:
        self.compiles += 1
        frame_root, prefix = self._frame_root(gm)
        if self.inductor:
            _check_inference(example_inputs)
            gm = _detached_copy(gm)
        graph_sites: dict[str, SparseSite] = {}

        def configure(names: list[str]) -> dict[str, SiteConfig]:
            full_names = {name: full_site_name(prefix, name) for name in names}
            resolved = self.config.resolve(full_names.values(), check_patterns=False)
            if self._root is None:
                # no warm-up to wait for (sparsify checks after its own, when every site is known):
                # check against the sites of this graph and of earlier ones
                known = {site.name for site in _sites_under(frame_root)} | set(full_names.values())
                self.config.check_patterns(sorted(known))
            for name in names:
                graph_sites[name] = self._site(frame_root, name, full_names[name], resolved[full_names[name]])
            return {name: site.config for name, site in graph_sites.items()}

        inputs = _GraphInputs(gm, graph_sites) if self.inductor else _AttributeInputs(gm, graph_sites)
        report = rewrite_attention(gm.graph, configure, inputs)
        report.rewritten = [graph_sites[name].name for name in report.rewritten]
        report.left_dense = [(full_site_name(prefix, site), reason) for site, reason in report.left_dense]
        for site, reason in report.left_dense:
            if (site, reason) not in self.report.left_dense:  # once, not again per recompile
                log.warning("fxsparse: %s stays dense: %s", site, reason)
        self.report.extend(report)
        gm.recompile()
        if not self.inductor:
            return gm.forward
        return inputs.compile_with_inductor(list(example_inputs))

    # -- where sites live --

    def _frame_root(self, gm) -> tuple[nn.Module | None, str]:
        """The module the compiled frame runs on, and its path under ``root`` (when given)."""
        root_expression = _root_expression(gm)
        frame_root = None
        if root_expression is not None:
            from torch._dynamo.symbolic_convert import InstructionTranslator

            translator = InstructionTranslator.current_tx()
            if translator is not None:
                frame_root = eval(root_expression, {"L": translator.f_locals})  # a Dynamo source path
        root = self._root() if self._root is not None else None
        if root is None or frame_root is None:
            return frame_root, ""
        for path, module in root.named_modules():
            if module is frame_root:
                return frame_root, path
        return frame_root, ""

    def _site(self, frame_root: nn.Module | None, relative: str, name: str, config: SiteConfig) -> SparseSite:
        """The site of attention module ``relative`` (under ``frame_root``; "" is ``frame_root`` itself),
        created on first sight; a site that exists keeps its settings."""
        owner = None
        if isinstance(frame_root, nn.Module):
            owner = frame_root.get_submodule(relative)
            if isinstance(getattr(owner, SITE_ATTRIBUTE, None), SparseSite):
                return getattr(owner, SITE_ATTRIBUTE)
        site = SparseSite(name, config)
        if owner is not None:
            site.to(module_device(owner))
            owner.add_module(SITE_ATTRIBUTE, site)
        log.info("fxsparse: new site %s (%s)", name, config)
        return site


class _AttributeInputs:
    """Site buffers as ``get_attr`` nodes: the GraphModule holds each site as a submodule."""

    def __init__(self, gm: torch.fx.GraphModule, sites: dict[str, SparseSite]):
        self.gm, self.sites, self.attributes = gm, sites, {}

    def __call__(self, name: str, config: SiteConfig) -> SiteInputs:
        site = self.sites[name]
        if name not in self.attributes:
            self.attributes[name] = f"{SITE_ATTRIBUTE}_{len(self.attributes)}"
            self.gm.add_submodule(self.attributes[name], site)
        return attribute_inputs(self.gm.graph, self.attributes[name])


def attribute_inputs(graph: torch.fx.Graph, site_path: str) -> SiteInputs:
    """``get_attr`` nodes reading the buffers of the site at ``site_path`` when the graph runs."""
    state, stats, trials = (graph.get_attr(f"{site_path}.{b}") for b in ("threshold_state", "stats", "trial_thresholds"))
    return SiteInputs(state, stats, trials)


class _GraphInputs:
    """Site buffers as extra graph inputs, fetched from the sites on every call (for Inductor)."""

    def __init__(self, gm: torch.fx.GraphModule, sites: dict[str, SparseSite]):
        self.gm, self.sites, self.nodes, self.sources = gm, sites, {}, {}

    def __call__(self, name: str, config: SiteConfig) -> SiteInputs:
        if name not in self.nodes:
            site, graph = self.sites[name], self.gm.graph
            last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
            self.nodes[name] = {}
            with graph.inserting_after(last_input):
                for buffer in SITE_BUFFERS:
                    node = graph.placeholder(f"fxsparse_site_{len(self.nodes)}_{buffer}")
                    node.meta["example_value"] = getattr(site, buffer)
                    node._dynamo_source = None  # not a user input; AOT autograd asks every placeholder
                    self.nodes[name][buffer], self.sources[node] = node, (site, buffer)
        nodes = self.nodes[name]
        return SiteInputs(nodes["threshold_state"], nodes["stats"], nodes["trial_thresholds"])

    def compile_with_inductor(self, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        fetch = [self.sources[node] for node in placeholders[len(example_inputs):]]
        # AOT autograd's cache key misses the site buffers' shapes: it reused code compiled for an older (2, 5)
        # threshold state. Inductor's own FX graph cache keys them correctly and still applies.
        with torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = compile_fx(self.gm, example_inputs + [getattr(site, b) for site, b in fetch])

        shapes = [getattr(site, buffer).shape for site, buffer in fetch]

        def run(*args):
            extra = [getattr(site, buffer) for site, buffer in fetch]
            if any(tensor.shape != shape for tensor, shape in zip(extra, shapes)):
                raise ValueError(
                    "site buffers changed shape (site.measuring) since Inductor compiled this graph; "
                    "measure through fxsparse.sparsify or torch.compile(..., options={'inductor': False})"
                )
            return compiled(*args, *extra)

        return run


def _check_inference(example_inputs) -> None:
    """AOT autograd would trace a backward, and the op has none: say so instead of failing deep inside."""
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in example_inputs):
        raise ValueError(
            "fxsparse with Inductor compiles inference only (the sparse op has no backward); "
            "run under torch.no_grad() / torch.inference_mode(), or pass options={'inductor': False}"
        )


def _detached_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of Dynamo's graph to add inputs to: Dynamo still walks its own graph's placeholders
    after the backend returns. AOT autograd reads ``_dynamo_source`` from each placeholder."""
    graph, copies = torch.fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for node, copy in copies.items():
        if node.op == "placeholder":
            copy._dynamo_source = getattr(node, "_dynamo_source", None)
    return torch.fx.GraphModule(gm, graph)


def _root_expression(gm) -> str | None:
    """``L['self']`` (or ``L['args'][0]``…): the Dynamo source of the frame's module."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, _ = next(iter(stack.values()))
            found = FRAME_ROOT.match(path)
            return found.group(0) if found else None
    return None


def _sites_under(module: nn.Module | None) -> list[SparseSite]:
    return [m for m in module.modules() if isinstance(m, SparseSite)] if module is not None else []


def module_device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), next(iter(module.buffers()), None))
    return tensor.device if tensor is not None else torch.device("cpu")


def _options_config(options: dict) -> Any:
    """The ``config`` option, with the ``backend`` option applied to every pattern."""
    unknown = [key for key in options if key not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown fxsparse option(s) {unknown}; valid options are {list(OPTIONS)}")
    config = options.get("config")
    config = SparseAttentionConfig.from_dict(SKIP_SOFTMAX_DEFAULT if config is None else config)
    config.check_no_calibration("torch.compile(backend='fxsparse')")
    if "backend" in options:
        for settings in config.patterns.values():
            settings["backend"] = options["backend"]
        config = SparseAttentionConfig.from_dict(config.to_dict())  # re-validate the backend name
    return config


def fxsparse_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None, **_):
    """Entry point of ``torch.compile(..., backend="fxsparse")``.

    Options: ``config`` (a ``sparse_cfg`` dict), ``inductor`` (default True), ``backend``
    (the op backend for every site). ``mode`` (HuggingFace passes it) is accepted and ignored.
    """
    options = dict(options or {})
    compiler = SiteCompiler(_options_config(options), inductor=options.get("inductor", True))
    return compiler(gm, example_inputs)
