"""Reading edit datasets in the formats the published benchmarks use.

Each format has one small converter from a record to an `EditRequest`; the
format is detected from the first record's keys unless the caller names it.
Every error names the file and, for a bad record, its index and field, so a
broken record in a 10,000-record file is easy to find.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lledit.data.request import FIELDS, EditRequest, InvalidEditError

FORMATS = ("zsre", "counterfact_nested", "counterfact_flat", "knowedit", "fever", "lledit")


class DataFileError(ValueError):
    """A data file that cannot be read as edit records: bad JSON or an unknown format."""


@dataclass
class EditDataset:
    """Edit requests loaded from one file, with what is needed to reproduce the load."""

    name: str
    path: str
    format: str
    style: str
    sha256: str
    requests: list[EditRequest]
    n_records: int
    n_skipped: int

    def to_dict(self) -> dict[str, Any]:
        """The metadata a result file records (the requests themselves are left out)."""
        return {
            "name": self.name,
            "path": self.path,
            "format": self.format,
            "style": self.style,
            "sha256": self.sha256,
            "n_records": self.n_records,
            "n_skipped": self.n_skipped,
            "n_requests": len(self.requests),
        }


# Reading files ---------------------------------------------------------------


def read_records(path: str | Path) -> list[Any]:
    """The records of a JSON array or JSON Lines file, as parsed.

    Records are not checked here: a record that is not a JSON object is
    reported by the converter, so `skip_invalid` can skip and count it.
    """
    path = Path(path)
    return _parse(_read_bytes(path), path)


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    return path.read_bytes()


def _parse(data: bytes, path: Path) -> list[Any]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataFileError(
            f"{path}: not UTF-8 text (byte {error.start}: {error.reason})"
        ) from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise DataFileError(
                f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
            ) from None
    records = []
    # Split on "\n" only: JSON strings may hold raw U+2028 and the like, which
    # str.splitlines would treat as line breaks.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataFileError(
                f"{path}: malformed JSON Lines at line {number}, column {error.colno}: {error.msg}"
            ) from None
    return records


# Format detection --------------------------------------------------------------


def detect_format(record: Any) -> str:
    """The format of a data file, told from the keys of its first record."""
    if not isinstance(record, dict):
        raise DataFileError(
            f"unknown record format: records are JSON {_json_type(record)}s, not objects; "
            f"known formats: {FORMATS}"
        )
    keys = set(record)
    if "requested_rewrite" in keys:
        return "counterfact_nested"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "equiv_prompt", "alt"} <= keys:
        return "fever"
    if {"prompt", "target_new"} <= keys:
        if isinstance(record.get("portability"), dict) or isinstance(record.get("locality"), dict):
            return "knowedit"
        if "locality_prompt" in keys or "ground_truth" in keys:
            return "counterfact_flat"
        if keys <= set(FIELDS):
            return "lledit"
    raise DataFileError(
        f"unknown record format (keys seen: {sorted(keys)}); known formats: {FORMATS}"
    )


# Field access with error messages that name the field ---------------------------


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, int | float) else "value")


def _field_name(keys: tuple[str | int, ...]) -> str:
    name = ""
    for key in keys:
        if isinstance(key, int):
            name += f"[{key}]"
        else:
            name += f".{key}" if name else key
    return name


def _at(record: dict[str, Any], *keys: str | int) -> Any:
    """The value at a path of object keys and list indices."""
    value: Any = record
    for depth, key in enumerate(keys):
        expected = list if isinstance(key, int) else dict
        if not isinstance(value, expected):
            kind = "an array" if expected is list else "an object"
            where = _field_name(keys[:depth]) or "record"
            raise InvalidEditError(where, f"expected {kind}, got a JSON {_json_type(value)}")
        missing = key >= len(value) if isinstance(key, int) else key not in value
        if missing:
            raise InvalidEditError(_field_name(keys[: depth + 1]), "is missing")
        value = value[key]
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidEditError(name, f"expected a string, got a JSON {_json_type(value)}")
    if not value.strip():
        raise InvalidEditError(name, "is empty or whitespace only")
    return value


def _text_at(record: dict[str, Any], *keys: str | int) -> str:
    return _text(_at(record, *keys), _field_name(keys))


def _texts_at(record: dict[str, Any], *keys: str | int) -> list[str]:
    """A string or a list of strings: published files use both for prompt lists."""
    value = _at(record, *keys)
    if isinstance(value, str):
        return [_text_at(record, *keys)]
    if not isinstance(value, list):
        raise InvalidEditError(
            _field_name(keys),
            f"expected a string or an array of strings, got a JSON {_json_type(value)}",
        )
    return [_text_at(record, *keys, position) for position in range(len(value))]


def _answer_at(record: dict[str, Any], *keys: str | int) -> str:
    """The first string of an answer that may be a string or (nested) lists of aliases."""
    value = _at(record, *keys)
    while isinstance(value, list):
        if not value:
            raise InvalidEditError(_field_name(keys), "is an empty list of answers")
        value = value[0]
    return _text(value, _field_name(keys))


def _optional_text(record: dict[str, Any], key: str) -> str | None:
    return None if record.get(key) is None else _text_at(record, key)


def _case_id(record: dict[str, Any]) -> str | None:
    value = record.get("case_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidEditError(
            "case_id", f"expected an integer or a string, got a JSON {_json_type(value)}"
        )
    return str(value)


# One converter per format ---------------------------------------------------------


def from_zsre(record: dict[str, Any]) -> EditRequest:
    """MEND zsRE: make `src` answer `alt`; `answers[0]` is the original answer.

    The eval file's `portability` (a question whose answer follows from the new
    fact, "New Question" / "New Answer") becomes the request's portability pair.
    """
    answers = record.get("answers")
    portability = []
    if record.get("portability") is not None:
        portability.append(
            (
                _text_at(record, "portability", "New Question"),
                _answer_at(record, "portability", "New Answer"),
            )
        )
    return EditRequest(
        prompt=_text_at(record, "src"),
        target_new=_text_at(record, "alt"),
        subject=_optional_text(record, "subject"),
        target_true=_answer_at(record, "answers") if answers not in (None, []) else None,
        rephrases=_texts_at(record, "rephrase"),
        locality=[(_text_at(record, "loc"), _answer_at(record, "loc_ans"))],
        id=_case_id(record),
        portability=portability,
    )


def from_counterfact_nested(record: dict[str, Any]) -> EditRequest:
    """ROME/MEMIT CounterFact: the prompt template holds "{}" where the subject goes."""
    subject = _text_at(record, "requested_rewrite", "subject")
    template = _text_at(record, "requested_rewrite", "prompt")
    if "{}" not in template:
        raise InvalidEditError(
            "requested_rewrite.prompt", "has no '{}' placeholder for the subject"
        )
    target_true = _text_at(record, "requested_rewrite", "target_true", "str")
    return EditRequest(
        # replace, not str.format: a subject or template may contain other braces.
        prompt=template.replace("{}", subject),
        target_new=_text_at(record, "requested_rewrite", "target_new", "str"),
        subject=subject,
        target_true=target_true,
        rephrases=_texts_at(record, "paraphrase_prompts"),
        locality=[(prompt, target_true) for prompt in _texts_at(record, "neighborhood_prompts")],
        id=_case_id(record),
        generation_prompts=(
            _texts_at(record, "generation_prompts") if "generation_prompts" in record else ()
        ),
    )


def from_counterfact_flat(record: dict[str, Any]) -> EditRequest:
    """EasyEdit's flat CounterFact: one rephrase and one locality prompt per edit."""
    return EditRequest(
        prompt=_text_at(record, "prompt"),
        target_new=_text_at(record, "target_new"),
        subject=_optional_text(record, "subject"),
        target_true=_answer_at(record, "ground_truth"),
        rephrases=_texts_at(record, "rephrase_prompt"),
        locality=[
            (_text_at(record, "locality_prompt"), _answer_at(record, "locality_ground_truth"))
        ],
        id=_case_id(record),
    )


