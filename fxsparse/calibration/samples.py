"""Calibration samples: RULER-style tasks tokenized with the model's tokenizer, fitted to length bins.

Bins are powers of two down from ``max_seqlen`` to 1024 (8192 → 8192, 4096, 2048, 1024). Consecutive
samples cycle through the bins and, at the same time, through the tasks (``assignment``), so any run of
samples, such as the held-out ones at the end, spreads over both. Each sample is the largest haystack
whose prompt *and* answer tokens fit its bin::

    samples = build_samples(tokenizer, num_samples=16, max_seqlen=4096, seed=0)
    samples[0].input_ids, samples[0].answer, samples[0].bin

Sample ``i`` uses its own ``random.Random(f"{seed}/{i}")`` stream, so samples are reproducible one by one
and the global RNGs are never touched. Results are cached as JSON under ``<cache>/samples/``, keyed on
the tokenizer (class, vocabulary, special tokens, chat template), the parameters and the essays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..assets import cache_dir, essays_dir
from .tasks import TASKS, Corpus, RenderedTask

logger = logging.getLogger(__name__)

MIN_BIN = 1024
FORMAT_VERSION = 2  # 2: tasks cycle with the bins (1: tasks advanced once per round of bins)


@dataclass(frozen=True)
class Sample:
    """One prompt: ``input_ids`` (chat template applied when the tokenizer has one) and its answer."""

    task: str
    bin: int
    input_ids: tuple[int, ...]
    answer: str
    answer_ids: tuple[int, ...]
    answers: tuple[str, ...]  # the atoms (numbers, names, words) the answer must contain

    def __len__(self) -> int:
        return len(self.input_ids)


def length_bins(max_seqlen: int) -> list[int]:
    """Powers of two down from ``max_seqlen`` (itself first, even when not a power of two) to 1024."""
    if max_seqlen < MIN_BIN:
        raise ValueError(f"max_seqlen must be >= {MIN_BIN}, got {max_seqlen}")
    bins = [max_seqlen]
    size = 1 << (max_seqlen.bit_length() - 1)
    size = size // 2 if size == max_seqlen else size
    while size >= MIN_BIN:
        bins.append(size)
        size //= 2
    return bins


def assignment(num_samples: int, bins: Sequence[int], tasks: Sequence[str]) -> list[tuple[int, str]]:
    """(bin, task) of each sample: sample ``i`` takes bin ``i mod B`` and task ``(i + ⌊i / lcm(B, T)⌋) mod T``.

    Both cycle with ``i``, so every run of consecutive samples covers as many tasks as it can; this matters
    for the held-out samples, the last few, which must look like the fit's (tasks differ in sparsity by
    tens of points). The task shift after each lcm(B, T) samples pairs every task with every bin.
    """
    period = math.lcm(len(bins), len(tasks))
    return [(bins[i % len(bins)], tasks[(i + i // period) % len(tasks)]) for i in range(num_samples)]


# -- tokenization --


def _prompt_text(tokenizer, rendered: RenderedTask, chat: bool) -> str:
    body = f"{rendered.context}\n\n{rendered.question}"
    if chat:
        messages = [{"role": "user", "content": body}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt + rendered.answer_prefix
    return f"{body}\n{rendered.answer_prefix}"


def _encode(tokenizer, rendered: RenderedTask, chat: bool) -> tuple[list[int], list[int], str]:
    answer = " " + ", ".join(rendered.answers)
    prompt_ids = tokenizer(_prompt_text(tokenizer, rendered, chat), add_special_tokens=not chat)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(answer_ids), answer.strip()


def _fit(tokenizer, plan, bin_size: int, chat: bool, task: str) -> Sample:
    """Binary search for the largest haystack whose prompt + answer fit ``bin_size`` tokens."""
    def total(n: int):
        prompt, answer_ids, answer = _encode(tokenizer, plan.render(n), chat)
        return len(prompt) + len(answer_ids), (prompt, answer_ids, answer)

    low, high = 0, plan.max_units
    size, best = total(low)
    if size > bin_size:
        raise ValueError(f"task {task!r} does not fit {bin_size} tokens even without a haystack ({size} tokens)")
    # grow an upper bound geometrically, then bisect (render sizes grow monotonically with n)
    probe = 16
    while probe < high:
        size, encoded = total(probe)
        if size > bin_size:
            high = probe
            break
        low, best, probe = probe, encoded, probe * 2
    while high - low > 1:
        middle = (low + high) // 2
        size, encoded = total(middle)
        if size <= bin_size:
            low, best = middle, encoded
        else:
            high = middle
    prompt, answer_ids, answer = best
    return Sample(task, bin_size, tuple(prompt), answer, tuple(answer_ids), plan.render(low).answers)


# -- caching --


def _tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    parts = [type(tokenizer).__name__, json.dumps(vocab), str(getattr(tokenizer, "all_special_tokens", "")),
             str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _essays_key(directory: Path) -> str:
    files = sorted((p.name, p.stat().st_size) for p in directory.glob("*.txt"))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def _cache_path(params: dict) -> Path:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "samples" / f"{key}.json"


def build_samples(
    tokenizer,
    num_samples: int,
    max_seqlen: int,
    seed: int = 1234,
    data_dir: str | Path | None = None,
    tasks: Sequence[str] | None = None,
    chat: bool | None = None,
    cache: bool = True,
) -> list[Sample]:
    """``num_samples`` RULER-style samples spread over the length bins of ``max_seqlen`` and the tasks.

    Args:
        tokenizer: a HuggingFace tokenizer (fast or slow).
        seed: sample ``i`` draws from ``random.Random(f"{seed}/{i}")``.
        data_dir: the Paul Graham essays (default: the asset cache; missing → error naming the fetch command).
        tasks: task names from ``fxsparse.calibration.tasks.TASKS`` (default: all).
        chat: wrap prompts in the chat template (default: when the tokenizer has one).
        cache: read and write the JSON cache.
    """
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks are {list(TASKS)}")
    directory = essays_dir(data_dir)
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    bins = length_bins(max_seqlen)
    params = {"version": FORMAT_VERSION, "tokenizer": _tokenizer_key(tokenizer), "essays": _essays_key(directory),
              "num_samples": num_samples, "max_seqlen": max_seqlen, "seed": seed, "tasks": tasks, "chat": chat}
    path = _cache_path(params)
    if cache and path.is_file():
        logger.info("calibration samples from cache %s", path)
        return [_sample_from_dict(d) for d in json.loads(path.read_text())["samples"]]

    corpus = Corpus(directory)
    samples = []
    for i, (bin_size, task) in enumerate(assignment(num_samples, bins, tasks)):
        plan = TASKS[task](random.Random(f"{seed}/{i}"), corpus)
        samples.append(_fit(tokenizer, plan, bin_size, chat, task))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"params": params, "samples": [asdict(s) for s in samples]}))
        tmp.replace(path)
    return samples


def _sample_from_dict(d: dict) -> Sample:
    return Sample(d["task"], d["bin"], tuple(d["input_ids"]), d["answer"], tuple(d["answer_ids"]), tuple(d["answers"]))
