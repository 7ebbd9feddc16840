"""Locate-then-edit: subject tokens, closed forms, MEMIT and AlphaEdit."""

import contextlib
import importlib.metadata
import json

import pytest
import torch
from conftest import assert_weights_equal, snapshot
from transformers import AutoTokenizer
from typer.testing import CliRunner

from lledit import EditRequest, evaluate, load_dataset, make_editor
from lledit.cli import app
from lledit.edit import NonFiniteUpdateError
from lledit.eval.scoring import score_pairs
from lledit.locate import LocateConfig, SubjectNotFoundError, subject_span, token_positions
from lledit.locate.values import target_values
from lledit.methods import parse_settings
from lledit.methods.alphaedit import alphaedit_delta
from lledit.methods.memit import memit_delta
from lledit.model import ModelHandle, default_model_cache
from lledit.stats import null_space_projection

FAST = {"layers": "1,2", "stats_samples": 2000, "prefix_count": 2, "prefix_length": 3}
"""Small settings for the tiny models: two layers, few statistics, short prefixes."""


def _editor(method, handle, **settings):
    """An editor with `FAST` settings; AlphaEdit gets a wide null space, since the
    tiny random models' keys fill their few dimensions evenly."""
    if method == "alphaedit":
        settings.setdefault("null_space_threshold", 0.5)
    return make_editor(method, handle, **FAST, **settings)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Key statistics go to a fresh cache directory, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _smollm2_tokenizer():
    try:
        path = default_model_cache()
    except importlib.metadata.PackageNotFoundError:
        return None
    return AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else None


SMOLLM2_TOKENIZER = _smollm2_tokenizer()


# Subject positions ----------------------------------------------------------------------------

SUBJECT_CASES = [
    ("The capital of France is", "France"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Danielle Darrieux speaks the language", "Danielle Darrieux"),
    ("France is a country in", "France"),
    ("Harry Potter was written by", "Harry Potter"),
    ("What is the native language of Danielle Darrieux?", "Danielle Darrieux"),
]


def _check_subject_positions(tokenizer):
    requests = [EditRequest(prompt, "x", subject=subject) for prompt, subject in SUBJECT_CASES]
    prefix = "Some words before. "
    texts = [r.prompt for r in requests] + [prefix + r.prompt for r in requests]
    spans = [subject_span(r) for r in requests]
    spans += [(s + len(prefix), e + len(prefix)) for s, e in spans]
    ids, positions = token_positions(tokenizer, texts, spans)
    for text, span, row, position in zip(texts, spans, ids, positions, strict=True):
        subject = text[span[0] : span[1]]
        assert row == tokenizer(text)["input_ids"]
        # The subject ends in this token and not before it.
        assert tokenizer.decode(row[: position + 1]).endswith(subject), (text, position)
        assert not tokenizer.decode(row[:position]).endswith(subject), (text, position)


def test_subject_positions_gpt2_style_tokenizer(tokenizer):
    # This tokenizer merges the space before a word into the word's first token.
    assert tokenizer.convert_ids_to_tokens(tokenizer(" France")["input_ids"])[0].startswith("Ġ")
    _check_subject_positions(tokenizer)


@pytest.mark.skipif(SMOLLM2_TOKENIZER is None, reason="the default model is not cached here")
def test_subject_positions_smollm2_tokenizer():
    _check_subject_positions(SMOLLM2_TOKENIZER)


def test_subject_matching_rules(tokenizer):
    request = EditRequest("The capital of France is", "Rome", subject="france")
    assert subject_span(request) == (15, 21)
    exact = EditRequest("France, and france again", "x", subject="france")
    assert subject_span(exact) == (12, 18)
    assert subject_span(EditRequest("The capital of France is", "Rome")) is None
    _, positions = token_positions(tokenizer, ["The capital of France is"], [None])
    assert positions == [len(tokenizer("The capital of France is")["input_ids"]) - 1]
    missing = EditRequest("The capital of France is", "Rome", subject="Spain", id="q7")
    with pytest.raises(SubjectNotFoundError, match=r"'q7'.*'Spain'"):
        subject_span(missing)


# Closed forms ---------------------------------------------------------------------------------


def test_memit_closed_form_is_the_least_squares_solution():
    torch.manual_seed(0)
    d_out, d_in, edits, ordinary, weight = 5, 8, 3, 20, 3.0
    keys = torch.randn(d_in, edits, dtype=torch.float64)
    residual = torch.randn(d_out, edits, dtype=torch.float64)
    preserved = torch.randn(d_in, ordinary, dtype=torch.float64)
    covariance = preserved @ preserved.T / ordinary
    delta = memit_delta(residual, keys, covariance, weight)
    # min ‖ΔW K - R‖² + λ‖ΔW K₀‖²/n₀ as one stacked least-squares problem.
    system = torch.cat([keys.T, (weight / ordinary) ** 0.5 * preserved.T])
    targets = torch.cat([residual.T, torch.zeros(ordinary, d_out, dtype=torch.float64)])
    expected = torch.linalg.lstsq(system, targets).solution.T
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-6)


