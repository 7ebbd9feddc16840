"""General-ability scoring: task files, k-shot prompts, option scoring, retention."""

import json
import math

import pytest
from typer.testing import CliRunner

from lledit.cli import app
from lledit.data import data_dir
from lledit.eval.general import (
    TASKS,
    GeneralConfig,
    GeneralDataError,
    Item,
    load_general,
    option_logprobs,
    perplexity,
    retention,
    score_general,
)
from lledit.eval.scoring import score_pairs

runner = CliRunner()


def write_sst2(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sst2.json").write_text(json.dumps(records))
    return folder


def sst2_records(count):
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    return [{"sentence": f"a {words[i % 6]} film number {i}", "label": i % 2} for i in range(count)]


def test_shots_come_from_the_file_and_are_never_scored(tmp_path):
    folder = write_sst2(tmp_path / "general", sst2_records(12))
    suite = load_general(GeneralConfig(tasks=("sst2",), items=8, shots=3), folder)
    items = suite.prompts["sst2"]
    assert len(items) == 8
    shots = items[0].prompt.split("\n\n")[:-1]
    assert len(shots) == 3 and all(item.prompt.split("\n\n")[:-1] == shots for item in items)
    scored = [item.prompt.split("\n\n")[-1] for item in items]
    assert not set(scored) & {shot.rsplit(" ", 1)[0] for shot in shots}
    assert all(item.options == ("negative", "positive") for item in items)
    again = load_general(GeneralConfig(tasks=("sst2",), items=8, shots=3), folder)
    assert again.prompts == suite.prompts and again.sentences == suite.sentences


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"sentence": "a film", "label": 2}], r"record 0, field 'label': label 2 is not one of"),
        ([{"label": 1}], r"record 0, field 'sentence': is missing"),
        (["text"], "record 0: expected a JSON object"),
        ({"sentence": "x"}, "expected a non-empty JSON array"),
    ],
)
def test_bad_task_files_are_named_with_record_and_field(tmp_path, records, message):
    folder = write_sst2(tmp_path / "general", records)
    with pytest.raises(GeneralDataError, match=message):
        load_general(GeneralConfig(tasks=("sst2",), items=1, shots=0), folder)


def test_missing_and_malformed_task_files(tmp_path):
    with pytest.raises(GeneralDataError, match=r"sst2.json not found"):
        load_general(GeneralConfig(tasks=("sst2",)), tmp_path)
    (tmp_path / "sst2.json").write_text("[{")
    with pytest.raises(GeneralDataError, match="malformed JSON"):
        load_general(GeneralConfig(tasks=("sst2",)), tmp_path)
    write_sst2(tmp_path, sst2_records(4))
    with pytest.raises(GeneralDataError, match="has 4 records"):
        load_general(GeneralConfig(tasks=("sst2",), items=4, shots=1), tmp_path)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="known tasks: sst2, mrpc"):
        GeneralConfig(tasks=("sst2", "squad"))
    result = runner.invoke(app, ["general", "--tasks", "squad"])
    assert result.exit_code == 2 and "unknown general task 'squad'" in result.output


def test_every_shared_task_file_loads():
    if not (data_dir() / "general").is_dir():
        pytest.skip("the general task files are not in the data directory")
    suite = load_general(GeneralConfig(items=5, shots=2, perplexity_sentences=20))
    assert list(suite.prompts) == list(TASKS)
    options = {name: len(items[0].options) for name, items in suite.prompts.items()}
    assert options["mmlu"] == 4 and options["dialogue"] == 4 and options["sst2"] == 2
    assert all(0 <= i.label < len(i.options) for items in suite.prompts.values() for i in items)
    assert len(suite.sentences) == 20


def test_one_pass_option_scores_equal_scoring_each_option(tiny):
    items = [
        Item("Is Paris in France? Answer:", ("yes", "no"), 0),
        Item("The capital of Italy is", ("Rome", "Paris Texas"), 0),
    ]
    scores = option_logprobs(tiny, items)
    for item, per_option in zip(items, scores, strict=True):
        expected = score_pairs(tiny, [item.prompt] * len(item.options), list(item.options))
        assert per_option == pytest.approx(expected.logprob.tolist(), abs=1e-4)


def test_score_general_and_retention(tiny, tmp_path):
    folder = write_sst2(tmp_path / "general", sst2_records(30))
    suite = load_general(
        GeneralConfig(tasks=("sst2",), items=20, shots=2, perplexity_sentences=10), folder
    )
    scores = score_general(tiny, suite)
    task = scores["tasks"]["sst2"]
    assert 0 <= task["accuracy"] <= 1 and task["items"] == 20 and task["chance"] == 0.5
    assert task["correct_logprob"] < 0 and scores["perplexity"] > 1
    assert math.isclose(scores["perplexity"], perplexity(tiny, suite.sentences))
    tasks = {"a": {"accuracy": 0.8, "correct_logprob": -0.5, "above_chance": True}}
    tasks["b"] = {"accuracy": 0.5, "correct_logprob": -1.0, "above_chance": False}
    before = {"tasks": tasks, "perplexity": 10.0}
    after = {"tasks": {"a": {"accuracy": 0.6, "correct_logprob": -0.7}}, "perplexity": 12.0}
    after["tasks"]["b"] = {"accuracy": 0.25, "correct_logprob": -1.0}
    summary = retention(before, after)
    assert summary["accuracy_ratio"] == {"a": pytest.approx(0.75), "b": 0.5}
    assert summary["mean_accuracy_ratio"] == pytest.approx(0.75)
    assert summary["tasks_above_chance"] == ["a"]
    assert summary["perplexity_ratio"] == pytest.approx(1.2)
    assert summary["correct_logprob_change"] == {"a": pytest.approx(-0.2), "b": 0.0}
    assert summary["mean_correct_logprob_change"] == pytest.approx(-0.1)


def test_general_command_scores_a_model_and_writes_json(tiny, tmp_path, monkeypatch):
    write_sst2(tmp_path / "data" / "general", sst2_records(20))
    monkeypatch.setenv("LLEDIT_DATA_DIR", str(tmp_path / "data"))
    model_dir = tmp_path / "model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "general.json"
    arguments = ["general", "--tasks", "sst2", "--model", str(model_dir), "--items", "10"]
    result = runner.invoke(app, [*arguments, "--shots", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sst2" in result.output and "perplexity on 20 sentences" in result.output
    scores = json.loads(out.read_text())
    assert scores["tasks"]["sst2"]["items"] == 10
    missing = runner.invoke(app, [*arguments, "--journal", str(tmp_path / "none.db")])
    assert missing.exit_code == 2 and "no journal at" in missing.output


def test_a_tasks_items_do_not_depend_on_the_other_tasks(tmp_path):
    folder = write_sst2(tmp_path / "general", sst2_records(30))
    (folder / "cola.json").write_text(json.dumps(sst2_records(30)))
    alone = load_general(GeneralConfig(tasks=("sst2",), items=5, shots=2), folder)
    both = load_general(GeneralConfig(tasks=("cola", "sst2"), items=5, shots=2), folder)
    assert alone.prompts["sst2"] == both.prompts["sst2"]
