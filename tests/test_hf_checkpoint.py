"""HF checkpoint export and reload: schema of config.json, same weights/logits, same thresholds and laws.

Also home of ``save_tiny_llama``, the tiny random Llama + offline tokenizer the CLI tests use too.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import fxsparse
from fxsparse.config import SiteConfig
from fxsparse.hf_checkpoint import FXSPARSE_KEY, SPARSE_ATTENTION_KEY, export_hf, recorded_sparsity
from fxsparse.sites import SparseSite, sites_of

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SITE_NAMES = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes) with a chat template, trained offline in a few ms."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(["What is the special magic number in the document? The answer is 42. " * 8], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def save_tiny_llama(directory, seed: int = 0, sharpness: float = 4.0) -> LlamaForCausalLM:
    """A 2-layer random Llama (GQA 4/2 heads) and its tokenizer, saved with ``save_pretrained``.

    q/k weights are scaled by ``sharpness`` so attention is peaky as in trained models (random
    weights give almost uniform attention, nothing to skip and no law to calibrate).
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data *= sharpness
        layer.self_attn.k_proj.weight.data *= sharpness
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return model


def attach_sites(model, configs: dict[str, SiteConfig] | None = None) -> dict[str, SparseSite]:
    """Sites hung on the attention modules by hand: tests export/reload without the graph rewrite."""
    for name in SITE_NAMES:
        site = SparseSite(name, (configs or {}).get(name, SiteConfig(br=16, bc=16, backend="pytorch")))
        model.get_submodule(name).fxsparse_site = site
    return sites_of(model)


LAW = {"prefill": {"a": 7.9, "b": 8.6}, "decode": {"a": 0.12, "b": 9.8}}


@pytest.fixture
def tiny(tmp_path):
    model = save_tiny_llama(tmp_path / "src")
    return model, AutoTokenizer.from_pretrained(tmp_path / "src")


def _state(sites):
    return {name: (site.enabled, site.thresholds(), site.law(), site.config.br, site.config.bc) for name, site in sites.items()}


def _settings(resolved):
    return {name: (c.br, c.bc, c.backend, c.enable) for name, c in resolved.items()}


def test_config_json_matches_the_schema(tiny, tmp_path):
    model, tokenizer = tiny
    sites = attach_sites(model)
    for site in sites.values():
        site.set_law(LAW, {"prefill": 0.5, "decode": 0.4})
    export_hf(model, tmp_path / "out", tokenizer)

    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    block = saved[SPARSE_ATTENTION_KEY]
    assert set(block) == {"config_groups", "producer"}
    assert block["producer"] == {"name": "fxsparse", "version": fxsparse.__version__}
    assert set(block["config_groups"]) == {"group_0"}
    group = block["config_groups"]["group_0"]
    assert set(group) == {"algorithm", "targets", "ignore", "threshold_scale_factor", "target_sparsity"}
    assert group["algorithm"] == "skip_softmax"
    assert group["targets"] == ["LlamaAttention"]
    assert group["ignore"] == []
    factor = group["threshold_scale_factor"]
    assert set(factor) == {"formula", "prefill", "decode"}
    assert factor["formula"] == "a * exp(b * target_sparsity)"
    for phase in ("prefill", "decode"):
        assert set(factor[phase]) == {"a", "b"}
        assert all(type(v) is float for v in factor[phase].values())
        assert factor[phase]["a"] == pytest.approx(LAW[phase]["a"])
        assert factor[phase]["b"] == pytest.approx(LAW[phase]["b"])
    assert set(group["target_sparsity"]) == {"prefill", "decode"}
    assert all(type(v) is float for v in group["target_sparsity"].values())
    assert group["target_sparsity"] == pytest.approx({"prefill": 0.5, "decode": 0.4})
    own = saved[FXSPARSE_KEY]
    assert own["version"] == fxsparse.__version__ and list(own["sites"]) == SITE_NAMES
    assert set(own["sites"][SITE_NAMES[0]]) == {
        "method", "threshold", "br", "bc", "backend", "collect_stats", "enable", "law"
    }


