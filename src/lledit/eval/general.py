"""General abilities before and after editing: does the edited model still do
what it could do?

The task sets are the ones the RLEdit and AlphaEdit papers check (SST-2, MRPC,
CoLA, RTE, MMLU, NLI, sentiment, dialogue), read from `general/` in the data
directory. Each item becomes a k-shot prompt (the shots come from the same
file and are never a scored item) and the answer is the option whose label
text the model finds most likely, so even a small model is scored fairly.
Per task: accuracy and the mean log-likelihood of the correct option; over
the tasks' natural sentences, perplexity. The same items are scored on the
unedited and on the edited model.
"""

from __future__ import annotations

import ast
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lledit.data.datasets import data_dir
from lledit.eval.scoring import score_pairs
from lledit.model import ModelHandle
from lledit.tokens import EncodedPair, collate, encode_pairs


class GeneralDataError(ValueError):
    """A task file that is missing, malformed, or holds a record that cannot be scored."""


@dataclass(frozen=True)
class Item:
    """One scored question: the prompt (without shots), its options and the right one."""

    prompt: str
    options: tuple[str, ...]
    label: int


def _field(record: Any, name: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise GeneralDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise GeneralDataError(f"{where}, field '{name}': is missing")
    return record[name]


def _text(record: Any, name: str, where: str) -> str:
    value = _field(record, name, where)
    if not isinstance(value, str) or not value.strip():
        raise GeneralDataError(f"{where}, field '{name}': expected a non-empty string")
    return " ".join(value.split())


def _texts(record: Any, name: str, where: str) -> list[str]:
    """A list of strings; the published files sometimes hold it as its Python repr."""
    value = _field(record, name, where)
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise GeneralDataError(f"{where}, field '{name}': not a list of strings") from None
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise GeneralDataError(f"{where}, field '{name}': expected a list of 2 or more strings")
    return [" ".join(v.split()) for v in value]


def _label(record: Any, name: str, where: str, labels: Sequence[str]) -> int:
    """The index of the record's label among `labels` (the labels as published)."""
    value = _field(record, name, where)
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else None
    if text not in labels:
        raise GeneralDataError(
            f"{where}, field '{name}': label {value!r} is not one of {list(labels)}"
        )
    return list(labels).index(text)


def _lettered(options: Sequence[str]) -> str:
    return "\n".join(f"{chr(65 + i)}. {option}" for i, option in enumerate(options))


def _sentiment(record: Any, where: str) -> Item:
    sentence = _text(record, "sentence", where)
    label = _label(record, "label", where, ("0", "1"))
    return Item(f"Review: {sentence}\nSentiment:", ("negative", "positive"), label)


def _cola(record: Any, where: str) -> Item:
    sentence = _text(record, "sentence", where)
    label = _label(record, "label", where, ("0", "1"))
    prompt = f"Sentence: {sentence}\nIs this sentence grammatically correct?\nAnswer:"
    return Item(prompt, ("no", "yes"), label)


def _mrpc(record: Any, where: str) -> Item:
    first, second = _text(record, "sentence1", where), _text(record, "sentence2", where)
    label = _label(record, "label", where, ("0", "1"))
    prompt = (
        f"Sentence 1: {first}\nSentence 2: {second}\n"
        "Do both sentences mean the same thing?\nAnswer:"
    )
    return Item(prompt, ("no", "yes"), label)


def _entailment(labels: Sequence[str]) -> Callable[[Any, str], Item]:
    """RTE and NLI: `labels` are the published labels for entailment and its absence."""

    def read(record: Any, where: str) -> Item:
        premise, hypothesis = _text(record, "sentence1", where), _text(record, "sentence2", where)
        label = _label(record, "label", where, labels)
        prompt = f"{premise}\nQuestion: {hypothesis} True or False?\nAnswer:"
        return Item(prompt, ("True", "False"), label)

    return read


def _mmlu(record: Any, where: str) -> Item:
    question = _text(record, "question", where)
    choices = _texts(record, "choices", where)
    letters = tuple(chr(65 + i) for i in range(len(choices)))
    label = _label(record, "answer", where, [str(i) for i in range(len(choices))])
    return Item(f"Question: {question}\n{_lettered(choices)}\nAnswer:", letters, label)


def _dialogue(record: Any, where: str) -> Item:
    article = _text(record, "article", where)
    options = _texts(record, "options", where)
    letters = tuple(chr(65 + i) for i in range(len(options)))
    label = _label(record, "answers", where, letters)
    prompt = f"Conversation: {article}\nWhich reply comes next?\n{_lettered(options)}\nAnswer:"
    return Item(prompt, letters, label)


@dataclass(frozen=True)
class Task:
    """A task file, how to read one record of it, and which field is natural text."""

    file: str
    read: Callable[[Any, str], Item]
    sentence_field: str | None


TASKS: dict[str, Task] = {
    "sst2": Task("sst2.json", _sentiment, "sentence"),
    "mrpc": Task("mrpc.json", _mrpc, "sentence1"),
    "cola": Task("cola.json", _cola, "sentence"),
    "rte": Task("rte.json", _entailment(("0", "1")), "sentence1"),
    "mmlu": Task("mmlu.json", _mmlu, None),
    "nli": Task("nli.json", _entailment(("entailment", "not_entailment")), "sentence1"),
    "sentiment": Task("sentiment_analysis.json", _sentiment, "sentence"),
    "dialogue": Task("dialogue.json", _dialogue, None),
}


@dataclass
class GeneralConfig:
    """Which tasks, how many items, how many shots."""

    tasks: tuple[str, ...] = tuple(TASKS)
    """The task sets scored; all eight by default (names in `TASKS`)."""
    items: int = 100
    """Scored items per task: one moves a binary task's accuracy by 0.01. All
    eight tasks at 100 items take about 5 minutes per scoring of the default
    model on two CPU cores (docs/evaluation.md)."""
    shots: int = 3
    """Worked examples before each item, from the same file, never a scored item."""
    perplexity_sentences: int = 200
    """Natural sentences (a fixed sample of the tasks' text) that perplexity is taken on."""
    seed: int = 0
    """Seed of the items and shots drawn from each task (each task its own stream)."""
    batch_size: int = 16
    """Sequences per forward pass; k-shot prompts are long."""

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        unknown = [name for name in self.tasks if name not in TASKS]
        if unknown:
            raise ValueError(
                f"unknown general task {unknown[0]!r}; known tasks: {', '.join(TASKS)}"
            )
        if not self.tasks:
            raise ValueError("no general tasks chosen")
        for name in ("items", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"general {name} must be at least 1, got {getattr(self, name)}")
        for name in ("shots", "perplexity_sentences"):
            if getattr(self, name) < 0:
                raise ValueError(f"general {name} must be >= 0, got {getattr(self, name)}")


@dataclass
class GeneralSuite:
    """The fixed prompts of one configuration: the same items before and after editing."""

    config: GeneralConfig
    prompts: dict[str, list[Item]] = field(default_factory=dict)
    sentences: list[str] = field(default_factory=list)


def _read_task(name: str, directory: Path) -> tuple[list[Item], list[str]]:
    task = TASKS[name]
    path = directory / task.file
    if not path.is_file():
        raise GeneralDataError(
            f"general task {name!r}: {path} not found (set LLEDIT_DATA_DIR to the folder "
            "that holds general/)"
        )
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GeneralDataError(f"{path}: malformed JSON: {error}") from None
    if not isinstance(records, list) or not records:
        raise GeneralDataError(f"{path}: expected a non-empty JSON array of records")
    items = [task.read(record, f"{path}, record {index}") for index, record in enumerate(records)]
    sentences = (
        [_text(record, task.sentence_field, f"{path}") for record in records]
        if task.sentence_field
        else []
    )
    return items, sentences


def load_general(
    config: GeneralConfig | None = None, directory: Path | None = None
) -> GeneralSuite:
    """Read the task files and fix the scored items, their shots and the sentences."""
    config = config or GeneralConfig()
    directory = directory or data_dir() / "general"
    suite = GeneralSuite(config)
    all_sentences: list[str] = []
    for name in config.tasks:
        # Seeded per task, so a task's items do not depend on which others are chosen.
        rng = random.Random(f"{config.seed}:{name}")
        items, sentences = _read_task(name, directory)
        if len(items) < config.items + config.shots:
            raise GeneralDataError(
                f"general task {name!r} has {len(items)} records; {config.items} items and "
                f"{config.shots} shots need {config.items + config.shots}"
            )
        chosen = rng.sample(range(len(items)), config.items + config.shots)
        shots = [items[i] for i in chosen[config.items :]]
        context = "".join(f"{s.prompt} {s.options[s.label]}\n\n" for s in shots)
        suite.prompts[name] = [
            Item(context + items[i].prompt, items[i].options, items[i].label)
            for i in chosen[: config.items]
        ]
        all_sentences += sentences
    count = min(config.perplexity_sentences, len(all_sentences))
    suite.sentences = random.Random(config.seed).sample(all_sentences, count)
    return suite


@torch.no_grad()
def perplexity(handle: ModelHandle, sentences: Sequence[str], batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood per token) over `sentences`, first tokens excluded."""
    encoded = [ids for ids in handle.tokenizer(list(sentences))["input_ids"] if len(ids) > 1]
    encoded.sort(key=len)
    if not encoded:
        raise ValueError("no sentence of two or more tokens to take perplexity on")
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        # Every token after the first is a "target": collate locates them all.
        pairs = [EncodedPair(ids, 1) for ids in encoded[start : start + batch_size]]
        batch = collate(pairs, handle.tokenizer.pad_token_id).to(handle.device)
        hidden = handle.model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        logits = handle.logits_at(hidden, batch.target_rows, batch.target_positions - 1)
        total -= logits.log_softmax(-1).gather(1, batch.target_ids[:, None]).sum().item()
        tokens += len(batch.target_ids)
    return math.exp(total / tokens)


def _above_chance(accuracy: float, chance: float, items: int) -> bool:
    """More than two standard errors above chance on `items` balanced items."""
    return accuracy > chance + 2 * math.sqrt(chance * (1 - chance) / items)


@torch.no_grad()
def option_logprobs(
    handle: ModelHandle, items: Sequence[Item], batch_size: int = 16
) -> list[list[float]]:
    """Log-likelihood of each item's options as the continuation of its prompt.

    Where every option of an item is one token after the prompt (yes/no, A-D),
    one forward pass of the prompt scores them all; otherwise each option is
    scored as its own sequence. Both give the same numbers.
    """
    pairs = encode_pairs(
        handle.tokenizer,
        [item.prompt for item in items for _ in item.options],
        [option for item in items for option in item.options],
    )
    grouped, start = [], 0
    for item in items:
        grouped.append(pairs[start : start + len(item.options)])
        start += len(item.options)
    single = [
        index
        for index, group in enumerate(grouped)
        if all(len(p.target_ids) == 1 and p.ids[:-1] == group[0].ids[:-1] for p in group)
    ]
    scores: list[list[float]] = [[] for _ in items]
    if single:
        # The first option's pair holds the prompt's tokens plus one: its last
        # target position is the one that predicts every option.
        firsts = [grouped[index][0] for index in single]
        order = sorted(range(len(single)), key=lambda i: len(firsts[i].ids))
        for begin in range(0, len(order), batch_size):
            chunk = order[begin : begin + batch_size]
            batch = collate([firsts[i] for i in chunk], handle.tokenizer.pad_token_id)
            logprobs = handle.target_logits(batch.to(handle.device)).log_softmax(-1).cpu()
            for row, position in enumerate(chunk):
                index = single[position]
                option_ids = [pair.target_ids[0] for pair in grouped[index]]
                scores[index] = logprobs[row, option_ids].tolist()
    scored_at_once = set(single)
    rest = [index for index in range(len(items)) if index not in scored_at_once]
    if rest:
        prompts = [items[i].prompt for i in rest for _ in items[i].options]
        options = [option for i in rest for option in items[i].options]
        flat = iter(score_pairs(handle, prompts, options, batch_size=batch_size).logprob.tolist())
        for index in rest:
            scores[index] = [next(flat) for _ in items[index].options]
    return scores


def score_general(handle: ModelHandle, suite: GeneralSuite) -> dict[str, Any]:
    """Accuracy, correct-option log-likelihood and chance flag per task; perplexity."""
    tasks = {}
    for name, items in suite.prompts.items():
        per_item = option_logprobs(handle, items, suite.config.batch_size)
        correct, likelihood = 0, 0.0
        for item, scores in zip(items, per_item, strict=True):
            correct += int(max(range(len(scores)), key=scores.__getitem__) == item.label)
            likelihood += scores[item.label]
        accuracy = correct / len(items)
        chance = sum(1 / len(item.options) for item in items) / len(items)
        tasks[name] = {
            "accuracy": accuracy,
            "correct_logprob": likelihood / len(items),
            "items": len(items),
            "chance": chance,
            "above_chance": _above_chance(accuracy, chance, len(items)),
        }
    scores: dict[str, Any] = {"tasks": tasks}
    if suite.sentences:
        scores["perplexity"] = perplexity(handle, suite.sentences, suite.config.batch_size)
    return scores


def retention(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """after / before accuracy per task, and its mean over the tasks the unedited
    model is above chance on (a task at chance says nothing about what editing
    kept); the change of the correct option's log-likelihood per task and on
    average, a finer signal that counts on every task."""
    ratios = {}
    for name, scores in before["tasks"].items():
        if name in after["tasks"] and scores["accuracy"] > 0:
            ratios[name] = after["tasks"][name]["accuracy"] / scores["accuracy"]
    counted = [name for name in ratios if before["tasks"][name]["above_chance"]]
    changes = {
        name: after["tasks"][name]["correct_logprob"] - scores["correct_logprob"]
        for name, scores in before["tasks"].items()
        if name in after["tasks"]
    }
    summary: dict[str, Any] = {
        "accuracy_ratio": ratios,
        "correct_logprob_change": changes,
        "mean_correct_logprob_change": sum(changes.values()) / len(changes) if changes else None,
        "tasks_above_chance": counted,
        "mean_accuracy_ratio": sum(ratios[n] for n in counted) / len(counted) if counted else None,
    }
    if "perplexity" in before and "perplexity" in after:
        summary["perplexity_ratio"] = after["perplexity"] / before["perplexity"]
    return summary


def config_dict(config: GeneralConfig) -> dict[str, Any]:
    data = asdict(config)
    data["tasks"] = list(config.tasks)
    return data