def _grouped_pairs(record: dict[str, Any], key: str) -> list[tuple[str, str]]:
    """KnowEdit's `{group: [{prompt, ground_truth}, ...]}` as (prompt, answer) pairs."""
    groups = record.get(key) or {}
    if not isinstance(groups, dict):
        raise InvalidEditError(key, f"expected an object, got a JSON {_json_type(groups)}")
    pairs = []
    for group, items in groups.items():
        if not isinstance(items, list):
            raise InvalidEditError(
                f"{key}.{group}", f"expected an array, got a JSON {_json_type(items)}"
            )
        for position in range(len(items)):
            prompt = _text_at(record, key, group, position, "prompt")
            answer = _answer_at(record, key, group, position, "ground_truth")
            pairs.append((prompt, answer))
    return pairs


def from_knowedit(record: dict[str, Any]) -> EditRequest:
    """KnowEdit: locality and portability prompts come in named groups (portability:
    reasoning, subject aliasing, logical generalization); rephrases and ground
    truth are optional."""
    rephrases = []
    for key in ("rephrase_prompt", "rephrase"):
        if record.get(key) is not None:
            rephrases += _texts_at(record, key)
    has_truth = record.get("ground_truth") is not None
    return EditRequest(
        prompt=_text_at(record, "prompt"),
        target_new=_text_at(record, "target_new"),
        subject=_optional_text(record, "subject"),
        target_true=_answer_at(record, "ground_truth") if has_truth else None,
        rephrases=rephrases,
        locality=_grouped_pairs(record, "locality"),
        id=_case_id(record),
        portability=_grouped_pairs(record, "portability"),
    )


