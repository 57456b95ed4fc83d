"""RULER-style synthetic tasks as text: each task plans its random choices once, then renders any size.

A task is a function ``(rng, corpus) -> Plan``. All randomness is drawn while planning, from the
local ``random.Random`` it is given; ``Plan.render(n)`` is deterministic and grows with ``n`` (the
haystack size in task units: essay sentences, noise lines or list words), so the sample builder can
search for the largest ``n`` that fits a length bin::

    plan = TASKS["niah_single_essay"](random.Random(0), corpus)
    text = plan.render(40)          # RenderedTask(context, question, answer_prefix, answers)

Tasks follow RULER (Hsieh et al., 2024): needle-in-a-haystack (single / multi-key / multi-value /
multi-query over essays or repeated noise), variable tracking, common- and frequent-word extraction,
plus QA over titled documents (RULER uses SQuAD/HotpotQA; here the documents are essay excerpts and
the fact is synthetic, since no QA set is reachable offline).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ADJECTIVES = ("ancient amber brave calm clever crimson distant eager fancy gentle golden hollow humble "
              "jolly lively lucky mellow misty noble odd quiet rapid silent silver steady swift tender "
              "vivid wild").split()
NOUNS = ("anchor badger cactus canyon comet dolphin falcon forest garden glacier harbor island lantern "
         "meadow mirror orchid otter pebble piano rocket saddle tiger tunnel violin walrus willow").split()
CITIES = ("Lisbon Oslo Nairobi Lima Hanoi Quito Tbilisi Accra Riga Perth Bergen Cusco Porto Dakar "
          "Tallinn Kyoto").split()
PEOPLE = ("Ada Bruno Clara Dmitri Elena Farid Greta Hugo Ines Jonas Kira Luca Mira Nils Omar Petra").split()


@dataclass(frozen=True)
class RenderedTask:
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]  # each must appear in the context; joined they form the reference answer


@dataclass(frozen=True)
class Plan:
    render: Callable[[int], RenderedTask]
    max_units: int


class Corpus:
    """The essays as sentences and as a vocabulary of plain words (for word-list tasks)."""

    def __init__(self, directory: Path):
        text = " ".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(directory).glob("*.txt")))
        text = re.sub(r"\s+", " ", text)
        self.sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
        self.words = sorted({w for w in re.findall(r"\b[a-z]{4,9}\b", text)})
        self.titles = sorted(p.stem for p in Path(directory).glob("*.txt"))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _insert(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """Insert ``items`` between ``units`` at the given depth fractions (0 = start, 1 = end)."""
    out = list(units)
    for item, depth in sorted(zip(items, depths), key=lambda pair: -pair[1]):
        out.insert(round(depth * len(units)), item)
    return out


def _haystack(corpus: Corpus, rng: random.Random, essay: bool) -> tuple[list[str], int]:
    """Units and their count: a rotated run of essay sentences, or the noise line repeated."""
    if not essay:
        return [NOISE], 1_000_000
    start = rng.randrange(len(corpus.sentences))
    return corpus.sentences[start:] + corpus.sentences[:start], len(corpus.sentences)


def _units(units: list[str], n: int) -> list[str]:
    return units[:n] if len(units) > 1 else units * n


def _niah(num_keys: int, num_values: int, num_queries: int, essay: bool):
    """Needles "One of the special magic numbers for <key> is: <7 digits>."; ask for some keys."""

    def plan(rng: random.Random, corpus: Corpus) -> Plan:
        units, max_units = _haystack(corpus, rng, essay)
        taken: set[str] = set()
        keys = [_key(rng, taken) for _ in range(num_keys)]
        values = {key: [_number(rng) for _ in range(num_values if i == 0 else 1)] for i, key in enumerate(keys)}
        needles = [f"One of the special magic numbers for {key} is: {value}." for key in keys for value in values[key]]
        depths = [rng.random() for _ in needles]
        queried = keys[:num_queries]
        answers = tuple(v for key in queried for v in values[key])
        which = ", ".join(queried)
        question = (f"What are all the special magic numbers for {which} mentioned in the provided text?"
                    if len(answers) > 1 else f"What is the special magic number for {which} mentioned in the provided text?")
        prefix = f"The special magic number{'s' if len(answers) > 1 else ''} for {which} mentioned in the provided text"
        prefix += " are" if len(answers) > 1 else " is"

        def render(n: int) -> RenderedTask:
            context = " ".join(_insert(_units(units, n), needles, depths))
            return RenderedTask(context, question, prefix, answers)

        return Plan(render, max_units)

    return plan


def _variable_tracking(rng: random.Random, corpus: Corpus, hops: int = 4) -> Plan:
    taken: set[str] = set()
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            names.append(name)
    value = _number(rng)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in chain)
    question = f"Find all variables that are assigned the value {value} in the text above."
    prefix = f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are assigned the value {value}, they are:"

    def render(n: int) -> RenderedTask:
        return RenderedTask(" ".join(_insert([NOISE] * n, chain, depths)), question, prefix, tuple(names))

    return Plan(render, 1_000_000)


def _common_words(rng: random.Random, corpus: Corpus, num_common: int = 10) -> Plan:
    """A numbered word list where ``num_common`` words repeat often; the rest appear once."""
    words = rng.sample(corpus.words, k=min(len(corpus.words), 4000))
    common, rare = words[:num_common], words[num_common:]
    order_seed = rng.random()
    question = f"What are the {num_common} most common words in the above list?"
    prefix = f"Answer: The top {num_common} words that appear most often in the list are:"

    def render(n: int) -> RenderedTask:
        repeats = max(3, n // 25)
        items = common * repeats + rare[:n]
        random.Random(order_seed).shuffle(items)
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return RenderedTask(context, question, prefix, tuple(common))

    return Plan(render, len(rare))


def _frequent_words(rng: random.Random, corpus: Corpus, alpha: float = 2.0) -> Plan:
    """Coded words drawn from a Zipf law; ask for the three most frequent."""
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6))) for _ in range(500)]
    vocab = list(dict.fromkeys(vocab))
    weights = [1.0 / (rank + 1) ** alpha for rank in range(len(vocab))]
    stream = rng.choices(vocab, weights=weights, k=20_000)
    question = "What are the three most frequently appeared coded words in the above coded text?"
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"

    def render(n: int) -> RenderedTask:
        words = stream[: max(n, 10)]
        counts = Counter(words).most_common()
        top = tuple(w for w, _ in counts[:3])
        return RenderedTask(" ".join(words) + " ....", question, prefix, top)

    return Plan(render, len(stream))


def _qa(rng: random.Random, corpus: Corpus, per_doc: int = 6) -> Plan:
    """Titled documents of ``per_doc`` essay sentences (the unit is a sentence); one holds the fact asked about, others hold distractors."""
    start = rng.randrange(len(corpus.sentences))
    sentences = corpus.sentences[start:] + corpus.sentences[:start]
    people = rng.sample(PEOPLE, k=4)
    cities = rng.sample(CITIES, k=4)
    facts = [f"{p} was born in the city of {c}." for p, c in zip(people, cities)]
    fact_depths = [rng.random() for _ in facts]
    titles = [rng.choice(corpus.titles) for _ in range(len(sentences) // per_doc + 1)]
    question = f"Answer the question based on the given documents. Question: In which city was {people[0]} born?"
    prefix = "Answer:"

    def render(n: int) -> RenderedTask:
        docs = [" ".join(sentences[i : min(i + per_doc, n)]) for i in range(0, n, per_doc)] or [""]
        for fact, depth in zip(facts, fact_depths):
            index = min(int(depth * len(docs)), len(docs) - 1)
            docs[index] = f"{docs[index]} {fact}".strip()
        context = "\n\n".join(f"Document {i + 1} (Title: {titles[i]})\n{d}" for i, d in enumerate(docs))
        return RenderedTask(context, question, prefix, (cities[0],))

    return Plan(render, len(sentences))


TASKS: dict[str, Callable[[random.Random, Corpus], Plan]] = {
    "niah_single_essay": _niah(1, 1, 1, essay=True),
    "niah_single_noise": _niah(1, 1, 1, essay=False),
    "niah_multikey_essay": _niah(4, 1, 1, essay=True),
    "niah_multivalue_essay": _niah(1, 4, 1, essay=True),
    "niah_multiquery_noise": _niah(4, 1, 4, essay=False),
    "niah_multiquery_essay": _niah(4, 1, 4, essay=True),
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "frequent_words": _frequent_words,
    "qa": _qa,
}
