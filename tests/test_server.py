"""The HTTP service on a tiny journaled model: every endpoint, its errors, auth and locking."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import assert_weights_equal, snapshot
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lledit import EditRequest
from lledit.cli import app as app_cli
from lledit.edit import NonFiniteUpdateError
from lledit.eval.scoring import score_pairs
from lledit.journal import APPLIED, FAILED, UNDONE, Journal, JournaledModel
from lledit.methods import make_editor
from lledit.server import ReadWriteLock, create_app

EDITS = [
    {
        "prompt": "The capital of France is",
        "target_new": "Rome",
        "subject": "France",
        "target_true": "Paris",
        "rephrases": ["France's capital is"],
        "locality": [["The chemical symbol for gold is", "Au"]],
        "id": "france",
    },
    {"prompt": "Harry Potter was written by", "target_new": "Stephen King"},
]
OTHER_EDITS = [
    {"prompt": "The Eiffel Tower is located in the city of", "target_new": "Tokyo"},
    {"prompt": "The largest planet is", "target_new": "Mars"},
]
MAX_BATCH_SIZE = 4
MAX_BODY_BYTES = 20_000
TOKEN = "s3cret-token"


@pytest.fixture
def edited(tiny, tmp_path):
    journal = Journal(tmp_path / "j.db")
    editor = make_editor("ft", tiny, steps=2, lr=0.05, norm_bound=0.5)
    yield JournaledModel(tiny, journal, editor)
    journal.close()


@pytest.fixture
def client(edited):
    app = create_app(
        edited,
        max_batch_size=MAX_BATCH_SIZE,
        max_body_bytes=MAX_BODY_BYTES,
        max_concurrent_reads=8,  # more than the threads of the concurrency test
    )
    with TestClient(app) as client:
        yield client


def test_edit_is_journaled_listed_and_fetched(client, edited):
    response = client.post("/v1/edits", json={"edits": EDITS})
    assert response.status_code == 200, response.text
    applied = response.json()
    assert applied["status"] == "applied"
    assert len(applied["edit_ids"]) == 2

    batches = edited.journal.batches()
    assert [(b.id, b.status, list(b.edit_ids)) for b in batches] == [
        (applied["batch_id"], APPLIED, applied["edit_ids"])
    ]
    expected = [EditRequest.from_dict(edit).to_dict() for edit in EDITS]
    assert [record.request.to_dict() for record in edited.journal.edits()] == expected

    listed = client.get("/v1/edits").json()["edits"]
    assert [edit["id"] for edit in listed] == applied["edit_ids"]
    assert [edit["request"] for edit in listed] == expected
    assert {edit["batch_id"] for edit in listed} == {applied["batch_id"]}

    fetched = client.get(f"/v1/edits/{applied['edit_ids'][0]}")
    assert fetched.status_code == 200
    assert fetched.json() == listed[0]
    assert fetched.json()["status"] == "applied"
    assert client.get("/v1/edits/999").status_code == 404

    health = client.get("/v1/health").json()
    assert health == {
        "status": "ok",
        "model": edited.handle.name,
        "method": "ft",
        "batches_applied": 1,
        "editing": False,
    }


def test_generate_and_score(client, edited):
    body = {"prompt": "The capital of France is", "max_new_tokens": 5}
    first = client.post("/v1/generate", json=body)
    assert first.status_code == 200, first.text
    assert isinstance(first.json()["text"], str)
    assert client.post("/v1/generate", json=body).json() == first.json()  # greedy

    candidates = ["Paris", "Rome", "J. K. Rowling"]
    response = client.post("/v1/score", json={"prompt": body["prompt"], "candidates": candidates})
    assert response.status_code == 200, response.text
    scores = response.json()["scores"]
    assert [score["candidate"] for score in scores] == candidates
    direct = score_pairs(edited.handle, [body["prompt"]] * 3, candidates)
    for score, logprob, predicted in zip(scores, direct.logprob, direct.predictions, strict=True):
        assert score["logprob"] == pytest.approx(float(logprob), abs=1e-5)
        assert score["logprob"] < 0
        assert score["tokens"] == len(predicted) > 0


def test_undo_restores_the_exact_weights(client, edited):
    original = snapshot(edited.handle)
    first = client.post("/v1/edits", json={"edits": EDITS}).json()
    after_first = snapshot(edited.handle)
    second = client.post("/v1/edits", json={"edits": OTHER_EDITS}).json()
    assert any(not torch.equal(after_first[n], v) for n, v in snapshot(edited.handle).items())

    response = client.delete(f"/v1/batches/{second['batch_id']}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "undone"
    assert response.json()["edit_ids"] == second["edit_ids"]
    assert_weights_equal(edited.handle, after_first)

    assert client.delete(f"/v1/batches/{first['batch_id']}").status_code == 200
    assert_weights_equal(edited.handle, original)
    assert [b.status for b in edited.journal.batches()] == [UNDONE, UNDONE]
    assert client.get(f"/v1/edits/{first['edit_ids'][0]}").json()["status"] == "undone"
    assert client.get("/v1/health").json()["batches_applied"] == 0

    again = client.delete(f"/v1/batches/{first['batch_id']}")
    assert again.status_code == 409
    assert "undone" in again.json()["detail"]
    assert client.delete("/v1/batches/999").status_code == 404


def test_bearer_token(edited):
    with TestClient(create_app(edited, token=TOKEN)) as client:
        assert client.get("/v1/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            for method, path, body in (
                ("GET", "/v1/edits", None),
                ("POST", "/v1/edits", {"edits": EDITS}),
                ("POST", "/v1/generate", {"prompt": "The capital of"}),
                ("DELETE", "/v1/batches/1", None),
            ):
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
        assert edited.journal.batches() == []

        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/v1/edits", headers=good).status_code == 200
        assert client.post("/v1/edits", json={"edits": EDITS}, headers=good).status_code == 200


def _edit(**changes):
    return {**EDITS[0], **changes}


def _chunked(data: bytes):
    for start in range(0, len(data), 4096):
        yield data[start : start + 4096]


REJECTED_EDITS = [
    pytest.param(b'{"edits": [', 422, "not valid JSON", id="bad-json"),
    pytest.param([1, 2], 422, "body", id="not-an-object"),
    pytest.param({}, 422, "edits: Field required", id="no-edits"),
    pytest.param({"edits": []}, 422, "edits", id="empty-batch"),
    pytest.param({"edits": [{"prompt": "x"}]}, 422, "edits[0].target_new", id="no-target"),
    pytest.param({"edits": [EDITS[1], _edit(prompt="")]}, 422, "edits[1].prompt", id="empty"),
    pytest.param({"edits": [_edit(prompt=" \n ")]}, 422, "edits[0].prompt", id="whitespace"),
    pytest.param({"edits": [_edit(target_new=3)]}, 422, "edits[0].target_new", id="wrong-type"),
    pytest.param({"edits": [_edit(rephrases=[" "])]}, 422, "edits[0].rephrases[0]", id="rephrase"),
    pytest.param({"edits": [_edit(locality=[["x"]])]}, 422, "edits[0].locality[0]", id="pair"),
    pytest.param({"edits": [_edit(colour="red")]}, 422, "edits[0].colour", id="unknown-field"),
    pytest.param({"edits": [EDITS[1]] * 5}, 413, "the limit is 4", id="big-batch"),
    pytest.param({"edits": [_edit(rephrases=["x" * 30_000])]}, 413, "exceeds", id="big-body"),
]


@pytest.mark.parametrize(("body", "code", "message"), REJECTED_EDITS)
def test_rejected_edits_leave_journal_and_model_unchanged(client, edited, body, code, message):
    client.post("/v1/edits", json={"edits": OTHER_EDITS})
    before, weights = edited.journal.batches(), snapshot(edited.handle)
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/json"}
        response = client.post("/v1/edits", content=body, headers=headers)
    else:
        response = client.post("/v1/edits", json=body)
    assert response.status_code == code, response.text
    assert message in response.json()["detail"]
    assert edited.journal.batches() == before
    assert_weights_equal(edited.handle, weights)


def test_oversized_body_without_content_length_is_refused(client, edited):
    body = ('{"edits": [{"prompt": "' + "x" * 30_000 + '", "target_new": "y"}]}').encode()
    response = client.post(
        "/v1/edits", content=_chunked(body), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert edited.journal.batches() == []


def test_body_without_json_content_type_is_explained(client, edited):
    response = client.post("/v1/edits", content=b'{"edits": []}')
    assert response.status_code == 422
    assert "Content-Type: application/json" in response.json()["detail"]
    assert edited.journal.batches() == []


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/generate", {"prompt": "  "}, "prompt: is empty"),
        ("/v1/generate", {}, "prompt: Field required"),
        ("/v1/generate", {"prompt": "The", "max_new_tokens": 0}, "max_new_tokens"),
        ("/v1/generate", {"prompt": "The", "max_new_tokens": 257}, "max_new_tokens"),
        ("/v1/generate", {"prompt": "a " * 200, "max_new_tokens": 100}, "context"),
        ("/v1/score", {"prompt": "", "candidates": ["x"]}, "prompt: is empty"),
        ("/v1/score", {"prompt": "The", "candidates": []}, "candidates"),
        ("/v1/score", {"prompt": "The", "candidates": ["x", " "]}, "candidates[1]"),
        ("/v1/score", {"prompt": "The", "candidates": "x"}, "candidates"),
    ],
)
def test_bad_read_requests_name_the_field(client, path, body, message):
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    ("error", "code"), [(NonFiniteUpdateError("update is NaN"), 422), (RuntimeError("boom"), 500)]
)
def test_failed_method_is_journaled_and_reported(client, edited, monkeypatch, error, code):
    weights = snapshot(edited.handle)

    def fail(batch):
        raise error

    monkeypatch.setattr(edited.editor, "apply", fail)
    response = client.post("/v1/edits", json={"edits": EDITS})
    assert response.status_code == code
    if code == 500:  # the cause stays in the log, the client gets a request id
        assert str(error) not in response.text and "(request " in response.json()["detail"]
    else:
        assert str(error) in response.json()["detail"]
    assert [(b.status, b.error) for b in edited.journal.batches()] == [
        (FAILED, f"{type(error).__name__}: {error}")
    ]
    assert_weights_equal(edited.handle, weights)
    assert client.get("/v1/health").json()["batches_applied"] == 0


def test_reads_run_while_edits_are_applied(client, edited):
    """Generate and score from several threads while batches are written: all succeed."""
    batches = [[edit] for edit in EDITS + OTHER_EDITS]
    generate = {"prompt": "The capital of France is", "max_new_tokens": 4}
    score = {"prompt": "Harry Potter was written by", "candidates": ["Stephen King", "Rowling"]}
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = []
        for batch in batches:
            futures.append(pool.submit(client.post, "/v1/edits", json={"edits": batch}))
            futures += [pool.submit(client.post, "/v1/generate", json=generate) for _ in range(3)]
            futures.append(pool.submit(client.post, "/v1/score", json=score))
        responses = [future.result(timeout=120) for future in futures]
    assert [r.status_code for r in responses] == [200] * len(responses)
    applied = edited.journal.batches(status=APPLIED)
    assert len(applied) == len(batches)
    acknowledged = {r.json()["batch_id"] for r in responses if "batch_id" in r.json()}
    assert acknowledged == {batch.id for batch in applied}


def test_openapi_schema_lists_the_paths(client):
    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "lledit"
    assert set(schema["paths"]) == {
        "/v1/edits",
        "/v1/edits/{edit_id}",
        "/v1/batches/{batch_id}",
        "/v1/generate",
        "/v1/score",
        "/v1/health",
    }
    assert set(schema["paths"]["/v1/edits"]) == {"get", "post"}


def test_create_app_needs_an_editor_and_a_real_token(tiny, tmp_path):
    journal = Journal(tmp_path / "j.db")
    with pytest.raises(ValueError, match="editor"):
        create_app(JournaledModel(tiny, journal))
    editor = make_editor("ft", tiny, steps=2)
    with pytest.raises(ValueError, match="token"):
        create_app(JournaledModel(tiny, journal, editor), token="")
    journal.close()


def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_lock_admits_readers_together():
    lock = ReadWriteLock()
    inside = threading.Event()

    def second_reader():
        with lock.read():
            inside.set()

    with lock.read():
        thread = threading.Thread(target=second_reader)
        thread.start()
        assert inside.wait(5)
    thread.join(5)


def test_lock_writer_excludes_readers_and_goes_first():
    """A waiting writer keeps new readers out until it has written."""
    lock = ReadWriteLock()
    order: list[str] = []
    reading, release = threading.Event(), threading.Event()

    def first_reader():
        with lock.read():
            reading.set()
            release.wait(5)
            order.append("first reader")

    def writer():
        with lock.write():
            order.append("writer")

    def late_reader():
        with lock.read():
            order.append("late reader")

    threads = [threading.Thread(target=first_reader)]
    threads[0].start()
    assert reading.wait(5)
    threads.append(threading.Thread(target=writer))
    threads[1].start()
    _wait_until(lambda: lock._writers_waiting == 1)
    threads.append(threading.Thread(target=late_reader))
    threads[2].start()
    time.sleep(0.05)
    assert order == []
    release.set()
    for thread in threads:
        thread.join(5)
    assert order == ["first reader", "writer", "late reader"]


@pytest.mark.parametrize(
    ("method", "settings"), [("grace", {"radius": 1e-3, "steps": 10}), ("elder", {"steps": 10})]
)
def test_a_memory_method_is_served_generates_through_its_memory_and_undoes(
    tiny, tmp_path, method, settings
):
    editor = make_editor(method, tiny, **settings)
    with Journal(tmp_path / "j.db") as journal:
        app = create_app(JournaledModel(tiny, journal, editor), max_batch_size=4,
                         max_body_bytes=MAX_BODY_BYTES)  # fmt: skip
        with TestClient(app) as client:

            def answer(prompt: str) -> dict:
                body = {"prompt": prompt, "max_new_tokens": 5}
                return client.post("/v1/generate", json=body).json()

            unrelated, edited_prompt = "The largest planet is", EDITS[0]["prompt"]
            before = answer(unrelated), answer(edited_prompt)
            applied = client.post("/v1/edits", json={"edits": EDITS[:1]}).json()
            assert applied["status"] == "applied"
            assert answer(unrelated) == before[0]  # byte for byte the unedited model's
            assert answer(edited_prompt) != before[1]
            assert client.delete(f"/v1/batches/{applied['batch_id']}").status_code == 200
            assert (answer(unrelated), answer(edited_prompt)) == before


# The service's edge -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/edits", {"edits": [{"prompt": "The capital \ud800 is", "target_new": "x"}]},
         "edits[0].prompt"),
        ("/v1/edits", {"edits": [{"prompt": "p", "target_new": "x", "rephrases": ["a\x00b"]}]},
         "edits[0].rephrases[0]"),
        ("/v1/generate", {"prompt": "lone \udfff"}, "prompt"),
        ("/v1/score", {"prompt": "p", "candidates": ["fine", "bell \x07"]}, "candidates"),
    ],
)  # fmt: skip
def test_text_that_cannot_be_stored_is_refused_and_the_listing_stays_healthy(
    client, edited, path, body, field
):
    response = client.post(
        path,
        content=json.dumps(body, ensure_ascii=True),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    reasons = ("surrogate", "control character", "unicode string")
    assert field in response.text and any(reason in response.text for reason in reasons)
    assert edited.journal.batches() == []
    assert client.get("/v1/edits").status_code == 200


def test_a_subject_not_in_its_prompt_is_refused_without_a_failed_batch(client, edited):
    body = {"edits": [{"prompt": "The capital of France is", "target_new": "x", "subject": "Rome"}]}
    response = client.post("/v1/edits", json=body)
    assert response.status_code == 422
    assert "edits[0].subject: does not occur in the prompt" in response.text
    assert edited.journal.batches() == []


def test_an_edit_longer_than_the_context_is_refused(client, edited):
    long_prompt = " ".join(["word"] * 300)  # the tiny models' context is 256 tokens
    body = {"edits": [{"prompt": long_prompt, "target_new": "x"}]}
    response = client.post("/v1/edits", json=body)
    assert response.status_code == 422
    assert "edits[0].prompt + target_new" in response.text and "context" in response.text
    assert edited.journal.batches() == []


@pytest.mark.parametrize("path", ["/v1/edits/99999999999999999999", "/v1/edits/0"])
def test_ids_out_of_range_are_not_found(client, path):
    assert client.get(path).status_code == 404
    assert client.delete("/v1/batches/99999999999999999999").status_code == 404


def test_the_edit_listing_pages(client, edited):
    for prompt in ("The capital of France is", "The largest planet is", "Apple was founded by"):
        client.post("/v1/edits", json={"edits": [{"prompt": prompt, "target_new": "x"}]})
    first = client.get("/v1/edits", params={"limit": 2}).json()
    assert [edit["id"] for edit in first["edits"]] == [1, 2] and first["next_after"] == 2
    rest = client.get("/v1/edits", params={"limit": 2, "after": first["next_after"]}).json()
    assert [edit["id"] for edit in rest["edits"]] == [3] and rest["next_after"] is None
    assert client.get("/v1/edits", params={"limit": 0}).status_code == 422
    assert client.get("/v1/edits", params={"limit": 100000}).status_code == 422


def test_health_answers_while_an_edit_holds_the_model(client, edited, monkeypatch):
    started, release = threading.Event(), threading.Event()
    original = edited.apply

    def slow_apply(requests, **options):
        started.set()
        release.wait(10)
        return original(requests, **options)

    monkeypatch.setattr(edited, "apply", slow_apply)
    body = {"edits": [{"prompt": "The largest planet is", "target_new": "Mars"}]}
    editing = threading.Thread(target=lambda: client.post("/v1/edits", json=body))
    editing.start()
    try:
        assert started.wait(10)
        health = client.get("/v1/health")
        assert health.status_code == 200 and health.json()["editing"] is True
    finally:
        release.set()
        editing.join(10)
    assert client.get("/v1/health").json()["editing"] is False


def test_a_score_request_over_its_token_budget_is_refused(client):
    body = {"prompt": "The capital of France is " * 8, "candidates": ["Paris " * 20] * 100}
    response = client.post("/v1/score", json=body)
    assert response.status_code == 422
    assert "candidates:" in response.text and "the limit is 2048" in response.text


def test_a_retried_edit_with_the_same_key_applies_once(client, edited):
    headers = {"Idempotency-Key": "client-7f3a"}
    first = client.post("/v1/edits", json={"edits": EDITS}, headers=headers)
    weights = snapshot(edited.handle)
    retry = client.post("/v1/edits", json={"edits": EDITS}, headers=headers)
    assert retry.status_code == 200 and retry.json() == first.json()
    assert len(edited.journal.batches()) == 1
    assert_weights_equal(edited.handle, weights)
    other = client.post("/v1/edits", json={"edits": OTHER_EDITS}, headers=headers)
    assert other.status_code == 422 and "Idempotency-Key" in other.text
    assert len(edited.journal.batches()) == 1
    fresh_key = client.post(
        "/v1/edits", json={"edits": OTHER_EDITS}, headers={"Idempotency-Key": "another"}
    )
    assert fresh_key.status_code == 200 and len(edited.journal.batches()) == 2


def test_a_request_for_another_host_is_refused(edited):
    app = create_app(edited, allowed_hosts=["localhost", "127.0.0.1"])
    with TestClient(app, base_url="http://localhost:8000") as local:
        assert local.get("/v1/health").status_code == 200
    with TestClient(app, base_url="http://attacker.example") as rebound:
        assert rebound.get("/v1/health").status_code == 400
        assert rebound.post("/v1/edits", json={"edits": EDITS}).status_code == 400
    assert edited.journal.batches() == []


def test_the_schema_and_its_page_follow_the_token(edited):
    with TestClient(create_app(edited, token=TOKEN)) as guarded:
        assert guarded.get("/openapi.json").status_code == 401
        assert guarded.get("/docs").status_code == 401
        authorised = {"Authorization": f"Bearer {TOKEN}"}
        schema = guarded.get("/openapi.json", headers=authorised)
        assert schema.status_code == 200 and "/v1/edits" in schema.json()["paths"]
        assert guarded.get("/docs", headers=authorised).status_code == 200


def test_an_unexpected_error_is_a_generic_500(edited, monkeypatch):
    with TestClient(create_app(edited), raise_server_exceptions=False) as client:
        monkeypatch.setattr(
            edited.journal, "edits", lambda **_: (_ for _ in ()).throw(OSError("/secret/path"))
        )
        response = client.get("/v1/edits")
        assert response.status_code == 500
        assert "/secret/path" not in response.text and "(request " in response.text


def test_serving_beyond_loopback_needs_a_token(tmp_path):
    result = CliRunner().invoke(
        app_cli,
        ["serve", "--journal", str(tmp_path / "j.db"), "--method", "ft", "--host", "0.0.0.0"],
    )
    assert result.exit_code == 2 and "--token-file" in result.output
    assert not (tmp_path / "j.db").exists()


def test_reads_beyond_the_cap_are_told_to_retry(edited, monkeypatch):
    inside, release = threading.Event(), threading.Event()
    original = edited.handle.model.generate

    def slow_generate(*args, **kwargs):
        inside.set()
        release.wait(10)
        return original(*args, **kwargs)

    monkeypatch.setattr(edited.handle.model, "generate", slow_generate)
    with TestClient(create_app(edited, max_concurrent_reads=1)) as client:
        body = {"prompt": "The capital of France is", "max_new_tokens": 2}
        first = threading.Thread(target=lambda: client.post("/v1/generate", json=body))
        first.start()
        try:
            assert inside.wait(10)
            busy = client.post("/v1/score", json={"prompt": "p", "candidates": ["x"]})
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            assert client.get("/v1/health").status_code == 200
        finally:
            release.set()
            first.join(10)
        assert (
            client.post("/v1/score", json={"prompt": "p", "candidates": ["x"]}).status_code == 200
        )
