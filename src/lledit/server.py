"""The HTTP service: edit, undo, generate and score on one journaled model.

Every batch goes through `JournaledModel`, so an edit is durable before the
client hears "applied", and a restarted service comes back with the same
weights. Requests that read the model (generate, score) share a read lock;
edits and undos take the write lock, so a reader never sees a half-applied
batch. Endpoints are plain functions: FastAPI runs them in its thread pool,
and torch releases the GIL while it computes, so readers run side by side.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from typing import Annotated, Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lledit.data.request import (
    MAX_PROMPT_CHARS,
    MAX_TARGET_CHARS,
    EditRequest,
    InvalidEditError,
    text_problem,
)
from lledit.edit import NonFiniteUpdateError
from lledit.eval.scoring import score_pairs
from lledit.journal import APPLIED, BatchRecord, JournaledModel, JournalError, KeyReusedError
from lledit.locate import SubjectNotFoundError, subject_span
from lledit.model import ModelHandle
from lledit.tokens import join

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 256
MAX_CANDIDATES = 100
MAX_SCORE_TOKENS = 2048
"""Tokens of prompt + candidate, summed over a score request's candidates: scoring
keeps a vocabulary-wide row of logits per token, so this bounds its memory."""
DEFAULT_PAGE, MAX_PAGE = 100, 1000
"""Edits per page of `GET /v1/edits`, by default and at most."""
MAX_KEY_CHARS = 200
GENERATE_SECONDS = 30.0
"""A generation stops after this long, however many tokens it was asked for."""


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers.

    Writer preference keeps a steady stream of generate requests from
    starving edits. Not reentrant: a thread holding either side must not
    acquire it again.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @property
    def writing(self) -> bool:
        """Whether a writer holds the lock now."""
        return self._writing

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._condition:
            while self._writing or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._condition.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


def _text(value: str) -> str:
    if (problem := text_problem(value)) is not None:
        raise PydanticCustomError("text", problem)
    if not value.strip():
        raise PydanticCustomError("blank", "is empty or whitespace only")
    return value


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_text)]
Candidate = Annotated[str, Field(max_length=MAX_TARGET_CHARS), AfterValidator(_text)]


class Edit(BaseModel):
    """One edit request; the checks of `EditRequest` apply on top of these types."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    rephrases: list[str] = []
    locality: list[tuple[str, str]] = Field(default=[], description="[prompt, answer] pairs")
    id: str | None = None
    portability: list[tuple[str, str]] = Field(
        default=[], description="[prompt, answer] pairs that follow from the new fact"
    )
    generation_prompts: list[str] = []


class EditBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    edits: list[Edit] = Field(min_length=1)


class BatchApplied(BaseModel):
    batch_id: int
    edit_ids: list[int]
    status: str


class EditOut(BaseModel):
    id: int
    batch_id: int
    status: str
    request: Edit


class EditList(BaseModel):
    edits: list[EditOut]
    next_after: int | None = Field(
        description="Pass as `after` for the next page; null on the last page."
    )


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS)


class GenerateOut(BaseModel):
    text: str


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)


class CandidateScore(BaseModel):
    candidate: str
    logprob: float = Field(description="Sum of the candidate's token log-probabilities.")
    tokens: int = Field(description="Number of tokens the candidate was scored on.")


class ScoreOut(BaseModel):
    scores: list[CandidateScore]


class Health(BaseModel):
    status: str
    model: str
    method: str
    batches_applied: int
    editing: bool = Field(description="A batch is being applied or undone right now.")


def _field_path(location: Sequence[str | int]) -> str:
    """`("body", "edits", 0, "prompt")` → `edits[0].prompt`, the way a client wrote it."""
    parts = list(location[1:] if location and location[0] == "body" else location)
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or "body"


