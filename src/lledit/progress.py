"""Progress of long work: the library reports it, whoever runs the library shows it.

Library code wraps a long loop in `with progress.task(description, total) as
task:` and calls `task.advance()` (and `task.update(status=...)`). Nothing is
drawn unless a reporter is installed with `reporting(...)`: the CLI installs
one that draws rich bars, and without one each finished task is logged at
INFO, so a script or a service shows nothing it did not ask for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

logger = logging.getLogger(__name__)


class Reporter(Protocol):
    """Shows tasks as they run (e.g. as progress bars)."""

    def start(self, description: str, total: int | None, completed: int) -> object:
        """Begin showing a task; returns the reporter's handle for it."""
        ...

    def update(self, handle: object, completed: int, status: str) -> None: ...

    def stop(self, handle: object) -> None: ...


_reporter: ContextVar[Reporter | None] = ContextVar("lledit_progress_reporter", default=None)


class Task:
    """One long piece of work: how much of it is done, and a short status."""

    def __init__(
        self, reporter: Reporter | None, description: str, total: int | None, completed: int
    ):
        self.completed = completed
        self.status = ""
        self._reporter = reporter
        self._handle = None if reporter is None else reporter.start(description, total, completed)

    def advance(self, steps: int = 1) -> None:
        self.update(completed=self.completed + steps)

    def update(self, *, completed: int | None = None, status: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if status is not None:
            self.status = status
        if self._reporter is not None:
            self._reporter.update(self._handle, self.completed, self.status)

    def _stop(self) -> None:
        if self._reporter is not None:
            self._reporter.stop(self._handle)


@contextmanager
def task(description: str, total: int | None = None, completed: int = 0) -> Iterator[Task]:
    """Report a long piece of work to the installed reporter, and log when it ends."""
    started = time.perf_counter()
    current = Task(_reporter.get(), description, total, completed)
    try:
        yield current
    finally:
        current._stop()
    logger.info(
        "%s: %d%s in %.1f s",
        description,
        current.completed,
        "" if total is None else f"/{total}",
        time.perf_counter() - started,
    )


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Within this block (in this thread), tasks are shown by `reporter` (None: by none)."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)
