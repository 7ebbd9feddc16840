import json

import pytest
from typer.testing import CliRunner

from lledit.cli import app

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
