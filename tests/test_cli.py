import json

import pytest
from typer.testing import CliRunner

from lledit import METHODS
from lledit import model as model_module
from lledit.cli import app
from lledit.methods import is_trained

runner = CliRunner()


@pytest.fixture
def tiny_dir(tiny, tmp_path):
    folder = tmp_path / "model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def bench(*arguments):
    return runner.invoke(app, ["bench", *arguments], catch_exceptions=False)


def test_bench_writes_results_table_and_curve(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = bench(
        "--method", "ft", "--model", str(tiny_dir), "--edits", "6", "--batch-size", "3",
        "--eval-every", "1", "--set", "steps=2", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "ft" and saved["n_edits"] == 6 and saved["batch_size"] == 3
    assert saved["dataset"]["name"] == "builtin/eval"
    assert saved["method_config"]["steps"] == 2
    assert {"efficacy", "generalization", "specificity", "locality"} <= set(saved["metrics"])
    assert {"setup_s", "edit_s", "eval_s", "per_edit_s"} <= set(saved["timing"])
    assert [point["edits"] for point in saved["curve"]] == [3, 6]
    assert "| ft |" in (out / "results.md").read_text()
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_refuses_a_model_and_method_that_will_not_fit_before_loading(
    tiny, tiny_dir, tmp_path, monkeypatch
):
    weights = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
    monkeypatch.setattr(model_module, "free_memory", lambda device: weights + 1)
    out = tmp_path / "run"
    result = bench("--method", "memit", "--model", str(tiny_dir), "--edits", "2", "--out", str(out))
    assert result.exit_code == 2
    assert "for memit's own tensors" in result.output and "cpu has" in result.output
    assert not out.exists()


def test_bench_compares_methods(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = bench(
        "--method", "none", "--method", "ft", "--model", str(tiny_dir), "--edits", "4",
        "--set", "ft.steps=1", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "none" / "results.json").exists() and (out / "ft" / "results.json").exists()
    table = (out / "results.md").read_text()
    assert "| none |" in table and "| ft |" in table
    assert not (out / "curve.png").exists()


def test_bench_runs_every_method_that_needs_no_training(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    untrained = [name for name in METHODS if not is_trained(name)]
    fast = ["ft.steps=1", "locft.epochs=1", "elder.steps=1", "grace.steps=1", "memoir.steps=1"]
    fast += [f"{method}.{setting}" for method in ("memit", "alphaedit")
             for setting in ("stats_samples=600", "prefix_count=1", "value_steps=1")]  # fmt: skip
    out = tmp_path / "run"
    arguments = [part for method in untrained for part in ("--method", method)]
    arguments += [part for setting in fast for part in ("--set", setting)]
    result = bench(*arguments, "--model", str(tiny_dir), "--edits", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    for method in untrained:
        assert (out / method / "results.json").is_file(), method


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "ft", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--method", "ft", "--data", "no-such-set"], "unknown dataset 'no-such-set'"),
        (["--method", "ft", "--set", "rank=3"], "no method among ['ft'] has a setting 'rank'"),
        (["--method", "ft", "--set", "steps=lots"], "cannot read 'lots'"),
        (["--method", "ft", "--split", "test"], "has no split 'test'"),
    ],
)
def test_bench_bad_input_is_a_clear_error(arguments, message, tmp_path):
    result = bench(*arguments, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_methods_lists_settings():
    result = runner.invoke(app, ["methods"], terminal_width=200)
    assert result.exit_code == 0
    assert "ft" in result.output and "norm_bound=0.01" in result.output


def test_data_list_shows_builtin(monkeypatch, tmp_path):
    monkeypatch.setenv("LLEDIT_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["data", "list"], terminal_width=200)
    assert result.exit_code == 0
    assert "builtin" in result.output and "missing" in result.output


def test_bench_answer_scoring_general_abilities_and_report(tiny_dir, tmp_path, monkeypatch):
    general = tmp_path / "data" / "general"
    general.mkdir(parents=True)
    records = [{"sentence": f"film {i} was {'good' if i % 2 else 'bad'}", "label": i % 2}
               for i in range(20)]  # fmt: skip
    (general / "sst2.json").write_text(json.dumps(records))
    monkeypatch.setenv("LLEDIT_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "run"
    result = bench(
        "--method", "none", "--method", "ft", "--model", str(tiny_dir), "--edits", "6",
        "--batch-size", "3", "--set", "steps=2", "--scoring", "answer", "--append-eos",
        "--general", "sst2", "--general-items", "8", "--general-shots", "1", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "ft" / "results.json").read_text())
    assert {"efficacy_em", "efficacy_prefix", "locality_same"} <= set(saved["metrics"])
    assert "efficacy" not in saved["metrics"]
    assert saved["protocol"]["append_eos"] and not saved["protocol"]["chat_template"]
    unedited = json.loads((out / "none" / "results.json").read_text())
    assert saved["general"]["before"] == unedited["general"]["before"]
    assert unedited["general"]["after"] == unedited["general"]["before"]
    assert saved["general"]["after"]["tasks"]["sst2"]["items"] == 8
    assert "| ft+eos |" in (out / "results.md").read_text()

    report_dir = tmp_path / "report"
    report = runner.invoke(app, ["report", str(out), "--out", str(report_dir)])
    assert report.exit_code == 0, report.output
    text = (report_dir / "report.md").read_text()
    assert "| none+eos |" in text and "| ft+eos |" in text and "General abilities" in text
    for name in ("comparison.png", "retention_by_age.png"):
        assert (report_dir / name).read_bytes()[:4] == b"\x89PNG"


def test_bench_and_report_refuse_bad_input(tmp_path):
    result = bench("--method", "none", "--scoring", "vibes", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "--scoring must be one of teacher, answer, both" in result.output
    result = bench("--method", "none", "--general", "sst2,squad", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "known tasks: sst2" in result.output
    report = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert report.exit_code == 2 and "no results.json" in report.output
