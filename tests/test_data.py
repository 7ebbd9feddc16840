"""Edit requests, the format loaders and the named datasets (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lledit.data import (
    DataFileError,
    EditDataset,
    EditRequest,
    InvalidEditError,
    UnknownDatasetError,
    data_dir,
    detect_format,
    list_datasets,
    load_dataset,
    load_file,
)
from lledit.data.datasets import _path_of


def write_json(path: Path, records: list[Any]) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def lledit_records(count: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"Question {i} is answered by", "target_new": f"answer {i}", "id": str(i)}
        for i in range(count)
    ]


ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}


# EditRequest validation -------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"target_new": ""}, "target_new"),
        ({"prompt": "   \n"}, "prompt"),
        ({"subject": 7}, "subject"),
        ({"target_new": "x" * 501}, "target_new"),
        ({"locality": [("only a prompt",)]}, "locality[0]"),
        ({"locality": [("a prompt", "")]}, "locality[0].answer"),
        ({"rephrases": "not a list"}, "rephrases"),
    ],
)
def test_edit_request_rejects_invalid_fields(changes: dict[str, Any], field: str) -> None:
    fields = {"prompt": "The capital of France is", "target_new": "Lyon", **changes}
    with pytest.raises(InvalidEditError) as caught:
        EditRequest(**fields)
    assert caught.value.field == field
    assert f"'{field}'" in str(caught.value)


def test_edit_request_stores_lists_as_tuples() -> None:
    request = EditRequest(
        prompt="The capital of France is",
        target_new="Lyon",
        rephrases=["France's capital is"],
        locality=[["The capital of Spain is", "Madrid"]],
    )
    assert request.rephrases == ("France's capital is",)
    assert request.locality == (("The capital of Spain is", "Madrid"),)
    assert EditRequest.from_dict(request.to_dict()) == request


# One converter per format -------------------------------------------------------


def test_zsre_record(tmp_path: Path) -> None:
    dataset = load_file(write_json(tmp_path / "zsre.json", [ZSRE]))
    assert (dataset.format, dataset.style) == ("zsre", "qa")
    assert dataset.requests == [
        EditRequest(
            prompt="What is the product made by UniFirst?",
            target_new="unmanned aircraft",
            subject="UniFirst",
            target_true="uniform",
            rephrases=["What will be the product of UniFirst?"],
            locality=[
                ("nq question: john goodman's character in the big lebowski", "Walter Sobchak")
            ],
        )
    ]


def test_zsre_record_without_answers_keeps_case_id(tmp_path: Path) -> None:
    record = {key: ZSRE[key] for key in ("subject", "src", "rephrase", "alt", "loc", "loc_ans")}
    dataset = load_file(write_json(tmp_path / "zsre.json", [{"case_id": 12, **record}]))
    (request,) = dataset.requests
    assert dataset.format == "zsre"
    assert request.target_true is None
    assert request.id == "12"


def test_nested_counterfact_with_subject_at_the_start(tmp_path: Path) -> None:
    record = {
        "case_id": 3,
        "pararel_idx": 1,
        "requested_rewrite": {
            "prompt": "{} is a native speaker of",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Jean {Le} Fustec",
        },
        "paraphrase_prompts": [
            "Some text. Jean {Le} Fustec speaks",
            "Jean {Le} Fustec's language is",
        ],
        "neighborhood_prompts": ["Léon Blum is a native speaker of", "Michel Rocard speaks"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": ["Jean {Le} Fustec's mother tongue is"],
    }
    dataset = load_file(write_json(tmp_path / "cf.json", [record]))
    (request,) = dataset.requests
    assert (dataset.format, dataset.style) == ("counterfact_nested", "counterfact")
    assert request.prompt == "Jean {Le} Fustec is a native speaker of"
    assert (request.target_new, request.target_true) == ("English", "French")
    assert request.subject == "Jean {Le} Fustec"
    assert request.rephrases == tuple(record["paraphrase_prompts"])
    assert request.locality == (
        ("Léon Blum is a native speaker of", "French"),
        ("Michel Rocard speaks", "French"),
    )
    assert request.id == "3"


def test_nested_counterfact_needs_a_placeholder(tmp_path: Path) -> None:
    record = {
        "requested_rewrite": {
            "prompt": "The mother tongue of Danielle Darrieux is",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": [],
        "neighborhood_prompts": [],
    }
    with pytest.raises(InvalidEditError, match="placeholder") as caught:
        load_file(write_json(tmp_path / "cf.json", [record]))
    assert caught.value.field == "requested_rewrite.prompt"


def test_flat_counterfact_jsonl(tmp_path: Path) -> None:
    record = {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }
    dataset = load_file(write_jsonl(tmp_path / "cf.jsonl", [record]))
    assert (dataset.format, dataset.style) == ("counterfact_flat", "counterfact")
    assert dataset.requests == [
        EditRequest(
            prompt="The mother tongue of Danielle Darrieux is",
            target_new="English",
            subject="Danielle Darrieux",
            target_true="French",
            rephrases=["Where Danielle Darrieux is from, people speak the language of"],
            locality=[("Michel Rocard is a native speaker of", "French")],
            id="0",
        )
    ]


def test_knowedit_with_nested_alias_lists(tmp_path: Path) -> None:
    record = {
        "subject": "Goursez Vreizh",
        "prompt": "The name of the country which Goursez Vreizh is associated with is",
        "target_new": "Franche-Comté",
        "ground_truth": [["France", "French Republic"]],
        "portability": {"Reasoning": [{"prompt": "The capital of ...", "ground_truth": "Paris"}]},
        "locality": {
            "Relation_Specificity": [
                {"prompt": "The name of the founder of Goursez Vreizh is", "ground_truth": "Le"},
                {"prompt": "Goursez Vreizh was founded in", "ground_truth": [["1900"], ["1901"]]},
            ],
            "Forgetfulness": [{"prompt": "Goursez Vreizh is a", "ground_truth": ["gorsedd"]}],
        },
    }
    without_rephrase = load_file(write_json(tmp_path / "ke.json", [record])).requests[0]
    assert without_rephrase.target_true == "France"
    assert without_rephrase.rephrases == ()
    assert without_rephrase.locality == (
        ("The name of the founder of Goursez Vreizh is", "Le"),
        ("Goursez Vreizh was founded in", "1900"),
        ("Goursez Vreizh is a", "gorsedd"),
    )
    rephrased = {**record, "rephrase_prompt": "Goursez Vreizh belongs to the country"}
    dataset = load_file(write_json(tmp_path / "ke2.json", [rephrased]))
    assert (dataset.format, dataset.style) == ("knowedit", "qa")
    assert dataset.requests[0].rephrases == ("Goursez Vreizh belongs to the country",)


def test_knowedit_bad_locality_item_names_the_group(tmp_path: Path) -> None:
    record = {
        "prompt": "The name of the country of X is",
        "target_new": "Y",
        "locality": {"Forgetfulness": [{"prompt": "X is a", "ground_truth": ""}]},
    }
    with pytest.raises(InvalidEditError) as caught:
        load_file(write_json(tmp_path / "ke.json", [record]))
    assert caught.value.field == "locality.Forgetfulness[0].ground_truth"


def test_fever_record(tmp_path: Path) -> None:
    records = [
        {
            "prompt": "Is it true that Nikolaj Coster-Waldau worked with Fox?",
            "equiv_prompt": [
                "Did Nikolaj Coster-Waldau work with Fox?",
                "Fox hired Coster-Waldau?",
            ],
            "alt": "False",
            "unrel_prompt": "Is it true that Roman Atwood is a content creator?",
            "unrel_ans": "True",
        },
        {
            "prompt": "Is it true that the sky is green?",
            "equiv_prompt": "Is the sky green?",
            "alt": "True",
            "unrel_prompt": "Is it true that water is wet?",
            "unrel_ans": "True",
        },
    ]
    dataset = load_file(write_jsonl(tmp_path / "fever.jsonl", records))
    assert (dataset.format, dataset.style) == ("fever", "qa")
    first, second = dataset.requests
    assert first.target_new == "False"
    assert first.rephrases == tuple(records[0]["equiv_prompt"])
    assert first.locality == (("Is it true that Roman Atwood is a content creator?", "True"),)
    assert second.rephrases == ("Is the sky green?",)


def test_lledit_round_trip(tmp_path: Path) -> None:
    request = EditRequest(
        prompt="The capital of France is",
        target_new="Lyon",
        subject="France",
        target_true="Paris",
        rephrases=["France's capital city is"],
        locality=[("The capital of Spain is", "Madrid")],
        id="e1",
    )
    dataset = load_file(write_jsonl(tmp_path / "edits.jsonl", [request.to_dict()]))
    assert dataset.format == "lledit"
    assert dataset.requests == [request]


def test_named_format_overrides_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "edits.jsonl", lledit_records(2))
    assert load_file(path, format="lledit").format == "lledit"
    with pytest.raises(ValueError, match="unknown format"):
        load_file(path, format="csv")


def test_unknown_format_lists_formats_and_keys(tmp_path: Path) -> None:
    with pytest.raises(DataFileError) as caught:
        load_file(write_json(tmp_path / "odd.json", [{"question": "q", "answer": "a"}]))
    message = str(caught.value)
    assert "odd.json" in message
    assert "question" in message and "answer" in message
    assert "counterfact_nested" in message and "fever" in message


def test_detect_format_needs_an_object() -> None:
    with pytest.raises(DataFileError, match="not objects"):
        detect_format(["a", "list"])


# File errors ------------------------------------------------------------------------


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(record) for record in lledit_records(2)]
    path.write_text(f"{lines[0]}\n{lines[1]}\n{{'prompt': oops}}\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="line 3") as caught:
        load_file(path)
    assert str(path) in str(caught.value)


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(
        '[\n  {"prompt": "a", "target_new": "b"},\n  {"prompt": }\n]\n', encoding="utf-8"
    )
    with pytest.raises(DataFileError, match="line 3, column 14") as caught:
        load_file(path)
    assert str(path) in str(caught.value)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError) as caught:
        load_file("no/such/file.json")
    assert "no/such/file.json" in str(caught.value)


def test_missing_field_names_file_index_and_field(tmp_path: Path) -> None:
    broken = {key: value for key, value in ZSRE.items() if key != "loc_ans"}
    path = write_json(tmp_path / "zsre.json", [ZSRE, ZSRE, broken])
    with pytest.raises(InvalidEditError) as caught:
        load_file(path)
    error = caught.value
    assert (error.source, error.index, error.field) == (str(path), 2, "loc_ans")
    assert str(path) in str(error) and "record 2" in str(error) and "'loc_ans'" in str(error)


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    path = write_json(tmp_path / "zsre.json", [{**ZSRE, "rephrase": 5}])
    with pytest.raises(InvalidEditError, match="record 0") as caught:
        load_file(path)
    assert caught.value.field == "rephrase"


def test_non_object_record_is_an_invalid_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "edits.jsonl", [*lledit_records(1), ["not", "an", "object"]])
    with pytest.raises(InvalidEditError) as caught:
        load_file(path)
    assert (caught.value.index, caught.value.field) == (1, "record")


def test_skip_invalid_skips_and_counts(tmp_path: Path) -> None:
    records = [*lledit_records(3), {"prompt": "p", "target_new": " "}, 7, *lledit_records(2)]
    dataset = load_file(write_jsonl(tmp_path / "edits.jsonl", records), skip_invalid=True)
    assert (dataset.n_records, dataset.n_skipped, len(dataset.requests)) == (7, 2, 5)


# Selection: shuffle, offset, limit ---------------------------------------------------


def test_seeded_shuffle_is_deterministic_and_reorders(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "edits.jsonl", lledit_records(30))
    in_file_order = [request.id for request in load_file(path).requests]
    first = [request.id for request in load_file(path, seed=7).requests]
    again = [request.id for request in load_file(path, seed=7).requests]
    assert first == again
    assert first != in_file_order
    assert sorted(first) == sorted(in_file_order)


def test_offset_and_limit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "edits.jsonl", lledit_records(10))
    assert [r.id for r in load_file(path, offset=2, limit=3).requests] == ["2", "3", "4"]
    assert [r.id for r in load_file(path, offset=8).requests] == ["8", "9"]
    assert load_file(path, limit=0).requests == []
    shuffled = [r.id for r in load_file(path, seed=1).requests]
    assert [r.id for r in load_file(path, seed=1, offset=4, limit=2).requests] == shuffled[4:6]


@pytest.mark.parametrize("argument", ["limit", "offset"])
def test_negative_limit_or_offset(tmp_path: Path, argument: str) -> None:
    path = write_jsonl(tmp_path / "edits.jsonl", lledit_records(2))
    with pytest.raises(ValueError, match=argument):
        load_file(path, **{argument: -1})


def test_dataset_metadata(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "edits.jsonl", lledit_records(4))
    dataset = load_file(path, limit=3, name="mine")
    metadata = dataset.to_dict()
    assert metadata["name"] == "mine"
    assert metadata["path"] == str(path)
    assert (metadata["n_records"], metadata["n_skipped"], metadata["n_requests"]) == (4, 0, 3)
    assert len(metadata["sha256"]) == 64
    assert "requests" not in metadata


# Named datasets --------------------------------------------------------------------------


def test_unknown_dataset_name() -> None:
    with pytest.raises(UnknownDatasetError, match="zsre") as caught:
        load_dataset("no-such-dataset")
    assert "counterfact" in str(caught.value)


def test_unknown_split_lists_the_splits() -> None:
    with pytest.raises(ValueError, match="train-1k"):
        load_dataset("zsre", "test")


def test_load_dataset_takes_a_path(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "edits.jsonl", lledit_records(3))
    dataset = load_dataset(path, limit=2)
    assert (dataset.name, len(dataset.requests)) == (str(path), 2)


def test_absent_benchmark_file_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLEDIT_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="LLEDIT_DATA_DIR") as caught:
        load_dataset("zsre", "eval")
    assert str(tmp_path) in str(caught.value)
    infos = [info for info in list_datasets() if info.name == "zsre"]
    assert infos and not any(info.present for info in infos)


# Real benchmark files (../shared/data) --------------------------------------------------


def shared(name: str, split: str, **options: Any) -> EditDataset:
    path = _path_of(name, split)
    if not path.is_file():
        pytest.skip(f"benchmark file {path} not found; set LLEDIT_DATA_DIR to the shared data dir")
    return load_dataset(name, split, **options)


def test_real_zsre_eval() -> None:
    dataset = shared("zsre", "eval")
    assert (dataset.name, dataset.format, dataset.style) == ("zsre/eval", "zsre", "qa")
    assert (dataset.n_records, dataset.n_skipped, len(dataset.requests)) == (1037, 0, 1037)
    assert all(r.target_true and r.rephrases and r.locality for r in dataset.requests)
    assert dataset.requests[0].locality[0][0].startswith("nq question: ")
    assert all(len(r.portability) == 1 for r in dataset.requests)
    assert dataset.requests[0].portability[0][1] == "Athletics"


def test_real_zsre_train_10k_has_no_answers() -> None:
    dataset = shared("zsre", "train")
    assert (dataset.n_records, dataset.n_skipped) == (10000, 0)
    # Record 2143 has a 519-character locality answer: long, but valid.
    assert len(dataset.requests[2143].locality[0][1]) == 519
    assert all(r.target_true is None for r in dataset.requests)
    assert dataset.requests[0].id == "0"


def test_real_zsre_train_1k_skips_empty_targets() -> None:
    dataset = shared("zsre", "train-1k", skip_invalid=True)
    assert (dataset.n_records, dataset.n_skipped) == (1000, 2)


def test_real_counterfact_edit_split() -> None:
    dataset = shared("counterfact", "eval")
    assert (dataset.format, dataset.style) == ("counterfact_flat", "counterfact")
    assert (dataset.n_records, dataset.n_skipped) == (10000, 0)
    first = dataset.requests[0]
    assert (first.prompt, first.target_new, first.target_true) == (
        "The mother tongue of Danielle Darrieux is",
        "English",
        "French",
    )


def test_real_counterfact_preview_is_nested() -> None:
    dataset = shared("counterfact", "preview")
    assert (dataset.format, dataset.style, dataset.n_records) == (
        "counterfact_nested",
        "counterfact",
        7,
    )
    first = dataset.requests[0]
    assert first.prompt == "The mother tongue of Danielle Darrieux is"
    assert first.id == "0"
    assert first.locality and all(answer == "French" for _, answer in first.locality)
    assert all(len(r.generation_prompts) >= 5 for r in dataset.requests)
    assert first.generation_prompts[0].startswith("Danielle Darrieux")


def test_real_knowedit() -> None:
    dataset = shared("knowedit", "train", skip_invalid=True)
    assert (dataset.format, dataset.style) == ("knowedit", "qa")
    # Three records have an empty ground truth (one main, two locality answers).
    assert (dataset.n_records, dataset.n_skipped) == (1428, 3)
    first = dataset.requests[0]
    assert (first.target_new, first.target_true) == ("Franche-Comté", "France")
    assert first.locality == (("The name of the founder of Goursez Vreizh is", "Jean Le Fustec"),)
    assert first.portability == (
        (
            "The name of the capital city of the country Goursez Vreizh is associated with is",
            "Besançon",
        ),
        (
            "The name of the country which Gorsedd of Brittany is associated with is",
            "Franche-Comté",
        ),
    )
    # Every portability group of the file is read: reasoning, aliases, logical generalization.
    assert sum(len(r.portability) for r in dataset.requests) >= 2200  # of 2219 in the file


def test_real_files_match_the_manifest() -> None:
    infos = [info for info in list_datasets() if info.name != "builtin"]
    present = [info for info in infos if info.present]
    if not present:
        pytest.skip(f"no benchmark files under {data_dir()}; set LLEDIT_DATA_DIR")
    for info in present:
        assert info.sha256_ok is True, info
        assert info.records == info.expected_records, info


def test_seeded_real_sample_is_reproducible() -> None:
    first = shared("zsre", "eval", seed=0, limit=50)
    again = shared("zsre", "eval", seed=0, limit=50)
    assert first.requests == again.requests
    assert first.requests != shared("zsre", "eval", limit=50).requests


# The built-in sample shipped in the package ----------------------------------------------


def builtin(split: str) -> EditDataset:
    path = _path_of("builtin", split)
    if not path.is_file():
        pytest.skip(f"built-in sample {path} not written yet")
    return load_dataset("builtin", split)


def test_builtin_sample() -> None:
    splits = {split: builtin(split) for split in ("train", "eval")}
    assert len(splits["eval"].requests) >= 100
    assert sum(len(dataset.requests) for dataset in splits.values()) >= 200
    for dataset in splits.values():
        assert dataset.n_skipped == 0
        for request in dataset.requests:
            assert request.target_true and request.rephrases and request.locality, request
    train_prompts = {request.prompt for request in splits["train"].requests}
    assert not train_prompts & {request.prompt for request in splits["eval"].requests}
    infos = [info for info in list_datasets() if info.name == "builtin"]
    assert all(info.present and info.sha256_ok is None for info in infos)


def test_text_that_cannot_be_stored_is_refused_with_its_field(tmp_path):
    with pytest.raises(
        InvalidEditError, match=r"field 'prompt': holds a lone surrogate \(U\+D800\)"
    ):
        EditRequest("The capital \ud800", "x")
    with pytest.raises(InvalidEditError, match=r"locality\[0\].answer': holds a control character"):
        EditRequest("p", "x", locality=[("q", "a\x1bb")])
    assert EditRequest("line one\n\tline two", "x").prompt == "line one\n\tline two"
    path = tmp_path / "edits.jsonl"
    path.write_text(
        '{"prompt": "fine", "target_new": "x"}\n{"prompt": "bad\\u0000", "target_new": "x"}\n'
    )
    with pytest.raises(InvalidEditError, match=r"edits.jsonl, record 1: field 'prompt'"):
        load_dataset(str(path))