def _preserved_problem():
    """Ordinary keys spanning 6 of 10 dimensions, new keys, and earlier keys close to them."""
    torch.manual_seed(1)
    d_in, d_out = 10, 4
    preserved = torch.randn(d_in, 6, dtype=torch.float64) @ torch.randn(6, 50, dtype=torch.float64)
    covariance = (preserved @ preserved.T / 50).float()
    keys = torch.randn(d_in, 3, dtype=torch.float64)
    past = keys[:, :2] + 0.3 * torch.randn(d_in, 2, dtype=torch.float64)
    residual = torch.randn(d_out, 3, dtype=torch.float64)
    return preserved, covariance, keys, past, residual


def test_alphaedit_update_leaves_preserved_keys_alone_and_solves_its_objective():
    preserved, covariance, keys, past, residual = _preserved_problem()
    projection = null_space_projection(covariance, 1e-4)
    assert torch.linalg.matrix_rank(projection.double(), atol=1e-4) == 4
    delta = alphaedit_delta(residual, keys, projection, past @ past.T, 1.0).double()
    # Keys of ordinary text: outputs unchanged to float32 precision.
    scale = delta.norm() * preserved.norm(dim=0).max()
    assert (delta @ preserved).abs().max() < 1e-5 * scale
    # The update solves min ‖ΔW K - R‖² + ‖ΔW K_p‖² + ‖ΔW‖² over ΔW = ΔW P.
    p = projection.double()
    torch.testing.assert_close(delta @ p, delta, rtol=0, atol=1e-5)
    gradient = delta @ (keys @ keys.T + past @ past.T) @ p + delta - residual @ keys.T @ p
    assert gradient.abs().max() < 1e-4 * residual.abs().max() * keys.abs().max()
    # Earlier edits' keys: kept in the objective, they move far less than without it.
    forgetful = alphaedit_delta(residual, keys, projection, torch.zeros(10, 10), 1.0).double()
    assert (delta @ past).norm() < 0.5 * (forgetful @ past).norm()
    # Threshold relative to the largest eigenvalue: rescaling C changes nothing.
    torch.testing.assert_close(null_space_projection(covariance * 1e4, 1e-4), projection)


# MEMIT and AlphaEdit on the tiny models -------------------------------------------------------


def _mean_logprob(handle, requests) -> float:
    scores = score_pairs(handle, [r.prompt for r in requests], [r.target_new for r in requests])
    return float(scores.logprob.mean())


