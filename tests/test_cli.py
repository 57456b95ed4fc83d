"""The ``fxsparse`` command on a tiny random Llama saved in a temp dir: every flag, export/reload, errors.

``main([...])`` runs in-process; one subprocess checks ``python -m fxsparse --help``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, MambaConfig, MambaForCausalLM

import fxsparse
from fxsparse.cli import main, parse_target
from fxsparse.hf_checkpoint import SPARSE_ATTENTION_KEY, recorded_sparsity
from fxsparse.sites import sites_of
from test_hf_checkpoint import save_tiny_llama, tiny_tokenizer

ESSAY = ("Startups are a way to compress a whole working life into a few years. Instead of working at a low "
         "intensity for forty years, you work as hard as you possibly can for four. ")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(directory)
    return directory


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    directory = tmp_path_factory.mktemp("essays")
    for index in range(3):
        (directory / f"essay{index}.txt").write_text(f"Essay {index}. " + ESSAY * 30)
    return directory


@pytest.fixture(scope="module")
def neox_checkpoint(tmp_path_factory):
    """A 2-layer random GPT-NeoX: its attention modules are ``gpt_neox.layers.N.attention``, which ``*attn*`` misses."""
    directory = tmp_path_factory.mktemp("tiny-neox")
    config = GPTNeoXConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=4096, bos_token_id=0, eos_token_id=0)
    GPTNeoXForCausalLM(config).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def save_tiny_gguf(path) -> None:
    """A 2-layer random Llama as a float32 GGUF, with the tiny BPE tokenizer and chat template inside."""
    tokenizer = tiny_tokenizer()
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [""] * len(tokenizer)
    for token, index in {**state["model"]["vocab"], **{t["content"]: t["id"] for t in state["added_tokens"]}}.items():
        tokens[index] = token
    hidden, ffn, vocab = 64, 128, len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(2)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * vocab)
    writer.add_token_merges([" ".join(m) for m in state["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_chat_template(tokenizer.chat_template)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (vocab, hidden), "output": (vocab, hidden), "output_norm": (hidden,)}
    for i in range(2):
        shapes.update({f"blk.{i}.attn_q": (hidden, hidden), f"blk.{i}.attn_k": (hidden // 2, hidden),
                       f"blk.{i}.attn_v": (hidden // 2, hidden), f"blk.{i}.attn_output": (hidden, hidden),
                       f"blk.{i}.ffn_gate": (ffn, hidden), f"blk.{i}.ffn_up": (ffn, hidden),
                       f"blk.{i}.ffn_down": (hidden, ffn), f"blk.{i}.attn_norm": (hidden,), f"blk.{i}.ffn_norm": (hidden,)})
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.02, shape)
        writer.add_tensor(f"{name}.weight", values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what setup wrote
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the happy paths --


def test_help_subprocess():
    result = subprocess.run([sys.executable, "-m", "fxsparse", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--pyt_ckpt_path", "--sparse_attn", "--backend", "--seq_len", "--verify_output", "--export_dir",
                 "--target_sparse_ratio", "--calib_samples", "--calib_max_seqlen", "--calib_data_dir",
                 "--max_new_tokens", "--device", "--debug", "--attn_pattern"):
        assert flag in result.stdout


def test_fixed_thresholds_verify_and_export(capsys, checkpoint, essays, tmp_path):
    code, out, err = run_cli(
        capsys, "--pyt_ckpt_path", checkpoint, "--sparse_attn", "skip_softmax", "--backend", "pytorch",
        "--device", "cpu", "--verify_output", "--seq_len", 320, "--max_new_tokens", 2,
        "--calib_data_dir", essays, "--export_dir", tmp_path / "out",
    )
    assert code == 0, err
    assert "found 2 attention sites (2 enabled)" in out
    assert "skip_softmax with fixed thresholds" in out
    assert "locally built long document" in out and "NarrativeQA not used" in out
    assert "input length: " in out and "dense  answer" in out and "sparse answer" in out
    assert "measured sparsity: prefill" in out
    assert "exported to" in out
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved[SPARSE_ATTENTION_KEY]["config_groups"]["group_0"]["targets"] == ["LlamaAttention"]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(checkpoint)
    ids = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=0, atol=0)
    fxsparse.sparsify(reloaded)  # no config: the recorded sparsity
    assert {n: s.thresholds() for n, s in sites_of(reloaded).items()} == {
        n: pytest.approx({"prefill": 1e-3, "decode": 1e-4}) for n in sites_of(reloaded)
    }


def test_calibrate_export_then_reload_through_the_cli(capsys, checkpoint, essays, tmp_path):
    code, out, err = run_cli(
        capsys, "--pyt_ckpt_path", checkpoint, "--sparse_attn", "skip_softmax_calib", "--target_sparse_ratio", "0.6,0.4",
        "--calib_samples", 2, "--calib_max_seqlen", 1024, "--calib_data_dir", essays, "--device", "cpu",
        "--export_dir", tmp_path / "calibrated",
    )
    assert code == 0, err
    assert "calibrating: 2 samples up to 1024 tokens" in out and "CPU defaults" not in out
    assert "calibration:" in out  # the CalibrationResult table
    recorded = recorded_sparsity(json.loads((tmp_path / "calibrated" / "config.json").read_text()))
    assert {record["backend"] for record in recorded.sites.values()} == {"auto"}  # no --backend: reloads on any device
    laws = recorded.laws()
    assert laws and all(law.get("prefill", {"target": 0.6})["target"] == pytest.approx(0.6) for law in laws.values())

    # No --sparse_attn: the CLI picks up the recorded laws; --target_sparse_ratio moves the target.
    code, out, err = run_cli(capsys, "--pyt_ckpt_path", tmp_path / "calibrated", "--target_sparse_ratio", "0.3",
                             "--export_dir", tmp_path / "again")
    assert code == 0, err
    assert "found in the checkpoint:" in out and "the sparsity recorded in the checkpoint" in out
    again = recorded_sparsity(json.loads((tmp_path / "again" / "config.json").read_text()))
    for name, law in again.laws().items():
        for phase, values in law.items():
            assert values["a"] == pytest.approx(laws[name][phase]["a"])
            assert values["target"] == pytest.approx(0.3)


def test_attn_pattern_sparsifies_attention_the_preset_misses(capsys, neox_checkpoint, tmp_path):
    code, _, err = run_cli(capsys, "--pyt_ckpt_path", neox_checkpoint)
    assert_one_line_error(code, err, "'*attn*' matches no attention site", "gpt_neox.layers.0.attention",
                          "pass --attn_pattern")

    code, out, err = run_cli(capsys, "--pyt_ckpt_path", neox_checkpoint, "--attn_pattern", "*attention*",
                             "--export_dir", tmp_path / "out")
    assert code == 0, err
    assert "found 2 attention sites (2 enabled)" in out and "on the sites matching '*attention*'" in out
    recorded = recorded_sparsity(json.loads((tmp_path / "out" / "config.json").read_text()))
    assert {name: record["enable"] for name, record in recorded.sites.items()} == {
        "gpt_neox.layers.0.attention": True, "gpt_neox.layers.1.attention": True}

    # a recorded checkpoint names its sites: the pattern needs a preset to replace them
    code, _, err = run_cli(capsys, "--pyt_ckpt_path", tmp_path / "out", "--attn_pattern", "*attention*")
    assert_one_line_error(code, err, "--attn_pattern", "add --sparse_attn")
    # the preset's settings move to the new pattern; "default" still leaves the other sites dense
    code, out, err = run_cli(capsys, "--pyt_ckpt_path", tmp_path / "out", "--sparse_attn", "skip_softmax",
                             "--attn_pattern", "*layers.1.attention")
    assert code == 0, err
    assert "found 2 attention sites (1 enabled)" in out and "λ=0.001" in out


# -- errors: one line on stderr, exit code 2, no traceback --


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line and "%|" not in line]  # progress bars are not errors
    assert len(lines) == 1, err
    assert lines[0].startswith("fxsparse: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("argv, fragments", [
    (["--sparse_attn", "dense"], ["--sparse_attn", "invalid choice"]),
    (["--backend", "cuda"], ["--backend"]),
    (["--seq_len", "0"], ["--seq_len must be >= 64"]),
    (["--seq_len", "many"], ["--seq_len", "invalid int"]),
    (["--max_new_tokens", "0"], ["--max_new_tokens must be >= 1"]),
    (["--target_sparse_ratio", "1.5", "--sparse_attn", "skip_softmax_calib"], ["[0, 0.99]"]),
    (["--target_sparse_ratio", "x"], ["--target_sparse_ratio must be a number"]),
    (["--sparse_attn", "skip_softmax_calib", "--calib_samples", "0"], ["--calib_samples must be >= 1"]),
    (["--sparse_attn", "skip_softmax_calib", "--calib_max_seqlen", "512"], ["--calib_max_seqlen must be >= 1024"]),
    (["--calib_samples", "4"], ["--calib_samples needs --sparse_attn skip_softmax_calib"]),
    (["--sparse_attn", "skip_softmax", "--target_sparse_ratio", "0.5"], ["--target_sparse_ratio needs a calibrated law"]),
    (["--device", "gpu0"], ["--device 'gpu0' is not a torch device"]),
    (["--attn_pattern", " "], ["--attn_pattern must be an fnmatch pattern", "got ' '"]),
    (["--attn_pattern", "default"], ["--attn_pattern must be an fnmatch pattern", "got 'default'"]),
    (["--unknown_flag"], ["unrecognized arguments"]),
])
def test_bad_values(capsys, argv, fragments):
    assert_one_line_error(*run_cli(capsys, *argv)[::2], *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_triton_and_cuda_without_gpu(capsys):
    assert_one_line_error(*run_cli(capsys, "--backend", "triton")[::2], "--backend triton needs a CUDA GPU")
    assert_one_line_error(*run_cli(capsys, "--device", "cuda")[::2], "no CUDA GPU is available")


def test_missing_paths(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "--pyt_ckpt_path", tmp_path / "nope")[::2], "no such file or directory")
    assert_one_line_error(*run_cli(capsys, "--pyt_ckpt_path", tmp_path / "m.gguf")[::2], "no such .gguf file")
    assert_one_line_error(*run_cli(capsys, "--pyt_ckpt_path", tmp_path)[::2], "no config.json")
    assert_one_line_error(*run_cli(capsys, "--calib_data_dir", tmp_path / "none")[::2], "no such directory")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(*run_cli(capsys, "--export_dir", tmp_path / "file")[::2], "is a file")


def test_target_needs_a_law(capsys, checkpoint):
    code, _, err = run_cli(capsys, "--pyt_ckpt_path", checkpoint, "--target_sparse_ratio", "0.5")
    assert_one_line_error(code, err, "--target_sparse_ratio needs --sparse_attn skip_softmax_calib")


def test_hub_name_without_network(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without network looks like, without waiting
    code, _, err = run_cli(capsys, "--pyt_ckpt_path", "fxsparse-test/no-such-model")
    assert_one_line_error(code, err, "hub is unreachable")


def test_model_without_attention(capsys, tmp_path):
    config = MambaConfig(vocab_size=320, hidden_size=32, state_size=4, num_hidden_layers=1, expand=2)
    MambaForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert_one_line_error(*run_cli(capsys, "--pyt_ckpt_path", tmp_path)[::2], "attention")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception):
        main(["--pyt_ckpt_path", str(tmp_path / "nope"), "--debug"])


def test_parse_target():
    assert parse_target("0.5") == {"prefill": 0.5, "decode": 0.5}
    assert parse_target("0.6, 0.4") == {"prefill": 0.6, "decode": 0.4}
    assert parse_target(None) is None


def test_truncate_middle_and_needle_prompt(essays):
    from fxsparse.verify import NEEDLE_ANSWER, needle_prompt, truncate_middle

    assert truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert truncate_middle(list(range(3)), 4) == [0, 1, 2]
    tokenizer = tiny_tokenizer()
    prompt = needle_prompt(tokenizer, 400, essays)
    assert prompt.length <= 400 and prompt.expected == [NEEDLE_ANSWER]
    text = tokenizer.decode(prompt.input_ids[0])
    assert NEEDLE_ANSWER in text and text.count(prompt.question) == 2  # question before and after the document
    assert text.endswith("<|im_start|>assistant\n")  # chat template applied


def test_gguf_file_exports_as_a_plain_checkpoint(capsys, tmp_path):
    save_tiny_gguf(tmp_path / "tiny.gguf")
    code, out, err = run_cli(capsys, "--pyt_ckpt_path", tmp_path / "tiny.gguf", "--export_dir", tmp_path / "out")
    assert code == 0, err
    assert "LlamaForCausalLM" in out and "found 2 attention sites (2 enabled)" in out
    original = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert getattr(reloaded.config, "quantization_config", None) is None
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert recorded_sparsity(reloaded.config) is not None
