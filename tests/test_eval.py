import json

import pytest
import torch
from conftest import PROMPTS

from lledit import EditRequest, run_lifelong
from lledit.eval import LifelongResult, evaluate, locality_reference, markdown_table, plot_curves
from lledit.eval.scoring import score_pairs
from lledit.methods import make_editor

TARGETS = ["Paris", "J. K. Rowling", "Cupertino", "Au", "French"]


def test_left_and_right_padding_score_the_same(tiny):
    right = score_pairs(tiny, PROMPTS, TARGETS, batch_size=5, padding_side="right")
    left = score_pairs(tiny, PROMPTS, TARGETS, batch_size=5, padding_side="left")
    torch.testing.assert_close(left.logprob, right.logprob, atol=1e-4, rtol=1e-4)
    assert torch.equal(left.token_accuracy, right.token_accuracy)


def test_batched_scores_equal_one_at_a_time(tiny):
    batched = score_pairs(tiny, PROMPTS, TARGETS, batch_size=64)
    for index, (prompt, target) in enumerate(zip(PROMPTS, TARGETS, strict=True)):
        single = score_pairs(tiny, [prompt], [target], batch_size=1)
        torch.testing.assert_close(single.logprob[0], batched.logprob[index], atol=1e-4, rtol=0)
        assert torch.equal(single.predictions[0], batched.predictions[index])


def test_scores_match_a_plain_forward(tiny):
    scores = score_pairs(tiny, PROMPTS[:1], TARGETS[:1])
    ids = tiny.tokenizer(f"{PROMPTS[0]} {TARGETS[0]}", return_tensors="pt")["input_ids"]
    n_prompt = len(tiny.tokenizer(PROMPTS[0])["input_ids"])
    with torch.no_grad():
        logprobs = tiny.model(ids).logits[0].float().log_softmax(-1)
    targets = ids[0, n_prompt:]
    expected = logprobs[n_prompt - 1 : -1].gather(1, targets[:, None]).sum()
    torch.testing.assert_close(scores.logprob[0], expected, atol=1e-4, rtol=1e-4)
    predicted = logprobs[n_prompt - 1 : -1].argmax(-1)
    assert torch.equal(scores.predictions[0], predicted)
    assert scores.token_accuracy[0] == (predicted == targets).float().mean()


def test_qa_metrics_are_token_accuracies(tiny, requests_small):
    reference = locality_reference(tiny, requests_small)
    averages, per_edit = evaluate(tiny, requests_small, reference=reference)
    prompts = [r.prompt for r in requests_small]
    new = score_pairs(tiny, prompts, [r.target_new for r in requests_small])
    assert [row["efficacy"] for row in per_edit] == new.token_accuracy.tolist()
    assert [row["efficacy_exact"] for row in per_edit] == new.exact.float().tolist()
    gold = score_pairs(tiny, *zip(*[r.locality[0] for r in requests_small], strict=True))
    assert [row["specificity"] for row in per_edit] == gold.token_accuracy.tolist()
    assert averages["locality"] == 1.0


def test_qa_metrics_without_rephrases_or_reference(tiny):
    averages, per_edit = evaluate(tiny, [EditRequest("The capital of France is", "Rome")])
    assert set(averages) == {"efficacy", "efficacy_exact"}
    assert per_edit[0]["generalization"] is None and per_edit[0]["locality"] is None


def test_counterfact_metrics_compare_probabilities(tiny, requests_small):
    averages, per_edit = evaluate(tiny, requests_small, style="counterfact")
    assert set(averages) == {"efficacy", "generalization", "specificity"}
    new = score_pairs(
        tiny, [r.prompt for r in requests_small], [r.target_new for r in requests_small]
    )
    true = score_pairs(
        tiny, [r.prompt for r in requests_small], [r.target_true for r in requests_small]
    )
    assert [row["efficacy"] for row in per_edit] == (new.logprob > true.logprob).float().tolist()


def test_counterfact_metrics_need_target_true(tiny):
    with pytest.raises(ValueError, match="no target_true"):
        evaluate(tiny, [EditRequest("The capital of France is", "Rome")], style="counterfact")


def test_lifelong_run_curve_timing_and_json(tiny, requests_small, tmp_path):
    editor = make_editor("ft", tiny, lr=0.05, norm_bound=0.5, steps=5)
    result = run_lifelong(tiny, editor, requests_small, batch_size=1, eval_every=2, seed=3)
    assert result.n_edits == 3 and result.batch_size == 1 and result.seed == 3
    assert [point["edits"] for point in result.curve] == [2, 3]
    assert result.curve[-1]["efficacy"] == result.metrics["efficacy"]
    assert set(result.timing) == {"setup_s", "edit_s", "eval_s", "per_edit_s"}
    assert result.timing["edit_s"] > 0 and result.peak_memory_mb > 0
    assert len(result.per_edit) == 3
    result.save(tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "ft"
    assert LifelongResult.load(tmp_path / "results.json") == result

    table = markdown_table([result])
    assert "| ft |" in table and "efficacy" in table and "per_edit_s" in table
    png = plot_curves([result], tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lifelong_rejects_bad_arguments(tiny, requests_small):
    editor = make_editor("none", tiny)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        run_lifelong(tiny, editor, requests_small, batch_size=0)
    with pytest.raises(ValueError, match="no edit requests"):
        run_lifelong(tiny, editor, [], batch_size=1)
    with pytest.raises(ValueError, match="eval_every"):
        run_lifelong(tiny, editor, requests_small, batch_size=1, eval_every=0)


def test_no_curve_no_plot(tiny, requests_small, tmp_path):
    result = run_lifelong(tiny, make_editor("none", tiny), requests_small, batch_size=2)
    assert result.curve == []
    assert result.metrics["locality"] == 1.0
    assert plot_curves([result], tmp_path / "curve.png") is None
    assert not (tmp_path / "curve.png").exists()


def test_by_age_groups_edits_oldest_first():
    from lledit.eval.report import by_age

    result = LifelongResult(
        method="m", method_config={}, model="x", dataset={"style": "qa"}, n_edits=20,
        batch_size=2, seed=0, metrics={}, timing={}, peak_memory_mb=0.0,
        per_edit=[{"efficacy": float(i >= 10), "efficacy_em": None} for i in range(20)],
    )  # fmt: skip
    assert by_age(result, "efficacy") == [0.0] * 5 + [1.0] * 5
    assert by_age(result, "efficacy_em") == [None] * 10
    assert by_age(result, "efficacy", bins=4) == [0.0, 0.0, 1.0, 1.0]


def test_run_labels_mark_how_eos_was_used_while_editing():
    from lledit.eval.report import run_label

    def labelled(method_config, protocol):
        result = LifelongResult(
            method="locft", method_config=method_config, model="x", dataset={}, n_edits=1,
            batch_size=1, seed=0, metrics={}, timing={}, peak_memory_mb=0.0, protocol=protocol,
        )  # fmt: skip
        return run_label(result)

    assert labelled({"append_eos": True}, {}) == "locft"
    assert labelled({"append_eos": False}, {}) == "locft-eos"
    assert labelled({}, {"append_eos": True, "chat_template": True}) == "locft+eos+chat"