def _validation_message(errors: Sequence[dict[str, Any]]) -> str:
    messages = []
    for error in errors:
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", "")
            messages.append(f"body: not valid JSON ({reason})".replace(" ()", ""))
        else:
            messages.append(f"{_field_path(error['loc'])}: {error['msg']}")
    return "; ".join(messages)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with one readable message naming each bad field, plus FastAPI's error list.

    The list leaves the rejected input out: it need not be text that can be
    sent back (a lone surrogate cannot be encoded).
    """
    errors = error.errors()
    message = _validation_message(errors)
    content_type = request.headers.get("content-type", "")
    if any(e["loc"][:1] == ("body",) for e in errors) and "json" not in content_type:
        # FastAPI ignores a body without a JSON content type (a guard against CSRF).
        message = f"send the body as JSON with 'Content-Type: application/json'; {message}"
    return JSONResponse(
        status_code=422,
        content={
            "detail": message,
            "errors": [
                jsonable_encoder({key: e[key] for key in ("loc", "msg", "type")}) for e in errors
            ],
        },
    )


class BodySizeLimit:
    """Refuse bodies over `max_body_bytes` with 413 before anything parses them.

    A declared Content-Length is checked first; the body itself is counted as
    it arrives too, since chunked uploads declare no length.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            status_code=413,
            content={"detail": f"the request body exceeds {self.max_body_bytes} bytes"},
        )
        await response(scope, receive, send)


_bearer = HTTPBearer(auto_error=False, description="The token given to `lledit serve`.")


class BearerToken:
    """A dependency that lets a request through only with `Authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def __call__(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> None:
        if credentials is None or not hmac.compare_digest(
            credentials.credentials.encode(), self._expected
        ):
            raise HTTPException(
                401,
                detail="missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )


def _check_fits(handle: ModelHandle, tokens: int, what: str) -> None:
    """A sequence longer than the model's context fails deep inside it; say so up front."""
    limit = getattr(handle.model.config, "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise HTTPException(
            422,
            detail=f"{what}: {tokens} tokens exceed the model's context of {limit}",
        )


def _edit_requests(handle: ModelHandle, edits: Sequence[Edit]) -> list[EditRequest]:
    """Every edit through `EditRequest`'s checks, its subject found in its prompt and
    its prompt and target within the model's context, before any is applied."""
    requests = []
    for index, edit in enumerate(edits):
        try:
            request = EditRequest.from_dict(edit.model_dump())
            subject_span(request)
        except InvalidEditError as error:
            raise HTTPException(
                422,
                detail=f"edits[{index}].{error.field}: {error.reason}",
            ) from error
        except SubjectNotFoundError:
            raise HTTPException(
                422, detail=f"edits[{index}].subject: does not occur in the prompt"
            ) from None
        requests.append(request)
    joined = [join(request.prompt, request.target_new) for request in requests]
    for index, ids in enumerate(handle.tokenizer(joined)["input_ids"]):
        _check_fits(handle, len(ids), f"edits[{index}].prompt + target_new")
    return requests


def _logged_failure(what: str, error: BaseException) -> str:
    """Log `error` under a new request id; the client is told only `what` and the id,
    since the cause may name files and paths."""
    request_id = uuid.uuid4().hex[:12]
    logger.error("%s (request %s)", what, request_id, exc_info=error)
    return f"{what} (request {request_id}; the service's log has the cause)"


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """Anything no route expected: a generic 500, the cause in the log."""
    detail = _logged_failure(f"internal error on {request.url.path}", error)
    return JSONResponse(status_code=500, content={"detail": detail})


MAX_ID = 2**63 - 1
"""The largest id SQLite stores; a larger one names nothing."""


def _check_id(value: int, what: str) -> None:
    """An id SQLite cannot hold names nothing: 404, not an overflow."""
    if not 1 <= value <= MAX_ID:
        raise HTTPException(404, detail=f"no {what} {value}")


