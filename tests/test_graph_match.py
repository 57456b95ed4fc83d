"""Matcher and rewriter on small hand-written attentions, in Dynamo's IR and torch.export's IR.

Positive forms must become exactly one op call with the right q/k/v/mask/scale and un-repeated
K/V; negative forms must stay dense, with the reason in the report.
"""

from __future__ import annotations

import functools
import logging
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxsparse.backend import SiteCompiler
from fxsparse.graph.names import module_path
from fxsparse.graph.match import find_attention
from fxsparse.graph.rewrite import SiteInputs, rewrite_attention

OP = torch.ops.fxsparse.skip_softmax_attention.default
CONFIG = {"sparse_cfg": {"*": {"threshold": 0.0, "br": 16, "bc": 16, "backend": "pytorch"}}}
B, HQ, HKV, L, D = 2, 4, 2, 19, 8


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HuggingFace's repeat_kv."""
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


class Eager(nn.Module):
    """HF eager_attention_forward, with switches for other spellings and for the forms the matcher
    must refuse. ``scaling``: "multiply", "divide", "divide_in_place" (Falcon's ``scores /= √d``)
    or "after_mask" (``(QKᵀ + mask)·c``, which scales the mask too). ``sinks``: gpt-oss's extra
    logit per head, in the softmax and sliced off before P·V. ``where_mask``: GPT-Neo's causal mask,
    ``where(causal, scores, finfo.min)`` before the additive mask."""

    def __init__(self, softcap=None, dropout=0.0, return_probs=False, softmax_dim=-1, scaling="multiply", sinks=False,
                 where_mask=False):
        super().__init__()
        self.softcap, self.dropout, self.return_probs = softcap, dropout, return_probs
        self.softmax_dim, self.scaling, self.sinks, self.where_mask = softmax_dim, scaling, sinks, where_mask

    def forward(self, q, k, v, mask):
        k, v = repeat_kv(k, HQ // HKV), repeat_kv(v, HQ // HKV)
        scores = torch.matmul(q, k.transpose(2, 3))
        if self.scaling == "multiply":
            scores = scores * D**-0.5
        elif self.scaling == "divide":
            scores = scores / math.sqrt(D)
        elif self.scaling == "divide_in_place":
            scores /= math.sqrt(D)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if self.where_mask:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = torch.where(causal, scores, torch.finfo(scores.dtype).min)
        scores = scores + mask
        if self.scaling == "after_mask":
            scores = scores * D**-0.5
        if self.sinks:
            scores = torch.cat([scores, torch.zeros_like(scores[..., :1])], dim=-1)
        probs = F.softmax(scores, dim=self.softmax_dim, dtype=torch.float32)
        if self.sinks:
            probs = probs[..., :-1]
        probs = probs.to(q.dtype)
        probs = F.dropout(probs, p=self.dropout, training=self.training)
        out = torch.matmul(probs, v)
        return (out, probs) if self.return_probs else out


class Fused(nn.Module):
    def __init__(self, is_causal=False, dropout=0.0):
        super().__init__()
        self.is_causal, self.dropout = is_causal, dropout

    def forward(self, q, k, v, mask):
        mask = None if self.is_causal else mask
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.is_causal, dropout_p=self.dropout, scale=0.3, enable_gqa=True
        )


class Block(nn.Module):
    """Puts the attention at a module path, like a decoder layer."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.self_attn = attention

    def forward(self, q, k, v, mask):
        return self.self_attn(q, k, v, mask)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles the same ``Block.forward``; start each from an empty Dynamo cache."""
    torch._dynamo.reset()


