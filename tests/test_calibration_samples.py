"""Calibration samples: bins, spread over tasks, answers present, lengths, reproducibility, cache."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from calibration_fixtures import essays, private_cache, tokenizer, train_tokenizer  # noqa: F401 (fixtures)
from fxsparse.calibration.samples import assignment, build_samples, length_bins
from fxsparse.calibration.tasks import TASKS


def test_length_bins():
    assert length_bins(8192) == [8192, 4096, 2048, 1024]
    assert length_bins(1024) == [1024]
    assert length_bins(3000) == [3000, 2048, 1024]
    with pytest.raises(ValueError, match="1024"):
        length_bins(512)


def test_samples_spread_over_bins_and_tasks():
    bins, tasks = length_bins(8192), list(TASKS)
    plan = assignment(64, bins, tasks)
    assert Counter(b for b, _ in plan) == {b: 16 for b in bins}
    for size in bins:  # every bin sees every task
        assert {t for b, t in plan if b == size} == set(tasks)
    assert set(assignment(len(bins) * len(tasks), bins, tasks)) == {(b, t) for b in bins for t in tasks}
    assert assignment(3, bins, tasks) == [(8192, tasks[0]), (4096, tasks[1]), (2048, tasks[2])]
    heldout = plan[-8:]  # the held-out samples: the last ones, as many tasks as samples
    assert len({t for _, t in heldout}) == 8 and Counter(b for b, _ in heldout) == {b: 2 for b in bins}


def test_each_task_fits_its_bin_and_contains_its_answer(tokenizer, essays):
    samples = build_samples(tokenizer, 2 * len(TASKS), 2048, seed=7, data_dir=essays, cache=False)
    assert len(samples) == 2 * len(TASKS)
    assert Counter(s.task for s in samples) == {t: 2 for t in TASKS}
    assert Counter(s.bin for s in samples) == {2048: len(TASKS), 1024: len(TASKS)}
    for sample in samples:
        total = len(sample.input_ids) + len(sample.answer_ids)
        assert total <= sample.bin, sample.task
        assert total > 0.85 * sample.bin, f"{sample.task}: {total} tokens barely fill the {sample.bin} bin"
        prompt = tokenizer.decode(list(sample.input_ids))
        assert sample.answers and all(a in prompt for a in sample.answers), sample.task
        assert tokenizer.decode(list(sample.answer_ids)).strip() == sample.answer
        assert all(a in sample.answer for a in sample.answers)


def test_same_seed_same_ids_and_global_rng_untouched(tokenizer, essays):
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first = build_samples(tokenizer, 6, 2048, seed=3, data_dir=essays, cache=False)
    second = build_samples(tokenizer, 6, 2048, seed=3, data_dir=essays, cache=False)
    assert [s.input_ids for s in first] == [s.input_ids for s in second]
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    other = build_samples(tokenizer, 6, 2048, seed=4, data_dir=essays, cache=False)
    assert [s.input_ids for s in other] != [s.input_ids for s in first]


def test_cache_round_trip(tokenizer, essays, tmp_path):
    built = build_samples(tokenizer, 4, 1024, seed=1, data_dir=essays)
    files = list((tmp_path / "cache" / "samples").glob("*.json"))
    assert len(files) == 1
    assert build_samples(tokenizer, 4, 1024, seed=1, data_dir=essays) == built
    build_samples(tokenizer, 4, 1024, seed=2, data_dir=essays)  # other parameters, other file
    assert len(list((tmp_path / "cache" / "samples").glob("*.json"))) == 2


def test_chat_template_is_used(tokenizer, essays):
    chatty = train_tokenizer(essays)
    chatty.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"
    sample = build_samples(chatty, 1, 1024, seed=0, data_dir=essays, cache=False)[0]
    text = chatty.decode(list(sample.input_ids))
    assert text.startswith("<|user|>") and "<|assistant|>" in text
    plain = build_samples(tokenizer, 1, 1024, seed=0, data_dir=essays, cache=False)[0]
    assert "<|user|>" not in tokenizer.decode(list(plain.input_ids))


def test_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no Paul Graham essays"):
        build_samples(tokenizer, 1, 1024, data_dir=tmp_path / "nowhere", cache=False)
    with pytest.raises(ValueError, match="unknown task"):
        build_samples(tokenizer, 1, 1024, tasks=["sudoku"], cache=False)
