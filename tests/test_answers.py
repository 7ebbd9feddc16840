"""Answer scoring: greedy answers, their cut, normalisation, and the answer metrics."""

import pytest
import torch
from conftest import PROMPTS

from lledit import EditRequest, run_lifelong
from lledit.eval.answers import (
    ANSWER_METRICS,
    answer_matches,
    answer_reference,
    evaluate_answers,
    ngram_entropy,
    normalize_answer,
)
from lledit.eval.generation import cut_answer, generate_answers, generate_continuations
from lledit.eval.metrics import evaluate
from lledit.methods import make_editor
from lledit.tokens import encode_pairs, in_chat_template, with_eos

ELDER_ALWAYS = {"deferral_radius": 100}


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (" Paris. It is", "Paris"),
        ("\n\nParis\nThe", "Paris"),
        (" J. K. Rowling, who wrote", "J. K. Rowling"),
        (" 3.5 million people", "3.5 million people"),
        (" yes; and", "yes"),
        ("   ", ""),
    ],
)
def test_cut_answer_stops_at_newline_or_clause_end(text, answer):
    assert cut_answer(text) == answer


def test_normalisation_and_matching_follow_squad():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffel tower"
    assert answer_matches("the Beatles.", "Beatles") == (True, True)
    assert answer_matches("Beatles and Wings", "Beatles") == (False, True)
    assert answer_matches("Beatlesque", "Beatles") == (False, False)
    assert answer_matches("Paris", "Rome") == (False, False)
    # A target that normalises to nothing is compared as it is, not matched by everything.
    assert answer_matches("Paris", "The") == (False, False)
    assert answer_matches("the", "The") == (True, True)


def test_ngram_entropy_is_low_for_repetition():
    varied = "the cat sat on the mat while a dog ran past the old red barn"
    repeated = "the cat the cat the cat the cat the cat the cat the cat"
    assert ngram_entropy(repeated) < ngram_entropy(varied)
    assert ngram_entropy("one") == 0.0


def one_at_a_time(handle, prompts, budgets, **options):
    return [
        generate_continuations(handle, [p], [b], batch_size=1, **options)[0]
        for p, b in zip(prompts, budgets, strict=True)
    ]


@pytest.mark.parametrize("stop_at_answer_end", [True, False])
def test_batched_generation_equals_one_at_a_time(tiny, stop_at_answer_end):
    budgets = [3, 6, 2, 5, 4]
    options = {"stop_at_answer_end": stop_at_answer_end}
    batched = generate_continuations(tiny, PROMPTS, budgets, batch_size=4, **options)
    assert batched == one_at_a_time(tiny, PROMPTS, budgets, **options)
    assert generate_answers(tiny, PROMPTS, budgets, batch_size=3) == [
        cut_answer(text) for text in one_at_a_time(tiny, PROMPTS, budgets)
    ]


def test_generation_is_the_greedy_continuation(tiny):
    (text,) = generate_continuations(tiny, PROMPTS[:1], [5], stop_at_answer_end=False)
    ids = tiny.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            next_id = tiny.model(ids).logits[0, -1].argmax()
            if next_id == tiny.tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    expected = tiny.tokenizer.decode(ids[0, len(tiny.tokenizer(PROMPTS[0])["input_ids"]) :])
    assert text == expected


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("grace", {"radius": 1e-3}),
        ("elder", ELDER_ALWAYS),
        ("elder", {**ELDER_ALWAYS, "batch_rank": 4}),
        ("memoir", {"threshold": 0.05}),
    ],
)
def test_memory_editors_generate_in_batches_like_one_at_a_time(
    tiny, requests_small, method, settings
):
    make_editor(method, tiny, **settings).apply(requests_small)
    prompts = [r.prompt for r in requests_small] + PROMPTS
    budgets = [6] * len(prompts)
    assert generate_continuations(tiny, prompts, budgets, batch_size=5) == one_at_a_time(
        tiny, prompts, budgets
    )


