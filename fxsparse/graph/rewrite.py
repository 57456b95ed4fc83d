"""Graph surgery: replace each matched attention by one ``fxsparse::skip_softmax_attention`` call.

How the op reaches its site's buffers is the caller's choice, passed in as ``site_inputs``:
``get_attr`` nodes on the GraphModule (read at call time; also the unlifted torch.export module), or
extra graph inputs (Inductor). Only nodes of a match are erased, and only once they are
dead: no general dead-code elimination runs, because FX does not know that Dynamo's in-place
``call_method`` nodes (the KV cache's ``index_copy_``) have side effects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.fx import Graph, Node

from ..config import SiteConfig
from .match import AttentionMatch, find_attention
from .patterns import users_of

log = logging.getLogger(__name__)


@dataclass
class SiteInputs:
    """Graph nodes that produce one site's buffers when the graph runs."""

    threshold_state: Node
    stats: Node  # an empty tensor when the site does not collect stats
    trial_thresholds: Node


@dataclass
class RewriteReport:
    """What a rewrite did: sites rewritten to the op, and attentions left dense with the reason."""

    rewritten: list[str] = field(default_factory=list)
    left_dense: list[tuple[str, str]] = field(default_factory=list)

    def extend(self, other: "RewriteReport") -> None:
        self.rewritten += other.rewritten
        self.left_dense += other.left_dense

    def __str__(self) -> str:
        lines = [f"rewritten {len(self.rewritten)} attention site(s): {', '.join(self.rewritten) or '-'}"]
        lines += [f"left dense: {site}: {reason}" for site, reason in self.left_dense]
        return "\n".join(lines)


def rewrite_attention(
    graph: Graph,
    configure: Callable[[list[str]], dict[str, SiteConfig]],
    site_inputs: Callable[[str, SiteConfig], SiteInputs],
) -> RewriteReport:
    """Rewrite every representable attention of ``graph`` in place.

    Args:
        configure: site names found → their resolved settings (may raise on a bad config).
        site_inputs: (site name, settings) → nodes for its buffers; called with the graph's
            insertion point just before the attention output.
    """
    matches, left_dense = find_attention(graph)
    report = RewriteReport(left_dense=[(reason.site, reason.reason) for reason in left_dense])
    for site, reason in report.left_dense:
        log.info("fxsparse: %s stays dense: %s", site, reason)
    if not matches:
        return report
    configs = configure(list(dict.fromkeys(m.site for m in matches)))
    for match in matches:
        _replace(graph, match, configs[match.site], site_inputs)
        report.rewritten.append(match.site)
    graph.lint()
    log.info("fxsparse: %s", report)
    return report


def _replace(graph: Graph, match: AttentionMatch, config: SiteConfig, site_inputs) -> None:
    with graph.inserting_before(match.output):
        inputs = site_inputs(match.site, config)
        op = graph.call_function(
            torch.ops.fxsparse.skip_softmax_attention.default,
            (match.query, match.key, match.value, match.mask, match.is_causal, match.scale,
             inputs.threshold_state, config.br, config.bc, config.backend, inputs.stats,
             inputs.trial_thresholds),
        )
    op.meta = dict(match.output.meta)
    match.output.replace_all_uses_with(op)
    _erase_dead(graph, match.pattern)


def _erase_dead(graph: Graph, pattern: list[Node]) -> None:
    """Erase the match's nodes that nothing uses any more, consumers first."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted(set(pattern), key=order.__getitem__, reverse=True):
        if users_of(node):
            continue
        for check in list(node.users):  # export's metadata asserts on a value we remove
            graph.erase_node(check)
        graph.erase_node(node)
