"""``fxsparse.transform`` of ``torch.export`` programs: exact at λ = 0 with a dynamic sequence
length, threshold buffers in the signature and state_dict, validate, save/load."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim
from torch.export.graph_signature import InputKind

import fxsparse
from models import ARCHITECTURES, ATTENTION_IMPLEMENTATIONS, left_padded, random_ids, tiny_model

DENSE = {"sparse_cfg": {"*": {"threshold": 0.0, "br": 16, "bc": 16, "backend": "pytorch"}}}  # Falcon: self_attention


def export(model, length: int = 20):
    ids, mask = left_padded(2, length, pad=3)
    seq = Dim("seq", min=2, max=128)
    return torch.export.export(
        model, (), {"input_ids": ids, "attention_mask": mask, "use_cache": False},
        dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}, "use_cache": None},
    )


def logits(program_or_model, ids, mask):
    module = program_or_model.module() if isinstance(program_or_model, torch.export.ExportedProgram) else program_or_model
    with torch.no_grad():
        return module(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("impl", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_transform_at_zero_threshold_equals_dense(arch, impl):
    model = tiny_model(arch, impl)
    sparse = fxsparse.transform(export(model), DENSE)
    sparse.validate()
    ids, mask = left_padded(2, 37, pad=4)  # another length than exported: the dim stays dynamic
    valid = mask.bool()
    assert (logits(sparse, ids, mask)[valid] - logits(model, ids, mask)[valid]).abs().max() < 1e-4
    buffers = [s.target for s in sparse.graph_signature.input_specs if s.kind == InputKind.BUFFER and "fxsparse" in s.target]
    assert len(buffers) == 3 * model.config.num_hidden_layers
    assert all(name in sparse.state_dict for name in buffers)


@pytest.mark.parametrize("impl", ATTENTION_IMPLEMENTATIONS)
def test_threshold_buffers_steer_and_survive_save_load(impl, tmp_path):
    model = tiny_model("llama", impl)
    sparse = fxsparse.transform(export(model), DENSE)
    ids, mask = left_padded(2, 48, pad=0)
    dense = logits(model, ids, mask)
    state = "model.layers.0.self_attn.fxsparse_site.threshold_state"
    sparse.state_dict[state][:, 1] = 1e3  # λ column, both phases: skip every tile it may
    skipped = logits(sparse, ids, mask)
    assert (skipped - dense).abs().max() > 1e-3

    path = tmp_path / "sparse.pt2"
    torch.export.save(sparse, path)
    loaded = torch.export.load(path)
    loaded.validate()
    torch.testing.assert_close(logits(loaded, ids, mask), skipped)
    assert loaded.state_dict[state][0, 1] == 1e3


@pytest.mark.parametrize("impl", ATTENTION_IMPLEMENTATIONS)
def test_transform_after_run_decompositions(impl):
    model = tiny_model("qwen2", impl)
    sparse = fxsparse.transform(export(model).run_decompositions(), DENSE)
    ids, mask = left_padded(2, 30, pad=0)
    torch.testing.assert_close(logits(sparse, ids, mask), logits(model, ids, mask), atol=1e-4, rtol=1e-4)


def test_transform_errors_are_one_clear_line():
    with pytest.raises(ValueError, match="needs a torch.export.ExportedProgram"):
        fxsparse.transform(tiny_model("llama", "sdpa"), DENSE)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Softmax(-1))
    with pytest.raises(ValueError, match="no attention found"):
        fxsparse.transform(torch.export.export(mlp, (torch.randn(2, 4),)), DENSE)
    config = {"sparse_cfg": {"*attn*": {"threshold": 0.0}, "*decoder*": {"enable": False}}}
    with pytest.raises(ValueError, match=r"'\*decoder\*' matches no attention site.*model.layers.0.self_attn"):
        fxsparse.transform(export(tiny_model("llama", "eager")), config)
    with pytest.raises(ValueError, match="fxsparse.transform does not calibrate") as error:
        fxsparse.transform(export(tiny_model("llama", "eager")), fxsparse.SKIP_SOFTMAX_CALIB)
    assert "\n" not in str(error.value)


def test_transformed_program_keeps_the_dynamic_length():
    """A program exported at one length serves others (batch stays static, as exported)."""
    model = tiny_model("gpt2", "sdpa")
    sparse = fxsparse.transform(export(model), DENSE)
    for length in (5, 64):
        ids = random_ids(2, length)
        mask = torch.ones_like(ids)
        torch.testing.assert_close(logits(sparse, ids, mask), logits(model, ids, mask), atol=1e-4, rtol=1e-4)