# The tiny random models predict almost uniformly and their hidden states are
# small, so an edit can move p(target) only a little: these settings let it.
STRONG = {"memit": {"mom2_weight": 10.0}, "alphaedit": {"l2": 0.1}}


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_edit_raises_target_probability_and_undo_restores_bit_for_bit(tiny, requests_small, method):
    before = snapshot(tiny)
    logprob_before = _mean_logprob(tiny, requests_small)
    editor = _editor(method, tiny, clamp=4.0, **STRONG[method])
    applied = editor.apply(requests_small)
    changed = {n for n, v in tiny.model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == {f"{module}.weight" for module in editor.locator.modules}
    assert _mean_logprob(tiny, requests_small) > logprob_before + 0.05
    applied.undo()
    assert_weights_equal(tiny, before)


def test_target_values_replay_the_layers_below_the_change_with_the_same_result(
    tiny, requests_small, monkeypatch
):
    config = LocateConfig(value_steps=4, early_stop=1.0)
    lower_calls = []  # passes that really compute layer 0: the cache of the
    # columns before the subject, then the rest once, replayed at every later step
    counter = tiny.module(f"{tiny.arch.layers}.0.mlp").register_forward_pre_hook(
        lambda module, args: lower_calls.append(1)
    )
    try:
        replayed = target_values(tiny, requests_small, 2, ["One day", "It was"], config)
        assert len(lower_calls) == 2
        monkeypatch.setattr(ModelHandle, "frozen_below", lambda *args: contextlib.nullcontext())
        recomputed = target_values(tiny, requests_small, 2, ["One day", "It was"], config)
        assert len(lower_calls) == 2 + 1 + config.value_steps + 1
    finally:
        counter.remove()
    assert torch.equal(replayed, recomputed)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_bfloat16_model_and_requests_without_subject(tiny, requests_small, method):
    tiny.model.to(torch.bfloat16)
    before = snapshot(tiny)
    requests = [*requests_small[:2], EditRequest("The largest planet is", "Mars")]
    applied = _editor(method, tiny).apply(requests)
    assert all(torch.isfinite(delta).all() for delta in applied.deltas.values())
    applied.undo()
    assert_weights_equal(tiny, before)


def test_alphaedit_protects_earlier_edits_keys(tiny, requests_small):
    editor = _editor("alphaedit", tiny)
    editor.apply(requests_small[:2])
    earlier = {module: gram.double() for module, gram in editor.past_keys.items()}
    assert set(earlier) == set(editor.locator.modules)
    second = editor.apply(requests_small[2:])
    second.undo()
    for module, gram in earlier.items():  # undo released the second batch's keys
        torch.testing.assert_close(editor.past_keys[module].double(), gram)
    # The same batch on the same model by an editor that forgot the first batch.
    forgetful = _editor("alphaedit", tiny)
    forgetful.projections = editor.projections
    forgetful.locator.prefixes = editor.locator.prefixes
    unprotected = forgetful.apply(requests_small[2:])
    for module, gram in earlier.items():
        projection = editor.projections[module].double()
        protected_delta = second.deltas[module].double()
        # Keys of ordinary text (outside P's range) are left exactly alone.
        identity = torch.eye(len(projection), dtype=torch.float64)
        assert (protected_delta @ (identity - projection)).abs().max() < 1e-5
        # ‖ΔW K_p‖² = tr(ΔW K_p K_pᵀ ΔWᵀ): smaller when the earlier keys are in the objective.
        moved = torch.trace(protected_delta @ gram @ protected_delta.T)
        moved_unprotected = torch.trace(
            unprotected.deltas[module].double() @ gram @ unprotected.deltas[module].double().T
        )
        assert moved < moved_unprotected


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_non_finite_update_is_rejected_and_model_unchanged(tiny, requests_small, method):
    editor = _editor(method, tiny)
    editor.prepare()
    before = snapshot(tiny)
    poison = tiny.module(editor.locator.modules[0]).register_forward_hook(
        lambda module, inputs, output: output * float("nan")
    )
    try:
        with pytest.raises(NonFiniteUpdateError, match="not finite"):
            editor.apply(requests_small)
    finally:
        poison.remove()
    assert_weights_equal(tiny, before)
    if method == "alphaedit":
        assert editor.past_keys == {}


def test_settings_layers_and_modules(tiny):
    editor = make_editor("memit", tiny, layers="1-2")
    assert editor.locator.critical_layer == 2
    assert editor.config_dict()["modules"] == [
        tiny.layer_module(i, tiny.arch.mlp_out) for i in (1, 2)
    ]
    assert make_editor("memit", tiny).locator.layers == tiny.default_layers("lower")
    with pytest.raises(ValueError, match="residual stream"):
        make_editor("memit", tiny, part="mlp_in")
    with pytest.raises(ValueError, match="null_space_threshold"):
        make_editor("alphaedit", tiny, null_space_threshold=0)
    with pytest.raises(ValueError, match="mom2_weight"):
        make_editor("memit", tiny, mom2_weight=-1)
    with pytest.raises(ValueError, match="at least one request"):
        make_editor("alphaedit", tiny).apply([])
    assert parse_settings("alphaedit", ["stats_corpus=c.txt", "stats_samples=500"]) == {
        "stats_corpus": "c.txt",
        "stats_samples": 500,
    }


def test_bench_runs_both_methods_with_a_statistics_corpus(tiny, tmp_path):
    model = tmp_path / "model"
    tiny.model.save_pretrained(model)
    tiny.tokenizer.save_pretrained(model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of France is Paris.\nRome is the capital of Italy.\n" * 20)
    out = tmp_path / "run"
    arguments = [
        "bench", "-m", "memit", "-m", "alphaedit", "--model", str(model), "--edits", "4",
        "--batch-size", "2", "--set", "layers=1,2", "--set", "value_steps=3",
        "--stats-corpus", str(corpus), "--stats-samples", "300", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, arguments, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for method in ("memit", "alphaedit"):
        saved = json.loads((out / method / "results.json").read_text())
        assert saved["method_config"]["stats_corpus"] == str(corpus)
        assert saved["method_config"]["stats_samples"] == 300
        assert saved["method_config"]["layers"] == "1,2"
        assert saved["timing"]["setup_s"] > 0


@pytest.fixture(scope="module")
def real_model_stats(tmp_path_factory):
    """One cache of key statistics for the tests on the real model."""
    return tmp_path_factory.mktemp("real-model-cache")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_builtin_edits_are_written_into_the_real_model(
    default_handle, real_model_stats, monkeypatch, method
):
    # 4000 keys: enough to estimate the statistics of 1536-wide keys, few
    # enough to compute in about half a minute on one CPU thread.
    monkeypatch.setenv("XDG_CACHE_HOME", str(real_model_stats))
    requests = load_dataset("builtin", "eval", limit=5).requests
    before = snapshot(default_handle)
    efficacy_before = evaluate(default_handle, requests)[0]["efficacy"]
    editor = make_editor(method, default_handle, stats_samples=4000)
    assert editor.locator.layers == (4, 5, 6, 7, 8)
    applied = editor.apply(requests)
    try:
        efficacy = evaluate(default_handle, requests)[0]["efficacy"]
        assert efficacy >= 0.9 and efficacy > efficacy_before
    finally:
        applied.undo()
    assert_weights_equal(default_handle, before)
