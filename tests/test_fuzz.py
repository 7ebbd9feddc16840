"""The service fuzzed from its own OpenAPI schema: no request, however odd, is a 5xx.

Schemathesis generates requests for every operation, ones the schema allows
and ones that break it; after each, a rejected request must have left the journal
as it was, and the edit listing must still answer. Bounded in examples, so
it stays well under a minute on a tiny model.
"""

from __future__ import annotations

import itertools
import json

import pytest
import schemathesis
from conftest import make_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from lledit.data import EditRequest, InvalidEditError
from lledit.journal import Journal, JournaledModel
from lledit.methods import make_editor
from lledit.model import ModelHandle
from lledit.server import create_app


@pytest.fixture
def served(tokenizer, tmp_path):
    handle = ModelHandle(make_tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama")
    editor = make_editor("ft", handle, steps=1)
    with Journal(tmp_path / "j.db") as journal:
        yield create_app(JournaledModel(handle, journal, editor), max_batch_size=4), journal


def test_no_request_is_a_server_error(served):
    app, journal = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    listing = schema["/v1/edits"]["GET"]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7

    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=10,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case) -> None:
            before = journal.batches()
            response = case.call()
            assert response.status_code < 500, f"{case.method} {case.path}: {response.text}"
            if response.status_code >= 400:
                assert journal.batches() == before
            assert listing.Case().call().status_code == 200

        try:
            check()
        except Unsatisfiable:  # an operation without inputs has nothing to break
            assert mode is GenerationMode.NEGATIVE


@given(prompt=st.text(max_size=60), target=st.text(max_size=20), subject=st.none() | st.text())
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_any_text_makes_a_storable_request_or_names_its_field(prompt, target, subject):
    try:
        request = EditRequest(prompt, target, subject=subject)
    except InvalidEditError as error:
        assert error.field in ("prompt", "target_new", "subject")
        return
    stored = json.dumps(request.to_dict(), ensure_ascii=False).encode()
    assert EditRequest.from_dict(json.loads(stored)) == request