def from_fever(record: dict[str, Any]) -> EditRequest:
    """MALMEN FEVER: `equiv_prompt` is a list of rephrases in the published files."""
    return EditRequest(
        prompt=_text_at(record, "prompt"),
        target_new=_text_at(record, "alt"),
        rephrases=_texts_at(record, "equiv_prompt"),
        locality=[(_text_at(record, "unrel_prompt"), _answer_at(record, "unrel_ans"))],
    )


CONVERTERS: dict[str, Callable[[dict[str, Any]], EditRequest]] = {
    "zsre": from_zsre,
    "counterfact_nested": from_counterfact_nested,
    "counterfact_flat": from_counterfact_flat,
    "knowedit": from_knowedit,
    "fever": from_fever,
    "lledit": EditRequest.from_dict,
}
# The metric family: CounterFact compares probabilities, the rest score token accuracy.
STYLES = {
    "zsre": "qa",
    "counterfact_nested": "counterfact",
    "counterfact_flat": "counterfact",
    "knowedit": "qa",
    "fever": "qa",
    "lledit": "qa",
}


def convert_record(record: Any, format: str) -> EditRequest:
    """One record of the given format as an `EditRequest`."""
    if not isinstance(record, dict):
        raise InvalidEditError("record", f"expected a JSON object, got a JSON {_json_type(record)}")
    return CONVERTERS[format](record)


# Loading -------------------------------------------------------------------------


def load_file(
    path: str | Path,
    *,
    format: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    seed: int | None = None,
    skip_invalid: bool = False,
    name: str | None = None,
) -> EditDataset:
    """Load every record of a data file, then shuffle (if seeded), then take offset and limit.

    Converting every record first means an invalid record anywhere in the file
    is reported (or counted) the same way whatever slice is asked for.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known formats: {FORMATS}")
    path = Path(path)
    data = _read_bytes(path)
    records = _parse(data, path)
    if format is None:
        format = _detect_file_format(records, path)

    requests = []
    skipped = 0
    for index, record in enumerate(records):
        try:
            requests.append(convert_record(record, format))
        except InvalidEditError as error:
            if not skip_invalid:
                raise error.located(str(path), index) from None
            skipped += 1

    if seed is not None:
        random.Random(seed).shuffle(requests)
    end = None if limit is None else offset + limit
    return EditDataset(
        name=name or str(path),
        path=str(path),
        format=format,
        style=STYLES[format],
        sha256=hashlib.sha256(data).hexdigest(),
        requests=requests[offset:end],
        n_records=len(records),
        n_skipped=skipped,
    )


def _detect_file_format(records: list[Any], path: Path) -> str:
    if not records:
        raise DataFileError(f"{path}: holds no records, so its format cannot be detected")
    first = next((record for record in records if isinstance(record, dict)), records[0])
    try:
        return detect_format(first)
    except DataFileError as error:
        raise DataFileError(f"{path}: {error}") from None
