"""``fxsparse.sparsify`` on tiny HuggingFace models: sites, exact logits and greedy tokens at λ = 0,
sparsity at λ > 0, steering without recompiling, summary and errors."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.config import SKIP_SOFTMAX_DEFAULT
from models import ARCHITECTURES, ATTENTION_IMPLEMENTATIONS, left_padded, random_ids, tiny_model

STATIC_CACHE_ARCHITECTURES = ("llama", "gpt2")  # the static cache path is model-independent HF code
DENSE = {"sparse_cfg": {"*": {"threshold": 0.0, "br": 16, "bc": 16, "backend": "pytorch"}}}  # Falcon: self_attention


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()


def greedy(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)


@pytest.mark.parametrize("impl", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_sparsify_at_zero_threshold_equals_dense(arch, impl):
    dense, model = tiny_model(arch, impl), tiny_model(arch, impl)
    ids, mask = left_padded(2, 40, pad=5)
    expected = dense(input_ids=ids, attention_mask=mask).logits
    caches = (None, "static") if arch in STATIC_CACHE_ARCHITECTURES else (None,)
    expected_tokens = {cache: greedy(dense, ids, mask, cache_implementation=cache) for cache in caches}
    state = copy.deepcopy(model.state_dict())

    fxsparse.sparsify(model, DENSE)

    assert len(fxsparse.sites_of(model)) == model.config.num_hidden_layers
    logits = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()  # padded query rows: HF attends uniformly, the op outputs 0
    assert (logits[valid] - expected[valid]).abs().max() < 1e-4
    for cache, tokens in expected_tokens.items():
        assert torch.equal(greedy(model, ids, mask, cache_implementation=cache), tokens), cache
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@torch.no_grad()
def test_generate_where_hf_would_compile_the_model_again():
    """On GPU with a static cache, generate() compiles the model (fullgraph); sparsify opts out."""
    from transformers import CompileConfig

    dense, model = tiny_model("llama", "sdpa"), fxsparse.sparsify(tiny_model("llama", "sdpa"), DENSE)
    ids, mask = left_padded(2, 30, pad=4)
    compile_config = CompileConfig(backend="eager", fullgraph=True)
    compile_config._compile_all_devices = True  # as on CUDA
    expected = greedy(dense, ids, mask, cache_implementation="static")
    tokens = greedy(model, ids, mask, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(tokens, expected)


def sharpened_llama(impl: str):
    """Random weights give near-uniform attention; larger q/k projections give peaked scores.
    Even so, random scores only skip whole 16-row tiles for λ ≳ 1 (SPEC §9), hence λ = 2 below."""
    model = tiny_model("llama", impl)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


@pytest.mark.parametrize("impl", ATTENTION_IMPLEMENTATIONS)
@torch.no_grad()
def test_positive_threshold_skips_tiles_in_prefill_and_decode(impl):
    model = sharpened_llama(impl)
    config = {"sparse_cfg": {"*attn*": {"threshold": 2.0, "br": 16, "bc": 16, "backend": "pytorch"}}}
    fxsparse.sparsify(model, config)
    fxsparse.reset_stats(model)
    ids, mask = left_padded(2, 96, pad=7)
    greedy(model, ids, mask)
    for name, phases in fxsparse.get_stats(model).items():
        for phase in ("prefill", "decode"):
            assert phases[phase]["valid"] > 0 and phases[phase]["sparsity"] > 0, (name, phase, phases)
    table = fxsparse.summary(model, file=None)
    assert "model.layers.1.self_attn" in table and "λ=2" in table


@torch.no_grad()
def test_steering_changes_outputs_without_recompiling():
    model = sharpened_llama("sdpa")
    fxsparse.sparsify(model, DENSE)
    ids = random_ids(2, 64)
    dense = model(ids).logits
    compiles = model.fxsparse_compiler.compiles

    fxsparse.set_threshold(model, 2.0)
    sparse = model(ids).logits
    fxsparse.disable_sparsity(model, "*layers.1*")
    half = model(ids).logits
    fxsparse.disable_sparsity(model)
    disabled = model(ids).logits
    fxsparse.enable_sparsity(model)
    enabled = model(ids).logits

    assert model.fxsparse_compiler.compiles == compiles
    assert not torch.allclose(sparse, dense) and not torch.allclose(half, sparse)
    torch.testing.assert_close(disabled, dense)
    torch.testing.assert_close(enabled, sparse)


@torch.no_grad()
def test_measuring_swaps_buffers_without_recompiling():
    """Calibration replaces ``stats`` by a wider tensor; the graph must read the new one."""
    model = sharpened_llama("eager")
    fxsparse.sparsify(model, DENSE)
    ids = random_ids(1, 64)
    model(ids)
    compiles = model.fxsparse_compiler.compiles
    site = fxsparse.sites_of(model)["model.layers.0.self_attn"]
    with site.measuring(torch.tensor([0.5, 2.0, 8.0])):
        model(ids)
        counts = site.stats.clone()
    assert counts.shape == (2, 4) and counts[0, 0] > 0
    assert counts[0, 1] <= counts[0, 2] <= counts[0, 3] and counts[0, 3] > 0
    assert model.fxsparse_compiler.compiles == compiles


@torch.no_grad()
def test_calibration_section_runs_measuring_through_the_compiled_graph():
    model = sharpened_llama("sdpa")
    config = {"sparse_cfg": {
        "calibration": {"target_sparse_ratio": 0.3, "samples": 2, "max_seqlen": 1024, "heldout_samples": 0},
        "*attn*": {"threshold": 0.0, "br": 16, "bc": 16, "backend": "pytorch"}}}

    def forward_loop(model):
        for seed in range(3):
            ids, mask = left_padded(2, 96, pad=5, seed=seed)
            greedy(model, ids, mask)

    fxsparse.sparsify(model, config, forward_loop=forward_loop)
    laws = [site.law() for site in fxsparse.sites_of(model).values()]
    assert all(law and set(law) == {"prefill", "decode"} for law in laws), laws
    assert model.fxsparse_compiler.compiles == 3  # warm-up, prefill, decode: measuring never recompiles
    fxsparse.set_target_sparsity(model, 0.6)
    table = fxsparse.summary(model, file=None).splitlines()
    assert all("exp(" in row and "·0.60 + o(L))/L" in row for row in table[1:])  # calibrated with length offsets
    # laws differ in length from site to site; the sparsity column still starts at the header's offset
    start = table[0].index("sparsity p / d")
    assert all(row[:start].rstrip().endswith(")/L") and row[start - 1] == " " != row[start] for row in table[1:])
    first = next(iter(fxsparse.sites_of(model).values()))  # a law with a fitted length exponent says so
    first.set_law({"prefill": {"a": 2.0, "b": 3.0, "p": 1.8}}, 0.6)
    assert "p: 2·exp(3·0.60)/L^1.8" in fxsparse.summary(model, file=None).splitlines()[1]


def test_seed_import_path_and_default_config():
    import fxsparse.attention_sparsity as mtsa
    from fxsparse.attention_sparsity.config import SKIP_SOFTMAX_CALIB, SKIP_SOFTMAX_DEFAULT as DEFAULT

    assert DEFAULT is SKIP_SOFTMAX_DEFAULT and "calibration" in SKIP_SOFTMAX_CALIB["sparse_cfg"]
    model = mtsa.sparsify(tiny_model("qwen2", "sdpa"), config=DEFAULT)
    site = mtsa.get_stats(model) and fxsparse.sites_of(model)["model.layers.0.self_attn"]
    assert site.thresholds() == pytest.approx({"prefill": 1e-3, "decode": 1e-4})


def test_patterns_resolve_over_all_sites_and_unmatched_ones_list_them():
    model = tiny_model("llama", "eager")
    config = {"sparse_cfg": {"*attn*": {"threshold": 0.0}, "*mlp*": {"enable": False}}}
    with pytest.raises(ValueError, match=r"'\*mlp\*' matches no attention site.*model.layers.0.self_attn"):
        fxsparse.sparsify(model, config)
    assert not fxsparse.sites_of(model) and "forward" not in vars(model)

    config = {"sparse_cfg": {"*attn*": {"threshold": 0.0}, "*layers.1.*": {"enable": False}}}
    sites = fxsparse.sites_of(fxsparse.sparsify(model, config))
    assert [site.enabled for site in sites.values()] == [True, False]
    with pytest.raises(ValueError, match="matches no attention site"):
        fxsparse.set_threshold(model, 0.1, "lm_head")
    with pytest.raises(ValueError, match=r"pattern must be an fnmatch pattern .*, got 0"):
        fxsparse.disable_sparsity(model, 0)


def test_calibrating_config_without_its_inputs_fails_before_the_rewrite(tmp_path):
    from test_hf_checkpoint import tiny_tokenizer

    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match=r"calibration needs tokenizer= .* or forward_loop=") as error:
        fxsparse.sparsify(model, fxsparse.SKIP_SOFTMAX_CALIB)
    assert "\n" not in str(error.value)
    config = copy.deepcopy(fxsparse.SKIP_SOFTMAX_CALIB)
    config["sparse_cfg"]["calibration"]["data_dir"] = str(tmp_path / "no-essays")
    with pytest.raises(FileNotFoundError, match="no Paul Graham essays"):
        fxsparse.sparsify(model, config, tokenizer=tiny_tokenizer())
    assert not fxsparse.sites_of(model) and "forward" not in vars(model)


@torch.no_grad()
def test_compiling_a_sparsified_model_again_keeps_the_sparse_op():
    """An outer torch.compile must not inline the dense original forward."""
    model = fxsparse.sparsify(tiny_model("llama", "sdpa"), DENSE)
    fxsparse.reset_stats(model)
    torch.compile(model, backend="eager")(random_ids(2, 8))
    assert all(s["prefill"]["valid"] > 0 for s in fxsparse.get_stats(model).values())


@torch.no_grad()
def test_deepcopy_runs_its_own_weights_and_sites():
    """The copy's forward must not be the original's: new weights show in its logits, its sites are its own."""
    model = fxsparse.sparsify(tiny_model("llama", "sdpa"), DENSE)
    fxsparse.set_threshold(model, 0.3, "*layers.0.*")
    clone = copy.deepcopy(model)
    ids = random_ids(2, 40)
    original_logits = model(input_ids=ids).logits
    dense = tiny_model("llama", "sdpa")
    dense.lm_head.weight.mul_(2)  # same weights as the copy gets next (tiny_model is seeded)
    clone.lm_head.weight.mul_(2)
    fxsparse.set_threshold(clone, 0.0, "*layers.0.*")  # the original keeps 0.3
    fxsparse.reset_stats(clone)

    assert (clone(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() < 1e-4
    assert torch.equal(model(input_ids=ids).logits, original_logits)
    assert all(s["prefill"]["valid"] > 0 for s in fxsparse.get_stats(clone).values())
    assert [s.threshold_state[0, 1].item() for s in fxsparse.sites_of(model).values()] == pytest.approx([0.3, 0.0])


@torch.no_grad()
def test_a_dropped_sparsified_model_is_freed():
    """torch.compile keeps its backends for the whole process: they must not keep the model (its
    weights) alive."""
    model = fxsparse.sparsify(tiny_model("llama", "sdpa"), DENSE)
    model(random_ids(1, 8))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


@torch.no_grad()
def test_sparsify_after_other_compiles_spent_the_shared_recompile_budget():
    """HF forwards share code objects across models; Dynamo's recompile limit counts per code object and,
    once hit, runs that code eagerly for good. sparsify must not depend on that shared budget."""
    limit = torch._dynamo.config.recompile_limit
    model = tiny_model("llama", "sdpa")
    for _ in range(limit + 1):  # a new backend per compile: one more cache entry each
        torch.compile(model, backend=lambda gm, example_inputs: gm.forward)(random_ids(1, 8))
    model = fxsparse.sparsify(tiny_model("llama", "sdpa"), DENSE)
    assert len(fxsparse.sites_of(model)) == model.config.num_hidden_layers


class NoAttention(nn.Module):
    """HF-shaped (config, main_input_name) but attention-free."""

    main_input_name = "input_ids"

    def __init__(self):
        super().__init__()
        self.config = object()
        self.embed = nn.Embedding(100, 8)

    def forward(self, input_ids):
        return self.embed(input_ids).softmax(-1).sum(-1)


@pytest.mark.parametrize(
    "model, message",
    [(NoAttention(), "no attention found in NoAttention"), (nn.Linear(2, 2), "needs a HuggingFace PreTrainedModel")],
)
def test_unsupported_models_fail_with_one_clear_line(model, message):
    with pytest.raises(ValueError, match=message) as error:
        fxsparse.sparsify(model, DENSE)
    assert "\n" not in str(error.value)
