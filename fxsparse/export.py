"""``transform`` a ``torch.export`` program: attention → ``fxsparse::skip_softmax_attention``.

    ep = torch.export.export(model, (), {"input_ids": ids}, dynamic_shapes=...)
    sparse_ep = fxsparse.transform(ep, SKIP_SOFTMAX_DEFAULT)
    sparse_ep.module()(input_ids=ids)
    torch.export.save(sparse_ep, "model.pt2")      # load after ``import fxsparse``

The program is unlifted (``ep.module()``), each site's buffers are attached as persistent
``SparseSite`` buffers at ``<attention path>.fxsparse_site.*`` and read by ``get_attr``, and the
rewritten module is exported again with the original inputs and the original dynamic dims.
Re-exporting lets torch.export do the bookkeeping: the buffers become BUFFER inputs of the graph
signature and entries of ``state_dict``, and the op's in-place ``stats`` update becomes a
functional op plus a buffer mutation (once decomposed). Both IRs match: before
``run_decompositions`` (matmul, SDPA nodes) and after (bmm/view/expand; SDPA's math form on CPU).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from .backend import module_device, SITE_ATTRIBUTE, attribute_inputs
from .config import SKIP_SOFTMAX_DEFAULT, SiteConfig, SparseAttentionConfig
from .graph.names import full_site_name
from .graph.rewrite import RewriteReport, SiteInputs, rewrite_attention
from .sites import SparseSite

log = logging.getLogger(__name__)


def transform(ep: ExportedProgram, config: Mapping[str, Any] | None = None) -> ExportedProgram:
    """A new ``ExportedProgram`` whose attentions run the sparse op, with threshold buffers.

    Args:
        ep: an exported program (ATen IR, decomposed or not).
        config: a ``sparse_cfg`` dict; default ``SKIP_SOFTMAX_DEFAULT``.

    Raises ValueError when ``ep`` is not an ExportedProgram, has no attention, a config
    pattern matches no site, or the config has a calibration section (transform does not calibrate).
    """
    if not isinstance(ep, ExportedProgram):
        raise ValueError(f"transform needs a torch.export.ExportedProgram, got {type(ep).__name__}")
    config = SparseAttentionConfig.from_dict(SKIP_SOFTMAX_DEFAULT if config is None else config)
    config.check_no_calibration("fxsparse.transform")
    module = ep.module()
    report = _rewrite(module, config)
    if not report.rewritten:
        dense = "; ".join(f"{site}: {reason}" for site, reason in report.left_dense)
        raise ValueError("no attention found in the exported program" + (f" (left dense: {dense})" if dense else ""))
    args, kwargs = ep.example_inputs
    return torch.export.export(module, args, kwargs, dynamic_shapes=_dynamic_shapes(ep, module), strict=False)


def _rewrite(module: torch.fx.GraphModule, config: SparseAttentionConfig) -> RewriteReport:
    """Rewrite the unlifted program in place, attaching persistent sites to it."""
    configs: dict[str, SiteConfig] = {}

    def configure(names: list[str]) -> dict[str, SiteConfig]:
        paths = {name: full_site_name("", name) for name in names}
        resolved = config.resolve(paths.values())
        for name, path in paths.items():
            configs[name] = resolved[path]
            site = SparseSite(path, configs[name], persistent=True).to(module_device(module))
            _attach(module, f"{path}.{SITE_ATTRIBUTE}", site)
        return configs

    def site_inputs(name: str, settings: SiteConfig) -> SiteInputs:
        return attribute_inputs(module.graph, f"{full_site_name('', name)}.{SITE_ATTRIBUTE}")

    report = rewrite_attention(module.graph, configure, site_inputs)
    module.recompile()
    report.rewritten = [full_site_name("", site) for site in report.rewritten]
    report.left_dense = [(full_site_name("", site), reason) for site, reason in report.left_dense]
    log.info("fxsparse.transform: %s", report)
    for site, reason in report.left_dense:
        log.warning("fxsparse.transform: %s stays dense: %s", site, reason)
    return report


def _attach(root: nn.Module, path: str, site: SparseSite) -> None:
    """Put ``site`` at ``path``, creating empty parent modules the unlifted program lacks."""
    *parents, leaf = path.split(".")
    module = root
    for name in parents:
        if not hasattr(module, name):
            module.add_module(name, nn.Module())
        module = getattr(module, name)
    module.add_module(leaf, site)


def _dynamic_shapes(ep: ExportedProgram, module: nn.Module) -> dict[str, Any]:
    """The original program's dynamic dims, as ``Dim.DYNAMIC`` specs keyed by input name."""
    values = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    user_inputs = [spec.arg for spec in ep.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    args, kwargs = ep.example_inputs
    leaves, tree = pytree.tree_flatten((args, kwargs))
    specs = []
    for leaf, argument in zip(leaves, user_inputs, strict=True):
        value = values.get(getattr(argument, "name", None))
        if isinstance(leaf, torch.Tensor) and isinstance(value, torch.Tensor):
            dims = {i: Dim.DYNAMIC for i, size in enumerate(value.shape) if isinstance(size, torch.SymInt)}
            specs.append(dims or None)
        else:
            specs.append(None)
    arg_specs, kwarg_specs = pytree.tree_unflatten(specs, tree)
    names = list(inspect.signature(module.forward).parameters)
    return {**dict(zip(names, arg_specs)), **kwarg_specs}