def test_elder_answers_with_the_edit_it_learned_teacher_forced(tiny, requests_small):
    make_editor("elder", tiny, **ELDER_ALWAYS).apply(requests_small)
    _, per_edit = evaluate(tiny, requests_small)
    learned = [r for r, row in zip(requests_small, per_edit, strict=True) if row["efficacy_exact"]]
    assert learned
    # The prompt's routing holds for every generated token, so what was learned
    # with the target fed in is what the model says.
    budgets = [len(tiny.tokenizer(" " + r.target_new)["input_ids"]) for r in learned]
    said = generate_continuations(
        tiny, [r.prompt for r in learned], budgets, stop_at_answer_end=False
    )
    assert said == [" " + r.target_new for r in learned]


def test_answer_metrics_of_the_unedited_model(tiny, requests_small):
    reference = answer_reference(tiny, requests_small)
    averages, per_edit = evaluate_answers(tiny, requests_small, reference=reference)
    assert averages["locality_same"] == 1.0
    assert set(averages) <= set(ANSWER_METRICS)
    assert {"efficacy_em", "efficacy_prefix", "generalization_em", "specificity_prefix"} <= set(
        averages
    )
    assert "portability_em" not in averages and "fluency" not in averages
    locality_answers = generate_answers(
        tiny, [r.locality[0][0] for r in requests_small], [10, 10, 10]
    )
    for row, answer, request in zip(per_edit, locality_answers, requests_small, strict=True):
        assert row["specificity_em"] == float(answer_matches(answer, request.locality[0][1])[0])


def test_portability_and_fluency_are_scored_where_the_data_has_them(tiny):
    request = EditRequest(
        "The capital of France is",
        "Rome",
        portability=[("The capital of the country of the Eiffel Tower is", "Rome")],
        generation_prompts=["France is", "The French capital"],
    )
    averages, per_edit = evaluate_answers(tiny, [request])
    assert {"portability_em", "portability_prefix", "fluency"} <= set(averages)
    assert per_edit[0]["fluency"] >= 0.0
    teacher, _ = evaluate(tiny, [request])
    assert {"portability", "portability_exact"} <= set(teacher)


def test_with_eos_appends_the_eos_token(tiny):
    request = with_eos(tiny.tokenizer, EditRequest("The capital of France is", "Rome"))
    (pair,) = encode_pairs(tiny.tokenizer, [request.prompt], [request.target_new])
    assert pair.target_ids[-1] == tiny.tokenizer.eos_token_id
    assert len(pair.target_ids) >= 2


def test_chat_template_wraps_every_prompt(tiny, requests_small):
    with pytest.raises(ValueError, match="no chat template"):
        in_chat_template(tiny.tokenizer, requests_small[0])
    tiny.tokenizer.chat_template = (
        "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}"
    )
    try:
        wrapped = in_chat_template(tiny.tokenizer, requests_small[0])
    finally:
        tiny.tokenizer.chat_template = None
    assert wrapped.prompt == f"<user>{requests_small[0].prompt}</user><bot>"
    assert wrapped.rephrases[0].startswith("<user>") and wrapped.locality[0][0].endswith("<bot>")
    assert wrapped.target_new == requests_small[0].target_new


class RecordingEditor:
    """Records the batches it is given; changes nothing."""

    name = "recording"

    def __init__(self):
        self.batches = []

    def prepare(self):
        return None

    def apply(self, batch):
        self.batches.append(list(batch))

    def config_dict(self):
        return {}


@pytest.mark.parametrize("scoring", ["teacher", "answer", "both"])
def test_scoring_modes_choose_the_metric_families(tiny, requests_small, scoring):
    editor = RecordingEditor()
    result = run_lifelong(tiny, editor, requests_small, 2, scoring=scoring, append_eos=True)
    has_teacher = "efficacy" in result.metrics
    has_answer = "efficacy_em" in result.metrics
    assert (has_teacher, has_answer) == (scoring != "answer", scoring != "teacher")
    assert result.protocol["scoring"] == scoring and result.protocol["append_eos"] is True
    eos = tiny.tokenizer.eos_token
    written = [request.target_new for batch in editor.batches for request in batch]
    assert written == [request.target_new + eos for request in requests_small]
    assert ("efficacy_em" in result.per_edit[0]) == has_answer


def test_unknown_scoring_is_refused(tiny, requests_small):
    with pytest.raises(ValueError, match="unknown scoring"):
        run_lifelong(tiny, RecordingEditor(), requests_small, 2, scoring="vibes")
