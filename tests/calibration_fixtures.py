"""Offline fixtures for the calibration tests: an essay folder and a small BPE tokenizer trained on it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fxsparse.calibration.tasks import ADJECTIVES, NOUNS

WORDS = ADJECTIVES + NOUNS + "the of and to in is that it was for on are with as his they be at one have this".split()


def essays_folder(tmp_root: Path) -> Path:
    """The fetched Paul Graham essays when present (``.ci/setup`` fetches them), else synthetic essays."""
    from fxsparse.assets import essays_dir

    try:
        return essays_dir()
    except FileNotFoundError:
        folder = tmp_root / "essays"
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        for index in range(12):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."
                         for _ in range(300)]
            (folder / f"essay{index:02d}.txt").write_text(" ".join(sentences))
        return folder


def train_tokenizer(folder: Path, vocab_size: int = 1000):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in-process on the essays (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator((p.read_text(errors="replace") for p in sorted(folder.glob("*.txt"))), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")


# -- pytest fixtures, imported by the calibration test modules --


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    return essays_folder(tmp_path_factory.mktemp("essays"))


@pytest.fixture(scope="module")
def tokenizer(essays):
    return train_tokenizer(essays)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Samples are cached under a per-test directory, never in the user's cache."""
    monkeypatch.setenv("FXSPARSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