def test_export_reload_same_logits_thresholds_and_laws(tiny, tmp_path):
    model, tokenizer = tiny
    sites = attach_sites(model, {SITE_NAMES[1]: SiteConfig(br=32, bc=64, backend="pytorch", threshold=SiteConfig().threshold)})
    offsets = [0.5, -0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.125]  # a fitted length exponent and per-length correction
    sites[SITE_NAMES[0]].set_law({**LAW, "prefill": {**LAW["prefill"], "p": 1.7, "offsets": offsets}}, 0.6)
    sites[SITE_NAMES[1]].set_threshold({"prefill": 0.02, "decode": 0.003})
    before = model.config.to_dict()
    export_hf(model, tmp_path / "out", tokenizer)
    assert model.config.to_dict() == before  # export leaves the model's config alone

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # plain transformers
    ids = torch.randint(0, 320, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("magic 42")["input_ids"] == tokenizer("magic 42")["input_ids"]

    recorded = recorded_sparsity(reloaded.config)
    assert recorded is not None
    resolved = fxsparse.SparseAttentionConfig.from_dict(recorded.config).resolve(SITE_NAMES)
    assert _settings(resolved) == {name: (s.config.br, s.config.bc, s.config.backend, s.enabled) for name, s in sites.items()}
    for name, site in sites.items():  # the record holds the float32 buffers' values as short decimals
        assert resolved[name].threshold.to_dict() == pytest.approx(site.thresholds(), rel=1e-7)
    fresh = attach_sites(reloaded, resolved)
    recorded.apply(fresh)
    assert _state(fresh) == _state(sites)


def test_fixed_thresholds_and_disabled_sites(tiny, tmp_path):
    model, tokenizer = tiny
    sites = attach_sites(model)
    sites[SITE_NAMES[0]].set_enabled(False)
    export_hf(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    group = saved[SPARSE_ATTENTION_KEY]["config_groups"]["group_0"]
    assert group["ignore"] == [SITE_NAMES[0]]
    assert group["threshold_scale_factor"]["prefill"] == {"a": 0.0, "b": 0.0}
    assert group["target_sparsity"] == {"prefill": 0.0, "decode": 0.0}
    record = saved[FXSPARSE_KEY]["sites"][SITE_NAMES[1]]
    assert record["threshold"] == pytest.approx({"prefill": 1e-3, "decode": 1e-4})
    assert record["law"] is None and record["enable"] is True
    assert saved[FXSPARSE_KEY]["sites"][SITE_NAMES[0]]["enable"] is False

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    fresh = attach_sites(reloaded)
    recorded_sparsity(reloaded.config).apply(fresh)
    assert _state(fresh) == _state(sites)


def test_per_site_laws_group_carries_the_median_site(tiny, tmp_path):
    model, _ = tiny
    sites = attach_sites(model)
    sites[SITE_NAMES[0]].set_law({"prefill": {"a": 1.0, "b": 2.0}}, 0.5)
    sites[SITE_NAMES[1]].set_law({"prefill": {"a": 3.0, "b": 2.0}}, 0.5)
    export_hf(model, tmp_path / "out")
    group = json.loads((tmp_path / "out" / "config.json").read_text())[SPARSE_ATTENTION_KEY]["config_groups"]["group_0"]
    assert group["threshold_scale_factor"]["prefill"] == {"a": 1.0, "b": 2.0}
    assert group["threshold_scale_factor"]["decode"] == {"a": 0.0, "b": 0.0}
    assert group["target_sparsity"] == {"prefill": 0.5, "decode": 0.0}


def test_group_carries_a_length_exponent_law_as_the_one_over_l_law_equal_at_4096(tiny, tmp_path):
    model, _ = tiny
    sites = attach_sites(model)
    for site in sites.values():
        site.set_law({"prefill": {"a": 300.0, "b": 2.0, "p": 2.0, "offsets": [0, 0, 0.3, 0, 0, 0, 0, 0]}}, 0.5)
    export_hf(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    group = saved[SPARSE_ATTENTION_KEY]["config_groups"]["group_0"]
    factor = group["threshold_scale_factor"]["prefill"]
    # a reader of the group computes λ = a·exp(b·S)/L: at L = 4096 that is the site's 300·exp(b·S + 0.3)/4096²
    assert factor["a"] * math.exp(factor["b"] * 0.5) / 4096 == pytest.approx(300.0 * math.exp(1.3) / 4096**2, rel=1e-6)
    assert saved[FXSPARSE_KEY]["sites"][SITE_NAMES[0]]["law"]["prefill"]["p"] == 2.0


def test_reads_a_model_optimizer_style_group(tiny):
    model, _ = tiny
    hf_config = {SPARSE_ATTENTION_KEY: {
        "config_groups": {"group_0": {
            "algorithm": "skip_softmax", "targets": ["LlamaAttention"], "ignore": ["*.0.self_attn"],
            "threshold_scale_factor": {"formula": "a * exp(b * target_sparsity)", "prefill": {"a": 2.0, "b": 3.0}},
            "target_sparsity": {"prefill": 0.7}}},
        "producer": {"name": "modelopt", "version": "0.44.0"}}}
    recorded = recorded_sparsity(hf_config)
    assert recorded.config == {"sparse_cfg": {
        "default": {"enable": True, "threshold": {"prefill": 1e-3, "decode": 1e-4}}, "*.0.self_attn": {"enable": False}}}
    sites = attach_sites(model)
    recorded.apply(sites)
    assert not sites[SITE_NAMES[0]].enabled
    assert sites[SITE_NAMES[1]].law() == {"prefill": {"a": 2.0, "b": 3.0, "p": 1.0, "target": pytest.approx(0.7)}}
    assert "modelopt 0.44.0" in recorded.describe()


def test_no_record_and_bad_records():
    assert recorded_sparsity(LlamaConfig()) is None
    assert recorded_sparsity({}) is None
    bad_formula = {SPARSE_ATTENTION_KEY: {"config_groups": {"group_0": {
        "algorithm": "skip_softmax", "threshold_scale_factor": {"formula": "a + b"}}}}}
    with pytest.raises(ValueError, match="formula 'a \\+ b' is not supported"):
        recorded_sparsity(bad_formula)
    with pytest.raises(ValueError, match="no 'sites' record"):
        recorded_sparsity({FXSPARSE_KEY: {"version": "0.1.0"}})


@pytest.mark.parametrize("prefill, targets, message", [
    ({"a": 2.0}, {"prefill": 0.5}, "prefill needs numbers 'a' and 'b'"),
    ({"a": "two", "b": 3.0}, {"prefill": 0.5}, "must be numbers"),
    ({"a": 2.0, "b": 3.0}, {"prefill": "half"}, "target_sparsity.prefill must be numbers"),
])
def test_a_malformed_group_law_is_an_error_when_read(prefill, targets, message):
    group = {"algorithm": "skip_softmax", "threshold_scale_factor": {"formula": "a * exp(b * target_sparsity)",
                                                                    "prefill": prefill},
             "target_sparsity": targets}
    with pytest.raises(ValueError, match=message):
        recorded_sparsity({SPARSE_ATTENTION_KEY: {"config_groups": {"group_0": group}}})


def test_export_needs_sites_and_apply_needs_the_recorded_sites(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(ValueError, match="no fxsparse attention sites"):
        export_hf(model, tmp_path / "out")
    attach_sites(model)
    export_hf(model, tmp_path / "out")
    recorded = recorded_sparsity(AutoModelForCausalLM.from_pretrained(tmp_path / "out").config)
    with pytest.raises(ValueError, match="not in the model"):
        recorded.apply({})


def test_site_names_relative_to_another_root(tiny, tmp_path):
    """Sites named from a wrapper (``model.model.layers.0.self_attn``) still map to their modules."""
    model, _ = tiny
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.fxsparse_site = SparseSite(f"model.model.layers.{index}.self_attn", SiteConfig(enable=index == 1))
    export_hf(model, tmp_path / "out")
    group = json.loads((tmp_path / "out" / "config.json").read_text())[SPARSE_ATTENTION_KEY]["config_groups"]["group_0"]
    assert group["targets"] == ["LlamaAttention"]
    assert group["ignore"] == ["model.layers.0.self_attn"]


def test_sparsify_without_config_restores_the_recorded_laws(tiny, tmp_path):
    model, tokenizer = tiny
    sites = attach_sites(model, {name: SiteConfig(br=64, bc=64, backend="pytorch") for name in SITE_NAMES})
    for site in sites.values():
        site.set_law(LAW, {"prefill": 0.5, "decode": 0.4})
    export_hf(model, tmp_path / "out", tokenizer)

    reloaded = fxsparse.sparsify(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    assert _state(sites_of(reloaded)) == _state(sites)
    ids = torch.randint(0, 320, (1, 300))
    with torch.no_grad():
        reloaded(ids)
    assert all(s.sparsity()["prefill"] is not None for s in sites_of(reloaded).values())


def test_sparsify_without_config_restores_a_disabled_site(tiny, tmp_path):
    model, tokenizer = tiny
    fxsparse.sparsify(model)
    fxsparse.disable_sparsity(model, "*.1.*")
    export_hf(model, tmp_path / "out", tokenizer)
    recorded = recorded_sparsity(AutoModelForCausalLM.from_pretrained(tmp_path / "out").config)
    assert list(recorded.config["sparse_cfg"]) == ["default"]  # the enable flag is restored by apply()
    reloaded = fxsparse.sparsify(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    assert _state(sites_of(reloaded)) == _state(sites_of(model))
    assert not sites_of(reloaded)[SITE_NAMES[1]].enabled
