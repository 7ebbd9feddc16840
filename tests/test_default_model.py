"""Integration tests on the real default model, SmolLM2-135M-Instruct."""

import pytest
import torch
from conftest import assert_weights_equal, snapshot
from fastapi.testclient import TestClient

from lledit import EditRequest, evaluate, load_dataset, load_model, make_editor
from lledit.eval.scoring import score_pairs
from lledit.journal import Journal, JournaledModel
from lledit.model import default_model_cache
from lledit.server import create_app

pytestmark = pytest.mark.slow


def test_default_model_loads_and_knows_a_fact(default_handle):
    assert default_handle.name == "SmolLM2-135M-Instruct"
    assert default_handle.arch.name == "llama" and default_handle.num_layers == 30
    assert default_handle.dtype == torch.float32
    averages, _ = evaluate(default_handle, [EditRequest("The capital of France is", "Paris")])
    assert averages["efficacy_exact"] == 1.0


def test_ft_writes_ten_builtin_edits_and_undo_restores_weights(default_handle):
    requests = load_dataset("builtin", "eval", limit=10).requests
    before = snapshot(default_handle)
    editor = make_editor("ft", default_handle)
    applied = editor.apply(requests)
    try:
        averages, _ = evaluate(default_handle, requests)
        assert averages["efficacy"] >= 0.9
    finally:
        applied.undo()
    assert_weights_equal(default_handle, before)


def test_left_and_right_padding_agree_on_the_real_model(default_handle):
    requests = load_dataset("builtin", "eval", limit=16).requests
    prompts = [r.prompt for r in requests] + [p for r in requests for p, _ in r.locality]
    targets = [r.target_new for r in requests] + [a for r in requests for _, a in r.locality]
    right = score_pairs(default_handle, prompts, targets, padding_side="right")
    left = score_pairs(default_handle, prompts, targets, padding_side="left")
    torch.testing.assert_close(left.logprob, right.logprob, atol=2e-3, rtol=1e-4)
    assert torch.equal(left.token_accuracy, right.token_accuracy)


def test_bfloat16_edit_and_exact_undo():
    handle = load_model(dtype="bfloat16")
    requests = load_dataset("builtin", "eval", offset=10, limit=10).requests
    before = snapshot(handle)
    efficacy_before = evaluate(handle, requests)[0]["efficacy"]
    applied = make_editor("ft", handle).apply(requests)
    assert evaluate(handle, requests)[0]["efficacy"] >= efficacy_before + 0.5
    applied.undo()
    assert_weights_equal(handle, before)


def test_default_model_cache_is_written_once_and_reloads_identically(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = default_model_cache()
    assert cache.is_relative_to(tmp_path)
    first = load_model()
    assert (cache / "model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.partial"))
    written = (cache / "model.safetensors").stat().st_mtime_ns
    second = load_model()
    assert (cache / "model.safetensors").stat().st_mtime_ns == written
    assert_weights_equal(second, snapshot(first))


def test_rledit_trains_on_builtin_edits_then_edits_and_undoes_exactly(
    default_handle, tmp_path, monkeypatch
):
    from lledit.hypernet.training import HypernetTrainer
    from lledit.methods import RLEdit, train_config_class

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train = load_dataset("builtin", "train", limit=60).requests
    # Key statistics over 4000 keys: few enough to compute in well under a minute.
    config = train_config_class("rledit")(
        steps=4, trajectory_length=2, validation_edits=10, warmup_batches=2, key_samples=4000
    )
    assert config.key_ridge
    before = snapshot(default_handle)
    trainer = HypernetTrainer(default_handle, RLEdit, config, train, tmp_path, {"name": "builtin"})
    trainer.train()
    assert_weights_equal(default_handle, before)  # trajectories restore the model

    requests = load_dataset("builtin", "eval", limit=10).requests
    unedited, _ = evaluate(default_handle, requests)
    editor = make_editor("rledit", default_handle, checkpoint=str(tmp_path))
    editor.prepare()
    applied = editor.apply(requests)
    try:
        edited, _ = evaluate(default_handle, requests)
        assert edited["efficacy"] > unedited["efficacy"] + 0.2
    finally:
        applied.undo()
    assert_weights_equal(default_handle, before)


def test_unedited_model_does_not_say_the_new_answers(default_handle):
    from lledit.eval.answers import evaluate_answers

    requests = load_dataset("zsre", "eval", limit=20).requests
    averages, _ = evaluate_answers(default_handle, requests)
    assert averages["efficacy_em"] == 0.0 and averages["efficacy_prefix"] <= 0.05


def test_appending_eos_teaches_grace_to_stop(default_handle):
    from lledit import run_lifelong

    # zsRE targets are phrases the model runs on past (the built-in sample's
    # short answers it already ends with a period).
    try:
        requests = load_dataset("zsre", "eval", limit=10).requests
    except FileNotFoundError:
        pytest.skip("the zsRE eval file is not in the data directory")
    strict = {}
    for append_eos in (False, True):
        editor = make_editor("grace", default_handle)
        try:
            result = run_lifelong(
                default_handle, editor, requests, 10, scoring="answer",
                append_eos=append_eos,
            )  # fmt: skip
        finally:
            editor.remove()
        strict[append_eos] = result.metrics["efficacy_em"]
    # Without EOS GRACE's answers run on past the new target (0.0 of 10 stop
    # there, measured); with it they stop (1.0).
    assert strict[True] >= strict[False] + 0.5


def test_elder_is_served_and_undone_exactly_on_the_default_model(default_handle, tmp_path):
    editor = make_editor("elder", default_handle)
    edit = {"prompt": "The capital of France is", "target_new": "Lyon"}
    unrelated = "The chemical symbol for gold is"
    try:
        with Journal(tmp_path / "j.db") as journal:
            served = JournaledModel(default_handle, journal, editor)
            app = create_app(served, max_batch_size=10, max_body_bytes=100_000)
            with TestClient(app) as client:

                def answer(prompt: str) -> str:
                    body = {"prompt": prompt, "max_new_tokens": 8}
                    return client.post("/v1/generate", json=body).json()["text"]

                before = answer(unrelated), answer(edit["prompt"])
                applied = client.post("/v1/edits", json={"edits": [edit]}).json()
                assert applied["status"] == "applied"
                assert answer(edit["prompt"]).strip().startswith("Lyon")
                assert answer(unrelated) == before[0]  # byte for byte the unedited model's
                assert client.delete(f"/v1/batches/{applied['batch_id']}").status_code == 200
                assert (answer(unrelated), answer(edit["prompt"])) == before
    finally:
        editor.remove()