def inputs(query_len: int = L, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, query_len, D, generator=g)
    k, v = torch.randn(B, HKV, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g)
    allowed = torch.ones(B, 1, query_len, L, dtype=torch.bool)
    allowed[0, ..., :3] = False  # left padding of the first sequence (no row is fully masked)
    mask = torch.zeros(B, 1, query_len, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return q, k, v, mask


def compile_block(attention: nn.Module):
    model = Block(attention).eval()
    compiler = SiteCompiler(CONFIG, inductor=False)
    return model, torch.compile(model, backend=compiler, fullgraph=True), compiler


SCALINGS = ("multiply", "divide", "divide_in_place")


@pytest.mark.parametrize("attention", [*(functools.partial(Eager, scaling=s) for s in SCALINGS), Fused],
                         ids=[*SCALINGS, "sdpa"])
def test_dynamo_rewrite_matches_dense(attention):
    model, compiled, compiler = compile_block(attention())
    q, k, v, mask = inputs()
    torch.testing.assert_close(compiled(q, k, v, mask), model(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert compiler.report.rewritten == ["self_attn"] and not compiler.report.left_dense
    assert "fxsparse_site" in str(model.self_attn._modules)


def test_repeat_kv_is_peeled_and_dead_nodes_removed():
    gm = torch.export.export(Block(Eager()), inputs()).module()
    seen = []
    report = rewrite_attention(gm.graph, lambda names: _configs(names), lambda name, cfg: _constants(gm, seen))
    gm.recompile()
    (op,) = [n for n in gm.graph.nodes if n.target is OP]
    assert report.rewritten == ["self_attn"]
    assert op.args[1].meta["val"].shape[1] == HKV and op.args[2].meta["val"].shape[1] == HKV
    code = gm.code
    assert not any(f"aten.{op}" in code for op in ("softmax", "expand", "matmul", "dropout", "_to_copy"))
    q, k, v, mask = inputs()
    torch.testing.assert_close(gm(q, k, v, mask), Block(Eager())(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_causal_sdpa_bottom_right_in_decode():
    model, compiled, compiler = compile_block(Fused(is_causal=True))
    q, k, v, mask = inputs()
    torch.testing.assert_close(compiled(q, k, v, mask), model(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert compiler.report.rewritten == ["self_attn"]


@pytest.mark.parametrize(
    "attention, reason",
    [
        (Eager(return_probs=True), "used elsewhere"),
        (Eager(softcap=30.0), "soft-capping"),
        (Eager(scaling="after_mask"), "mask added before scaling"),
        (Eager(sinks=True), "attention sinks"),
        (Eager(where_mask=True), "mask applied by where()"),
        (Eager(softmax_dim=-2), "dim -2"),
        (Eager(dropout=0.1).train(), "no dropout (for inference, call model.eval() first)"),
        (Fused(dropout=0.1).train(), "dropout_p=0.1: the op has no dropout (for inference, call model.eval() first)"),
    ],
    ids=["output_attentions", "softcap", "scale_after_mask", "sinks", "where_mask", "softmax_dim", "dropout_eager", "dropout_sdpa"],
)
def test_unrepresentable_attention_stays_dense_with_reason(attention, reason, caplog):
    model = Block(attention)
    compiler = SiteCompiler(CONFIG, inductor=False)
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    q, k, v, mask = inputs()
    torch.manual_seed(0)
    compiled(q, k, v, mask)
    assert compiler.report.rewritten == []
    ((site, why),) = compiler.report.left_dense
    assert site == "self_attn" and reason in why
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"fxsparse: self_attn stays dense: {why}"]


def test_causal_sdpa_with_unequal_lengths_stays_dense():
    q, k, v, _ = inputs(query_len=5)
    gm = torch.export.export(Block(Fused(is_causal=True)), (q, k, v, None)).module()
    report = rewrite_attention(gm.graph, _configs, lambda name, cfg: _constants(gm, []))
    assert report.rewritten == [] and "top-left" in report.left_dense[0][1]


@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.parametrize("attention", [Eager, functools.partial(Eager, scaling="divide_in_place"), Fused],
                         ids=["eager", "divide_in_place", "sdpa"])
def test_export_before_and_after_decompositions(attention, decompose):
    """After ``run_decompositions`` the eager chain is bmm/view/expand and SDPA is its math form
    (q and kᵀ scaled by √scale each, a safe softmax); both still match."""
    ep = torch.export.export(Block(attention()), inputs())
    if decompose:
        ep = ep.run_decompositions()
    gm = ep.module()
    report = rewrite_attention(gm.graph, _configs, lambda name, cfg: _constants(gm, []))
    gm.recompile()
    assert report.rewritten == ["self_attn"]
    q, k, v, mask = inputs(seed=3)
    torch.testing.assert_close(gm(q, k, v, mask), Block(attention())(q, k, v, mask), atol=1e-5, rtol=1e-5)


aten = torch.ops.aten
# the fused kernels' (q, k, v, ...) argument lists, with a mask where the kernel takes one
FUSED_KERNELS = {
    "flash": (aten._scaled_dot_product_flash_attention.default, lambda m: (0.0, True), {}),
    "flash_cpu": (aten._scaled_dot_product_flash_attention_for_cpu.default, lambda m: (0.0, False), {"attn_mask": "m"}),
    "efficient": (aten._scaled_dot_product_efficient_attention.default, lambda m: (m, False, 0.0, False), {}),
    "cudnn": (aten._scaled_dot_product_cudnn_attention.default, lambda m: (m, False, 0.0, False, False), {}),
}


@pytest.mark.parametrize("kernel", FUSED_KERNELS)
def test_fused_kernel_variants_match_with_their_arguments(kernel):
    """The CUDA-only variants (built by hand here: CPU export never produces them)."""
    target, rest, kwargs = FUSED_KERNELS[kernel]
    graph = torch.fx.Graph()
    q, k, v, mask = (graph.placeholder(n) for n in "qkvm")
    for node, value in zip((q, k, v, mask), inputs(query_len=L)):
        node.meta["val"] = value
    args = (q, k, v, *rest(mask))
    call = graph.call_function(target, args, {**{key: mask for key in kwargs}, "scale": 0.3})
    call.meta["val"] = (torch.empty(B, HQ, L, D), torch.empty(B, HQ, L))
    out = graph.call_function(operator.getitem, (call, 0))
    out.meta["val"] = torch.empty(B, HQ, L, D)
    graph.output(out)
    (found,), left_dense = find_attention(graph)
    assert not left_dense and found.output is out and (found.query, found.key, found.value) == (q, k, v)
    assert found.scale == 0.3 and found.is_causal == (kernel == "flash")
    assert found.mask is (None if kernel == "flash" else mask)

    logsumexp = graph.call_function(operator.getitem, (call, 1))
    graph.call_function(torch.exp, (logsumexp,))
    assert find_attention(graph)[0] == [] and "log-sum-exp" in find_attention(graph)[1][0].reason


@pytest.mark.parametrize(
    "dynamo_path, plain",
    [
        ("L['self'].model.layers.3.self_attn", "model.layers.3.self_attn"),
        ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),
        ("L['self']._modules['model']._modules['layers']._modules['2'].attn", "model.layers.2.attn"),
        ("getattr(L['self'].model.layers, '1').self_attn", "model.layers.1.self_attn"),
        ("model.layers.3.self_attn", "model.layers.3.self_attn"),
    ],
)
def test_site_names_are_plain_module_paths(dynamo_path, plain):
    assert module_path(dynamo_path) == plain


# -- helpers: sites as constant buffers on the GraphModule --


def _configs(names):
    from fxsparse.config import SparseAttentionConfig

    return SparseAttentionConfig.from_dict(CONFIG).resolve(names)


def _constants(gm, seen) -> SiteInputs:
    from fxsparse.sites import SparseSite

    site = SparseSite("site", _configs(["site"])["site"])
    name = f"site_{len(seen)}"
    seen.append(name)
    gm.add_submodule(name, site)
    state, stats, trials = (gm.graph.get_attr(f"{name}.{b}") for b in ("threshold_state", "stats", "trial_thresholds"))
    return SiteInputs(state, stats, trials)