def create_app(
    model: JournaledModel,
    *,
    token: str | None = None,
    max_batch_size: int = 64,
    max_body_bytes: int = 1_000_000,
    allowed_hosts: Sequence[str] | None = None,
    max_concurrent_reads: int = 4,
) -> FastAPI:
    """The service for one journaled model; `token` turns on bearer authentication.

    With `allowed_hosts`, a request whose Host header names another host is
    refused (400), which stops a web page from reaching a loopback service
    through DNS rebinding. With a token, `/docs` and `/openapi.json` need it too.
    Beyond `max_concurrent_reads` generate and score requests at once, another
    is answered 503 with Retry-After at once rather than queued without bound.
    """
    if token is not None and not token:
        raise ValueError("the token must not be empty")
    if min(max_batch_size, max_body_bytes, max_concurrent_reads) < 1:
        raise ValueError(
            "max_batch_size, max_body_bytes and max_concurrent_reads must be at least 1"
        )
    if model.editor is None:
        raise ValueError("the service applies edits: the JournaledModel needs an editor")
    handle, journal, method = model.handle, model.journal, model.editor.name
    lock = ReadWriteLock()
    slots = threading.BoundedSemaphore(max_concurrent_reads)

    @contextmanager
    def reading() -> Iterator[None]:
        """A read slot and the model's read lock, or 503 when every slot is taken."""
        if not slots.acquire(blocking=False):
            raise HTTPException(
                503,
                detail=f"{max_concurrent_reads} generate/score requests are running; retry shortly",
                headers={"Retry-After": "1"},
            )
        try:
            with lock.read():
                yield
        finally:
            slots.release()

    app = FastAPI(
        title="lledit",
        version=version("lledit"),
        description="Lifelong knowledge editing of a served model: every edit is journaled.",
        exception_handlers={
            RequestValidationError: _validation_error,
            Exception: _unexpected_error,
        },
        # Behind the token, the schema and its page are served by guarded routes below.
        docs_url=None if token else "/docs",
        redoc_url=None,
        openapi_url=None if token else "/openapi.json",
    )
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    guarded = APIRouter(dependencies=[Depends(BearerToken(token))] if token else [])
    if token:

        @guarded.get("/openapi.json", include_in_schema=False)
        def openapi() -> dict[str, Any]:
            return app.openapi()

        @guarded.get("/docs", include_in_schema=False)
        def docs() -> Any:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="lledit")

    @app.get("/v1/health", response_model=Health)
    async def health() -> dict[str, Any]:
        # On the event loop, not in the thread pool that readers waiting behind a
        # long edit can fill: a liveness probe is answered during edits too.
        return {
            "status": "ok",
            "model": handle.name,
            "method": method,
            "batches_applied": len(journal.batches(status=APPLIED)),
            "editing": lock.writing,
        }

    @guarded.post("/v1/edits", response_model=BatchApplied)
    def post_edits(
        body: EditBatch,
        idempotency_key: Annotated[
            str | None,
            Header(
                max_length=MAX_KEY_CHARS,
                description="A key of the client's choosing: a retried request with the same "
                "key returns the batch the first one applied instead of applying it again.",
            ),
        ] = None,
    ) -> dict[str, Any]:
        """Apply one batch; it is in the journal before the response is sent."""
        if idempotency_key is not None and (problem := text_problem(idempotency_key)):
            raise HTTPException(422, detail=f"Idempotency-Key: {problem}")
        if len(body.edits) > max_batch_size:
            raise HTTPException(
                413,
                detail=f"edits: {len(body.edits)} edits in one batch; the limit is "
                f"{max_batch_size}",
            )
        requests = _edit_requests(handle, body.edits)
        with lock.write():
            try:
                batch = model.apply(requests, client_key=idempotency_key)
            except KeyReusedError as error:
                raise HTTPException(422, detail=f"Idempotency-Key: {error}") from error
            except NonFiniteUpdateError as error:
                raise HTTPException(
                    422,
                    detail=f"the batch was rejected, the model is unchanged: {error}",
                ) from error
            except Exception as error:
                detail = _logged_failure("the batch failed, the model is unchanged", error)
                raise HTTPException(500, detail=detail) from error
        logger.info("batch %d applied (edits %s)", batch.id, list(batch.edit_ids))
        return {"batch_id": batch.id, "edit_ids": list(batch.edit_ids), "status": batch.status}

    @guarded.get("/v1/edits", response_model=EditList)
    def list_edits(
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
        after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    ) -> dict[str, Any]:
        """Edits in id order, `limit` at a time, from the one after id `after`."""
        page = journal.edits(after=after, limit=limit + 1)
        more = len(page) > limit
        page = page[:limit]
        return {
            "edits": [edit.to_dict() for edit in page],
            "next_after": page[-1].id if more else None,
        }

    @guarded.get("/v1/edits/{edit_id}", response_model=EditOut)
    def get_edit(edit_id: int) -> dict[str, Any]:
        _check_id(edit_id, "edit")
        try:
            return journal.edit(edit_id).to_dict()
        except JournalError as error:
            raise HTTPException(404, detail=f"no edit {edit_id}") from error

    @guarded.delete("/v1/batches/{batch_id}", response_model=BatchRecord)
    def undo_batch(batch_id: int) -> dict[str, Any]:
        """Undo one applied batch; the other applied batches keep their deltas."""
        _check_id(batch_id, "batch")
        with lock.write():
            try:
                batch = journal.batch(batch_id)
            except JournalError as error:
                raise HTTPException(404, detail=f"no batch {batch_id}") from error
            if batch.status != APPLIED:
                raise HTTPException(409, detail=f"batch {batch_id} is {batch.status}")
            try:
                undone = model.undo(batch_id)
            except Exception as error:
                detail = _logged_failure(f"undo of batch {batch_id} failed, nothing changed", error)
                raise HTTPException(500, detail=detail) from error
        logger.info("batch %d undone", batch_id)
        return undone.to_dict()

    @guarded.post("/v1/generate", response_model=GenerateOut)
    def generate(body: GenerateIn) -> dict[str, str]:
        """Greedy continuation of the prompt by the edited model."""
        tokenizer = handle.tokenizer
        encoded = tokenizer(body.prompt, return_tensors="pt")
        prompt_length = encoded["input_ids"].shape[1]
        _check_fits(handle, prompt_length + body.max_new_tokens, "prompt + max_new_tokens")
        with reading():
            output = handle.model.generate(
                input_ids=encoded["input_ids"].to(handle.device),
                attention_mask=encoded["attention_mask"].to(handle.device),
                max_new_tokens=body.max_new_tokens,
                max_time=GENERATE_SECONDS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return {"text": tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)}

    @guarded.post("/v1/score", response_model=ScoreOut)
    def score(body: ScoreIn) -> dict[str, Any]:
        """Log-probability of each candidate as the continuation of the prompt."""
        joined = [join(body.prompt, candidate) for candidate in body.candidates]
        lengths = [len(ids) for ids in handle.tokenizer(joined)["input_ids"]]
        _check_fits(handle, max(lengths), "prompt + candidate")
        if sum(lengths) > MAX_SCORE_TOKENS:
            raise HTTPException(
                422,
                detail=f"candidates: {sum(lengths)} tokens of prompt + candidate in all; "
                f"the limit is {MAX_SCORE_TOKENS}",
            )
        with reading():
            scores = score_pairs(handle, [body.prompt] * len(body.candidates), body.candidates)
        return {
            "scores": [
                {"candidate": candidate, "logprob": float(logprob), "tokens": len(predicted)}
                for candidate, logprob, predicted in zip(
                    body.candidates, scores.logprob, scores.predictions, strict=True
                )
            ]
        }

    app.include_router(guarded)
    return app


def serve(
    model: JournaledModel,
    *,
    host: str,
    port: int,
    token: str | None,
    max_batch_size: int,
    max_body_bytes: int,
    allowed_hosts: Sequence[str],
    max_concurrent_reads: int,
) -> None:
    """Serve until interrupted; in-flight requests finish on SIGINT/SIGTERM, then the
    journal is closed (its WAL checkpointed, its write lock released).

    The socket is bound here rather than by uvicorn so that a taken port is an
    ordinary `OSError` and the log names the port actually bound (port 0 picks
    a free one).
    """
    app = create_app(
        model,
        token=token,
        max_batch_size=max_batch_size,
        max_body_bytes=max_body_bytes,
        allowed_hosts=allowed_hosts,
        max_concurrent_reads=max_concurrent_reads,
    )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family)
    bound_host, bound_port = listener.getsockname()[:2]
    address = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    logger.info(
        "serving %s (method %s, %d applied batches) on http://%s:%d%s",
        model.handle.name,
        model.editor.name,
        len(model.journal.batches(status=APPLIED)),
        address,
        bound_port,
        " with bearer token" if token else "",
    )
    config = uvicorn.Config(app, log_level="warning", workers=1)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        model.journal.close()
