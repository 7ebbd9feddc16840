"""The edit request: one fact to write into a model, with the prompts that test it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_TARGET_CHARS = 500
MAX_PROMPT_CHARS = 4000
FIELDS = (
    "id",
    "prompt",
    "target_new",
    "subject",
    "target_true",
    "rephrases",
    "locality",
    "portability",
    "generation_prompts",
)


class InvalidEditError(ValueError):
    """A request or a data record that cannot become a valid `EditRequest`.

    Carries the offending field and, when the request came from a file, the
    file and the record index, so the message points at the exact place.
    """

    def __init__(
        self,
        field: str,
        reason: str,
        *,
        source: str | None = None,
        index: int | None = None,
    ) -> None:
        self.field = field
        self.reason = reason
        self.source = source
        self.index = index
        where = []
        if source is not None:
            where.append(str(source))
        if index is not None:
            where.append(f"record {index}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(f"{prefix}field '{field}': {reason}")

    def located(self, source: str | None, index: int | None) -> InvalidEditError:
        """The same error, pinned to a file and record index."""
        return InvalidEditError(self.field, self.reason, source=source, index=index)


_UNSAFE = re.compile("[\ud800-\udfff\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Lone surrogates (which no encoder can write) and control characters but tab and newline."""


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored and shown as text, or None if it can."""
    found = _UNSAFE.search(value)
    if found is None:
        return None
    code = ord(found.group())
    kind = "a lone surrogate" if 0xD800 <= code <= 0xDFFF else "a control character"
    return f"holds {kind} (U+{code:04X}) at character {found.start()}"


def _check_text(name: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidEditError(name, f"expected a string, got {type(value).__name__}")
    if (problem := text_problem(value)) is not None:
        raise InvalidEditError(name, problem)
    if not value.strip():
        raise InvalidEditError(name, "is empty or whitespace only")
    if len(value) > limit:
        raise InvalidEditError(name, f"is {len(value)} characters long; the limit is {limit}")
    return value


@dataclass(frozen=True)
class EditRequest:
    """Make the model complete `prompt` with `target_new`.

    `rephrases` test generalization, `locality` holds (prompt, answer) pairs
    about unrelated facts that the edit must leave alone, `portability` holds
    (prompt, answer) pairs that follow from the new fact (KnowEdit's reasoning
    and alias questions), and `generation_prompts` start free text about the
    subject (CounterFact's fluency test). Lists are stored as tuples so the
    request stays hashable and immutable.
    """

    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    rephrases: tuple[str, ...] = field(default=())
    locality: tuple[tuple[str, str], ...] = field(default=())
    id: str | None = None
    portability: tuple[tuple[str, str], ...] = field(default=())
    generation_prompts: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        _check_text("prompt", self.prompt, MAX_PROMPT_CHARS)
        _check_text("target_new", self.target_new, MAX_TARGET_CHARS)
        if self.subject is not None:
            _check_text("subject", self.subject, MAX_PROMPT_CHARS)
        if self.target_true is not None:
            _check_text("target_true", self.target_true, MAX_TARGET_CHARS)
        if self.id is not None and not isinstance(self.id, str):
            raise InvalidEditError("id", f"expected a string, got {type(self.id).__name__}")
        object.__setattr__(self, "rephrases", _as_prompts("rephrases", self.rephrases))
        object.__setattr__(self, "locality", _as_pairs("locality", self.locality))
        object.__setattr__(self, "portability", _as_pairs("portability", self.portability))
        object.__setattr__(
            self, "generation_prompts", _as_prompts("generation_prompts", self.generation_prompts)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "subject": self.subject,
            "target_true": self.target_true,
            "rephrases": list(self.rephrases),
            "locality": [list(pair) for pair in self.locality],
            "portability": [list(pair) for pair in self.portability],
            "generation_prompts": list(self.generation_prompts),
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> EditRequest:
        """Build from the dict form written by `to_dict` (lledit's own JSONL)."""
        if not isinstance(record, dict):
            raise InvalidEditError("record", f"expected an object, got {type(record).__name__}")
        for required in ("prompt", "target_new"):
            if required not in record:
                raise InvalidEditError(required, "is missing")
        known = set(FIELDS)
        unknown = sorted(set(record) - known)
        if unknown:
            raise InvalidEditError(unknown[0], f"unknown field; expected some of {sorted(known)}")
        return cls(
            prompt=record["prompt"],
            target_new=record["target_new"],
            subject=record.get("subject"),
            target_true=record.get("target_true"),
            rephrases=record.get("rephrases", ()),
            locality=record.get("locality", ()),
            id=record.get("id"),
            portability=record.get("portability", ()),
            generation_prompts=record.get("generation_prompts", ()),
        )


def _as_prompts(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidEditError(name, "expected a list of strings")
    items = tuple(value)
    for position, item in enumerate(items):
        _check_text(f"{name}[{position}]", item, MAX_PROMPT_CHARS)
    return items


def _as_pairs(name: str, value: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidEditError(name, "expected a list of [prompt, answer] pairs")
    pairs = []
    for position, pair in enumerate(value):
        if isinstance(pair, str) or not isinstance(pair, Iterable) or len(pair := tuple(pair)) != 2:
            raise InvalidEditError(f"{name}[{position}]", "expected a [prompt, answer] pair")
        prompt = _check_text(f"{name}[{position}].prompt", pair[0], MAX_PROMPT_CHARS)
        answer = _check_text(f"{name}[{position}].answer", pair[1], MAX_PROMPT_CHARS)
        pairs.append((prompt, answer))
    return tuple(pairs)
