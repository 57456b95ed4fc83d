"""``--verify_output``: one long-document question, answered greedily with sparsity off, then on.

The prompt is a NarrativeQA story and question when ``datasets`` is installed and the hub answers
within a few seconds; otherwise a document built locally from the Paul Graham essays with one planted
sentence (the "needle") that holds the answer::

    <chat template> Read the document ... Question: Q  Document: essay essay [needle] essay ...  Question: Q <answer>
                    └──────────── kept head ──────────────┘      ...cut...      └──────── kept tail ────────┘

Prompts longer than ``seq_len`` tokens lose their middle (head and tail, with the question, stay).
"Dense" is the original model's answer, generated before ``sparsify`` (the command line does this); without
it, the rewritten model with every site disabled (λ = 0), so the two differ only by the skipped tiles.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .sites import PHASE_ROWS, sites_of

NEEDLE_ANSWER = "48613"
NEEDLE = f" The special magic number for the blue lighthouse is {NEEDLE_ANSWER}. "
NEEDLE_QUESTION = "What is the special magic number for the blue lighthouse mentioned in the document?"
NARRATIVEQA = "deepmind/narrativeqa"
WARMUP_TOKENS, WARMUP_NEW_TOKENS = 16, 4  # untimed run before each timed one: prefill and decode graphs


@dataclass
class Prompt:
    """A tokenized question prompt (ids of shape (1, L)) and where it came from."""

    input_ids: torch.Tensor
    source: str
    question: str
    expected: list[str] = field(default_factory=list)
    original_length: int = 0

    @property
    def length(self) -> int:
        return self.input_ids.shape[-1]


@dataclass
class Generation:
    text: str
    seconds: float
    new_tokens: int


@dataclass
class VerifyResult:
    prompt: Prompt
    dense: Generation
    sparse: Generation
    sparsity: dict[str, float | None]
    dense_label: str = "dense"

    def format(self) -> str:
        """A readable report: source, input length, both answers, time and sparsity per phase."""
        p = self.prompt
        cut = f" (truncated from the middle: {p.original_length} → {p.length})" if p.original_length > p.length else ""
        lines = [
            f"prompt: {p.source}",
            f"question: {p.question}",
            f"input length: {p.length} tokens{cut}",
        ]
        if p.expected:
            lines.append(f"expected answer: {' | '.join(p.expected)}")
        lines.append(f"dense = {self.dense_label}")
        for label, run in (("dense ", self.dense), ("sparse", self.sparse)):
            rate = run.new_tokens / run.seconds if run.seconds > 0 else float("nan")
            found = ""
            if p.expected:
                found = "  [contains the answer]" if _contains(run.text, p.expected) else "  [answer not found]"
            lines.append(f"{label} answer ({run.seconds:.2f} s, {run.new_tokens} tokens, {rate:.1f} tok/s): "
                         f"{run.text.strip()!r}{found}")
        lines.append("sparse run measured sparsity: " + ", ".join(
            f"{phase} {'n/a' if value is None else f'{value:.1%}'}" for phase, value in self.sparsity.items()
        ))
        lines.append("answers identical" if self.dense.text == self.sparse.text else "answers differ")
        return "\n".join(lines)


def _contains(text: str, expected: list[str]) -> bool:
    return any(e.strip().lower() in text.lower() for e in expected if e.strip())


# -- the prompt --


def truncate_middle(ids: list[int], length: int) -> list[int]:
    """Keep the first ``length // 2`` and the last ``length - length // 2`` ids."""
    if len(ids) <= length:
        return list(ids)
    head = length // 2
    return list(ids[:head]) + list(ids[len(ids) - (length - head):])


def _render(tokenizer, document: str, question: str) -> str:
    body = (f"Read the document below and answer the question at the end.\nQuestion: {question}\n\n"
            f"Document:\n{document}\n\nEnd of document.\nQuestion: {question}\nAnswer briefly.")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                             tokenize=False)
    return body + "\nAnswer:"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def _finish(tokenizer, document: str, question: str, seq_len: int, source: str, expected: list[str]) -> Prompt:
    ids = _encode(tokenizer, _render(tokenizer, document, question))
    kept = truncate_middle(ids, seq_len)
    return Prompt(torch.tensor([kept]), source, question, expected, original_length=len(ids))


def needle_prompt(tokenizer, seq_len: int, essays_dir: str | os.PathLike, depth: float = 0.4) -> Prompt:
    """Essays filling ``seq_len`` tokens with the needle sentence at ``depth`` of the document."""
    overhead = len(_encode(tokenizer, _render(tokenizer, NEEDLE, NEEDLE_QUESTION)))
    budget = seq_len - overhead - 4  # a few tokens of slack for merges at the joins
    if budget < 16:
        raise ValueError(f"--seq_len {seq_len} is too short for the question prompt; use at least {overhead + 20}")
    files = sorted(Path(essays_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays (*.txt) in {essays_dir}")
    haystack: list[int] = []
    while len(haystack) < budget:  # cycle through the essays until the budget is filled
        for path in files:
            haystack += tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
            if len(haystack) >= budget:
                break
    text = tokenizer.decode(haystack[:budget])
    cut = text.find(". ", int(len(text) * depth))
    cut = int(len(text) * depth) if cut < 0 else cut + 1
    document = text[:cut] + NEEDLE + text[cut:]
    source = (f"locally built long document: Paul Graham essays from {essays_dir} with a planted "
              f"needle sentence at {depth:.0%} depth")
    return _finish(tokenizer, document, NEEDLE_QUESTION, seq_len, source, [NEEDLE_ANSWER])


def narrativeqa_prompt(tokenizer, seq_len: int, timeout: float = 3.0) -> tuple[Prompt | None, str]:
    """The first NarrativeQA test question, or ``(None, why not)``; never waits long on the network."""
    try:
        import datasets
    except ImportError:
        return None, "the `datasets` package is not installed"
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return None, "HF offline mode is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError as error:
        return None, f"huggingface.co is unreachable ({error})"
    try:
        item = next(iter(datasets.load_dataset(NARRATIVEQA, split="test", streaming=True)))
    except Exception as error:  # any failure of an optional remote source: say why and fall back
        return None, f"loading {NARRATIVEQA} failed ({type(error).__name__}: {error})"
    answers = [a["text"] for a in item["answers"]]
    source = f"NarrativeQA ({NARRATIVEQA}, test split, first story) via `datasets`"
    return _finish(tokenizer, item["document"]["text"], item["question"]["text"], seq_len, source, answers), ""


def build_prompt(tokenizer, seq_len: int, essays_dir: str | os.PathLike | None = None) -> Prompt:
    """NarrativeQA when reachable, else the local needle document (``source`` says which and why)."""
    prompt, why_not = narrativeqa_prompt(tokenizer, seq_len)
    if prompt is not None:
        return prompt
    from .assets import essays_dir as default_essays_dir

    prompt = needle_prompt(tokenizer, seq_len, default_essays_dir(essays_dir))
    prompt.source += f" (NarrativeQA not used: {why_not})"
    return prompt


# -- dense vs sparse --


def phase_sparsity(model: nn.Module) -> dict[str, float | None]:
    """Skipped / valid tiles per phase, summed over all sites since their last reset."""
    totals = {phase: [0, 0] for phase in PHASE_ROWS}
    for site in sites_of(model).values():
        stats = site.stats.detach().cpu()
        for phase, row in PHASE_ROWS.items():
            totals[phase][0] += int(stats[row, 0])
            totals[phase][1] += int(stats[row, 1])
    return {phase: (skipped / valid if valid else None) for phase, (valid, skipped) in totals.items()}


class _TokenBar:
    """A ``generate`` streamer that advances a tqdm bar per new token (the first ``put`` is the prompt)."""

    def __init__(self, desc: str, total: int):
        self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.bar.update(value.numel())
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def generate(model: nn.Module, tokenizer, prompt: Prompt, max_new_tokens: int, progress: str | None = None,
             warmup: bool = True) -> Generation:
    """Greedy generation of at most ``max_new_tokens``; the answer text and wall time.

    Args:
        progress: a label for a tqdm bar over the new tokens (None: no bar).
        warmup: first run a 16-token prompt for a few tokens, untimed, so one-time costs (first
            calls, graph captures of prefill and decode) stay out of the time.
    """
    device = next(model.parameters()).device
    input_ids = prompt.input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"do_sample": False, "pad_token_id": pad}
    with torch.no_grad():
        if warmup:
            short = input_ids[:, :WARMUP_TOKENS]
            model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=WARMUP_NEW_TOKENS, **kwargs)
        streamer = _TokenBar(progress, max_new_tokens) if progress else None
        start = time.perf_counter()
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                streamer=streamer, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    new = output[0, input_ids.shape[-1]:]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), seconds, int(new.numel()))


def verify(model: nn.Module, tokenizer, prompt: Prompt, max_new_tokens: int, progress: bool = False,
           dense: Generation | None = None) -> VerifyResult:
    """Answer ``prompt`` dense, then sparse (as the sites are configured), and measure sparsity.

    Args:
        dense: the answer of the unmodified model, generated before ``sparsify`` (the real dense
            baseline); None: generate it here with every site disabled (λ = 0).
        progress: show a tqdm bar over the generated tokens of each run.
    """
    sites = sites_of(model)
    if not sites:
        raise ValueError("the model has no fxsparse attention sites to verify; sparsify it first")
    label = "the original model, before sparsify"
    if dense is None:
        label = "the rewritten model with every site disabled (λ = 0)"
        with contextlib.ExitStack() as every_site:
            for site in sites.values():
                every_site.enter_context(site.dense())
            dense = generate(model, tokenizer, prompt, max_new_tokens, "dense" if progress else None)
    # the sparse run's warm-up would add to the stats: warm up first, then reset and time
    warmup = Prompt(prompt.input_ids[:, :WARMUP_TOKENS], prompt.source, prompt.question)
    generate(model, tokenizer, warmup, WARMUP_NEW_TOKENS, warmup=False)
    for site in sites.values():
        site.reset_stats()
    sparse = generate(model, tokenizer, prompt, max_new_tokens, "sparse" if progress else None, warmup=False)
    return VerifyResult(prompt, dense, sparse, phase_sparsity(model), label)
