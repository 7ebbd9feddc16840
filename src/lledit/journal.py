"""A durable edit journal: every batch, its requests and its effect, in SQLite.

The database (WAL mode, synchronous FULL) holds one row per batch and one per
edit; each applied batch's weight deltas are a safetensors file in a folder
beside it (`J.db` → `J.db.deltas/`), whose sha256 the batch's row keeps. A
batch is durable before it is reported as applied: the delta file is written
and fsynced, then the rows are committed in one transaction. A crash before
that commit leaves no row (at most an orphaned file, removed when the journal
is next opened for writing), so a batch is either fully in the journal or
absent. One process at a time may write a journal (a lock file beside it).

The edited model is never stored: it is the base model plus the deltas of the
applied batches, added in order. Replaying them gives the live weights bit for
bit, because editing and replay add deltas through the same expression.

Undoing batch k marks it undone and rebuilds the edited modules from the base
weights with every other applied batch in order. Later batches keep the deltas
they were computed with: they are not recomputed on a model that never had
batch k, so undoing an old batch removes exactly its own delta, and later
edits stay as they were written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from lledit.data.request import EditRequest
from lledit.edit import EditMethod, WeightDelta, added_weights, edits_weights
from lledit.methods import METHODS
from lledit.model import ModelHandle

logger = logging.getLogger(__name__)

SNAPSHOT_EVERY = 10
"""Applied batches between snapshots by default. A snapshot weighs about as
much as one batch's deltas (both cover the edited tensors), so every 10th
batch adds a tenth to the journal's size and bounds start-up to replaying 9
batches: ELDER's 13 MB per batch made every 100th too few
(docs/guides/service.md has the start-up times)."""

MEMORY_METHODS = {name for name, method in METHODS.items() if not edits_weights(method)}
"""Methods whose batches live in the editor, so that replaying weights alone would lose them."""

APPLIED, UNDONE, FAILED = "applied", "undone", "failed"

APPLICATION_ID = 0x6C6C6564
"""SQLite's application id of an lledit journal ("lled"): another database is refused."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    method TEXT NOT NULL,
    method_config TEXT NOT NULL,
    model TEXT NOT NULL,
    base_sha256 TEXT,
    delta_file TEXT,
    delta_sha256 TEXT,
    held_file TEXT,
    held_sha256 TEXT,
    client_key TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY,
    after_batch INTEGER NOT NULL,
    batches TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    base_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches(id),
    position INTEGER NOT NULL,
    request TEXT NOT NULL
);
"""


class JournalError(RuntimeError):
    """The journal cannot be used as asked (unknown batch, other model, missing file)."""


class KeyReusedError(JournalError):
    """A client key already names a batch that held other edits."""


@dataclass(frozen=True)
class BatchRecord:
    id: int
    status: str
    method: str
    method_config: dict[str, Any]
    model: str
    base_sha256: str | None
    delta_file: str | None
    delta_sha256: str | None
    held_file: str | None
    held_sha256: str | None
    client_key: str | None
    """The client's idempotency key, when it sent one."""
    error: str | None
    created_at: float
    updated_at: float
    edit_ids: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "edit_ids": list(self.edit_ids)}


@dataclass(frozen=True)
class Snapshot:
    """The edited modules' weights after `after_batch`, with exactly `batches` applied."""

    id: int
    after_batch: int
    batches: tuple[int, ...]
    file: str
    sha256: str
    base_sha256: str


@dataclass(frozen=True)
class EditRecord:
    id: int
    batch_id: int
    status: str
    request: EditRequest

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "batch_id": self.batch_id,
            "status": self.status,
            "request": self.request.to_dict(),
        }


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """A hash of named weights: identifies the base model a batch was computed on."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Journal:
    """The SQLite journal of one edited model. Safe to share between threads.

    Opening a journal reads it; the first write (or `lock_for_writing`) takes
    the journal's lock, which another process then cannot take until this one
    closes the journal or exits.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.delta_dir = self.path.with_name(self.path.name + ".deltas")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by threads; the lock keeps a reader from running
        # inside another thread's open transaction.
        self._lock = threading.RLock()
        self._writer: int | None = None
        existing = self.path.is_file() and self.path.stat().st_size > 0
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            if existing:
                self._check_is_journal()
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.executescript(SCHEMA)
            self._connection.execute(f"PRAGMA application_id={APPLICATION_ID}")
            columns = {row[1] for row in self._connection.execute("PRAGMA table_info(batches)")}
            for column in ("delta_sha256", "held_file", "held_sha256", "client_key"):
                if column not in columns:  # a journal written by an earlier lledit
                    self._connection.execute(f"ALTER TABLE batches ADD COLUMN {column} TEXT")
            self._connection.execute(
                "CREATE UNIQUE INDEX IF NOT EXISTS batches_client_key ON batches(client_key)"
            )
        except BaseException:
            self._connection.close()
            raise
        self.delta_dir.mkdir(exist_ok=True)

    def _check_is_journal(self) -> None:
        """Refuse, unchanged, a file that is not an lledit journal."""
        try:
            application_id = self._connection.execute("PRAGMA application_id").fetchone()[0]
            tables = {
                row[0]
                for row in self._connection.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'"
                )
            }
        except sqlite3.DatabaseError as error:
            raise JournalError(f"{self.path} is not an lledit journal ({error})") from None
        # Journals written before the application id was set hold exactly these tables.
        if application_id != APPLICATION_ID and not (
            application_id == 0 and tables == {"batches", "edits"}
        ):
            raise JournalError(
                f"{self.path} is not an lledit journal (another SQLite database); "
                "it was left as it was"
            )

    @property
    def writing(self) -> bool:
        """Whether this journal holds the write lock."""
        return self._writer is not None

    def lock_for_writing(self) -> None:
        """Take the journal's write lock, or refuse if another process holds it.

        Files that a crash left without a committed row are removed once the
        lock is held.
        """
        if self.writing:
            return
        descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 64).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise JournalError(
                f"{self.path} is open for writing by another process (pid {holder}): "
                "stop it, or edit and undo through it"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
        self._writer = descriptor
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        with self._lock:
            kept = {
                row[0]
                for row in self._connection.execute(
                    "SELECT delta_file FROM batches WHERE delta_file IS NOT NULL "
                    "UNION SELECT held_file FROM batches WHERE held_file IS NOT NULL "
                    "UNION SELECT file FROM snapshots"
                )
            }
        for path in self.delta_dir.iterdir():
            if path.name not in kept:
                path.unlink()

    def close(self) -> None:
        """Checkpoint the WAL into the database file, close it and release the lock."""
        with self._lock:
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed already
                self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._connection.close()
            self.release_lock()

    def release_lock(self) -> None:
        """Let another process write this journal (no-op when not holding the lock)."""
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(
        self,
        requests: Sequence[EditRequest],
        *,
        method: str,
        method_config: dict[str, Any],
        model: str,
        base_sha256: str | None = None,
        deltas: dict[str, torch.Tensor] | None = None,
        held: dict[str, torch.Tensor] | None = None,
        status: str = APPLIED,
        error: str | None = None,
        client_key: str | None = None,
    ) -> BatchRecord:
        """Write a batch durably; returns once it is committed to disk.

        `held` is what the editor holds of the batch for later ones (its keys).
        """
        self.lock_for_writing()
        now = time.time()
        with self._lock:
            cursor = self._connection.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                cursor.execute(
                    "INSERT INTO batches (status, method, method_config, model, base_sha256, "
                    "error, client_key, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        status,
                        method,
                        json.dumps(method_config),
                        model,
                        base_sha256,
                        error,
                        client_key,
                        now,
                        now,
                    ),
                )
                batch_id = cursor.lastrowid
                cursor.executemany(
                    "INSERT INTO edits (batch_id, position, request) VALUES (?, ?, ?)",
                    [
                        (batch_id, position, json.dumps(request.to_dict()))
                        for position, request in enumerate(requests)
                    ],
                )
                for kind, tensors, suffix in (("delta", deltas, ""), ("held", held, ".held")):
                    if tensors:
                        file_name = f"batch-{batch_id:08d}{suffix}.safetensors"
                        digest = self._write_tensors(file_name, tensors)
                        cursor.execute(
                            f"UPDATE batches SET {kind}_file = ?, {kind}_sha256 = ? WHERE id = ?",
                            (file_name, digest, batch_id),
                        )
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        return self.batch(batch_id)

    def _write_tensors(self, file_name: str, tensors: dict[str, torch.Tensor]) -> str:
        """Write and fsync the file; returns its sha256."""
        final = self.delta_dir / file_name
        partial = final.with_suffix(".partial")
        save_file(
            {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
            str(partial),
        )
        with open(partial, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
            os.fsync(handle.fileno())
        os.replace(partial, final)
        _fsync_directory(self.delta_dir)
        return digest

    def deltas(self, batch: BatchRecord) -> dict[str, torch.Tensor]:
        """The batch's weight deltas, checked against the sha256 its row keeps."""
        if batch.delta_file is None:
            return {}
        return self._read_tensors(
            f"batch {batch.id}: its delta file", batch.delta_file, batch.delta_sha256
        )

    def held(self, batch: BatchRecord) -> dict[str, torch.Tensor]:
        """What the editor held of the batch, checked against the sha256 its row keeps."""
        if batch.held_file is None:
            return {}
        return self._read_tensors(
            f"batch {batch.id}: its held file", batch.held_file, batch.held_sha256
        )

    def _read_tensors(
        self, what: str, file_name: str, sha256: str | None
    ) -> dict[str, torch.Tensor]:
        path = self.delta_dir / file_name
        if not path.is_file():
            raise JournalError(f"{what} {path} is missing")
        data = path.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise JournalError(
                f"{what} {path} is not the one the journal wrote (corrupted, truncated or replaced)"
            )
        try:
            return load(data)
        except SafetensorError as error:
            raise JournalError(f"{what} {path} is unreadable ({error})") from None

    def record_snapshot(
        self,
        after_batch: int,
        batches: Sequence[int],
        weights: dict[str, torch.Tensor],
        base_sha256: str,
    ) -> Snapshot:
        """Write the edited modules' weights after `after_batch` durably."""
        self.lock_for_writing()
        file_name = f"snapshot-{after_batch:08d}.safetensors"
        digest = self._write_tensors(file_name, weights)
        with self._lock:
            cursor = self._connection.execute(
                "INSERT INTO snapshots (after_batch, batches, file, sha256, base_sha256, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    after_batch,
                    json.dumps(list(batches)),
                    file_name,
                    digest,
                    base_sha256,
                    time.time(),
                ),
            )
        return Snapshot(
            cursor.lastrowid, after_batch, tuple(batches), file_name, digest, base_sha256
        )

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot, oldest first."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT id, after_batch, batches, file, sha256, base_sha256 FROM snapshots "
                "ORDER BY after_batch, id"
            ).fetchall()
        return [Snapshot(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], r[5]) for r in rows]

    def snapshot_weights(self, snapshot: Snapshot) -> dict[str, torch.Tensor]:
        """The snapshot's weights, checked against the sha256 its row keeps."""
        return self._read_tensors(
            f"the snapshot after batch {snapshot.after_batch}: its file",
            snapshot.file,
            snapshot.sha256,
        )

    def set_status(self, batch_id: int, status: str) -> BatchRecord:
        batch = self.batch(batch_id)
        if batch.status != APPLIED:
            raise JournalError(f"batch {batch_id} is {batch.status}, not applied")
        self.lock_for_writing()
        with self._lock:
            self._connection.execute(
                "UPDATE batches SET status = ?, updated_at = ? WHERE id = ?",
                (status, time.time(), batch_id),
            )
        return self.batch(batch_id)

    def batch(self, batch_id: int) -> BatchRecord:
        found = self.batches(batch_id=batch_id)
        if not found:
            raise JournalError(f"no batch {batch_id} in {self.path}")
        return found[0]

    def batches(
        self,
        *,
        status: str | None = None,
        batch_id: int | None = None,
        client_key: str | None = None,
    ) -> list[BatchRecord]:
        query = (
            "SELECT b.id, b.status, b.method, b.method_config, b.model, b.base_sha256, "
            "b.delta_file, b.delta_sha256, b.held_file, b.held_sha256, b.client_key, b.error, "
            "b.created_at, b.updated_at, group_concat(e.id) "
            "FROM batches b LEFT JOIN edits e ON e.batch_id = b.id"
        )
        conditions, values = [], []
        if status is not None:
            conditions.append("b.status = ?")
            values.append(status)
        if batch_id is not None:
            conditions.append("b.id = ?")
            values.append(batch_id)
        if client_key is not None:
            conditions.append("b.client_key = ?")
            values.append(client_key)
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        query += " GROUP BY b.id ORDER BY b.id"
        with self._lock:
            rows = self._connection.execute(query, values).fetchall()
        return [
            BatchRecord(
                id=row[0],
                status=row[1],
                method=row[2],
                method_config=json.loads(row[3]),
                model=row[4],
                base_sha256=row[5],
                delta_file=row[6],
                delta_sha256=row[7],
                held_file=row[8],
                held_sha256=row[9],
                client_key=row[10],
                error=row[11],
                created_at=row[12],
                updated_at=row[13],
                edit_ids=tuple(sorted(int(i) for i in row[14].split(","))) if row[14] else (),
            )
            for row in rows
        ]

    def edits(
        self, *, edit_id: int | None = None, after: int = 0, limit: int | None = None
    ) -> list[EditRecord]:
        """Edits in id order: one (`edit_id`), or a page of those after id `after`."""
        query = (
            "SELECT e.id, e.batch_id, b.status, e.request FROM edits e "
            "JOIN batches b ON b.id = e.batch_id WHERE e.id > ?"
        )
        values: list[Any] = [after]
        if edit_id is not None:
            query += " AND e.id = ?"
            values.append(edit_id)
        query += " ORDER BY e.id"
        if limit is not None:
            query += " LIMIT ?"
            values.append(limit)
        with self._lock:
            rows = self._connection.execute(query, values).fetchall()
        return [
            EditRecord(row[0], row[1], row[2], EditRequest.from_dict(json.loads(row[3])))
            for row in rows
        ]

    def batch_edits(self, batch_id: int) -> list[EditRecord]:
        """The edits of one batch, in their order in it."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT e.id, e.batch_id, b.status, e.request FROM edits e "
                "JOIN batches b ON b.id = e.batch_id WHERE e.batch_id = ? ORDER BY e.position",
                (batch_id,),
            ).fetchall()
        return [
            EditRecord(row[0], row[1], row[2], EditRequest.from_dict(json.loads(row[3])))
            for row in rows
        ]

    def edit(self, edit_id: int) -> EditRecord:
        found = self.edits(edit_id=edit_id)
        if not found:
            raise JournalError(f"no edit {edit_id} in {self.path}")
        return found[0]


class JournaledModel:
    """A model whose every edit batch goes through the journal.

    On construction the model (freshly loaded, unedited) is brought to the
    journal's state by replaying the applied batches; nothing is recomputed.
    With an editor it takes the journal's write lock; without one it can
    replay but not edit (export, history). A memory editor's batches are
    journaled as what the editor holds of them (GRACE's codebook entries,
    ELDER's allocations and queries), given back through its `hold` on
    start-up, and as deltas to the editor's own tensors (ELDER's LoRAs and
    routers), which are replayed and undone like weights, from the values a
    fresh editor starts with.
    """

    def __init__(
        self,
        handle: ModelHandle,
        journal: Journal,
        editor: EditMethod | None = None,
        *,
        snapshot_every: int = SNAPSHOT_EVERY,
    ) -> None:
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be at least 1, got {snapshot_every}")
        applied = journal.batches(status=APPLIED)
        _check_method(journal, applied, editor)
        self.handle = handle
        self.journal = journal
        self.editor = editor
        self.snapshot_every = snapshot_every
        """Every this many applied batches the edited weights are snapshotted, so
        start-up and undo replay only the batches since the last snapshot."""
        self._memory = editor.tensors() if hasattr(editor, "tensors") else {}
        """The editor's own tensors, by the names its deltas use."""
        self._base = {name: tensor.detach().clone() for name, tensor in self._memory.items()}
        """Every replayed tensor as it was unedited (weights are added on first use, in
        host memory: replay adds deltas there and switches the result in)."""
        self._base_hashes: dict[tuple[str, ...], str] = {}
        self._releases: dict[int, Callable[[], None]] = {}
        """Per applied batch, what lets the editor forget what it holds of it."""
        self._since_snapshot = 0
        """Applied batches after the newest snapshot that still describes them."""
        locking = editor is not None and not journal.writing
        if locking:
            journal.lock_for_writing()
        try:
            if editor is not None:
                # Statistics and sampled prefixes come from the base model, as in a
                # run that never stopped, not from the edited one.
                editor.prepare()
                _check_settings(journal, applied, editor)
            self.rebuild()
            if editor is not None:
                self._hold_journaled(applied)
        except BaseException:
            if locking:
                journal.release_lock()
            raise

    def _base_sha256(self, names) -> str:
        key = tuple(sorted(names))
        if key not in self._base_hashes:
            self._base_hashes[key] = weights_sha256({name: self._base[name] for name in key})
        return self._base_hashes[key]

    def _tensor(self, name: str) -> torch.Tensor:
        """The live tensor a delta named `name` changes: the editor's, else a module's weight."""
        if name in self._memory:
            return self._memory[name]
        return self.handle.weight_of(name)

    def _remember_base(self, names) -> None:
        for name in names:
            if name not in self._base:
                self._base[name] = self._tensor(name).detach().to("cpu", copy=True)

    def _latest_snapshot(self, applied: Sequence[int]) -> Snapshot | None:
        """The newest snapshot that holds exactly the batches of `applied` up to its own."""
        for snapshot in reversed(self.journal.snapshots()):
            if list(snapshot.batches) == [i for i in applied if i <= snapshot.after_batch]:
                return snapshot
        return None

    def _replayed(self, without: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """The edited modules' weights: base plus every applied batch (but `without`), in order,
        and how many of those batches came after the snapshot it started from.

        Starts from the newest snapshot that still describes the applied
        batches. Computed apart from the live weights, which stay as they are
        if any file is missing, corrupted or written for other base weights.
        """
        batches = [b for b in self.journal.batches(status=APPLIED) if b.id != without]
        for batch in batches:
            if batch.model != self.handle.name:
                raise JournalError(
                    f"batch {batch.id} was written for model '{batch.model}', "
                    f"not '{self.handle.name}'"
                )
        weights = dict(self._base)
        start = self._latest_snapshot([b.id for b in batches])
        if start is not None:
            saved = self.journal.snapshot_weights(start)
            self._check_base(
                saved, start.base_sha256, f"the snapshot after batch {start.after_batch}"
            )
            weights.update(saved)
        since = [b for b in batches if start is None or b.id > start.after_batch]
        for batch in since:
            deltas = self.journal.deltas(batch)
            self._check_base(deltas, batch.base_sha256, f"batch {batch.id}")
            for name in deltas:
                weights.setdefault(name, self._base[name])
            weights.update(added_weights(weights, deltas, check=False))
        return weights, len(since)

    def _check_base(self, names, expected: str | None, what: str) -> None:
        self._remember_base(names)
        if self._base_sha256(names) != expected:
            raise JournalError(
                f"{what}: the base weights of {sorted(names)} differ from those it was "
                "computed on (another model or another revision; for an editor's own "
                "tensors, other settings)"
            )

    def _snapshot_if_due(self, after_batch: int) -> None:
        self._since_snapshot += 1
        if self._since_snapshot < self.snapshot_every:
            return
        applied = [b.id for b in self.journal.batches(status=APPLIED)]
        weights = {name: self._tensor(name) for name in self._base}
        try:
            self.journal.record_snapshot(after_batch, applied, weights, self._base_sha256(weights))
        except OSError as error:  # the batch is journaled; a snapshot only saves replay time
            logger.warning("no snapshot after batch %d: %s", after_batch, error)
            return
        self._since_snapshot = 0

    @torch.no_grad()
    def _switch(self, weights: dict[str, torch.Tensor]) -> None:
        for name, value in weights.items():
            self._tensor(name).copy_(value)

    def rebuild(self) -> None:
        """Set the edited modules to base weights plus every applied batch, in order."""
        weights, self._since_snapshot = self._replayed()
        self._switch(weights)

    def _hold_journaled(self, applied: Sequence[BatchRecord]) -> None:
        """Give the editor back what it held of each applied batch (its keys, its
        edits), in order."""
        if not hasattr(self.editor, "hold"):
            return
        requests: dict[int, list[EditRequest]] = {batch.id: [] for batch in applied}
        for edit in self.journal.edits():  # in id order, which is each batch's order
            if edit.batch_id in requests:
                requests[edit.batch_id].append(edit.request)
        for batch in applied:
            held = self.journal.held(batch)
            self._releases[batch.id] = self.editor.hold(held, requests[batch.id])

    def apply(
        self, requests: Sequence[EditRequest], *, client_key: str | None = None
    ) -> BatchRecord:
        """Edit the model and journal the batch; on any failure the model is unchanged.

        A batch the method rejects (for instance a non-finite update) is
        journaled as failed and the error is raised again. A `client_key`
        already in the journal returns that batch instead of editing again,
        so a client's retry cannot apply a batch twice.
        """
        if client_key is not None:
            earlier = self.journal.batches(client_key=client_key)
            if earlier:
                sent = [request.to_dict() for request in requests]
                if [e.request.to_dict() for e in self.journal.batch_edits(earlier[0].id)] != sent:
                    raise KeyReusedError(
                        f"key {client_key!r} was used for batch {earlier[0].id}, "
                        "which held other edits"
                    )
                return earlier[0]
        if self.editor is None:
            raise JournalError("this model was opened for replay only; it has no editing method")
        config = self.editor.config_dict()
        try:
            applied = self.editor.apply(requests)
        except Exception as error:
            self.journal.record(
                requests,
                method=self.editor.name,
                method_config=config,
                model=self.handle.name,
                status=FAILED,
                error=f"{type(error).__name__}: {error}",
            )  # without the key: a retry may try again
            raise
        deltas = getattr(applied, "deltas", {})
        try:
            if isinstance(applied, WeightDelta):
                for name, before in applied.before.items():
                    self._base.setdefault(name, before)
            base_sha256 = self._base_sha256(deltas)
            record = self.journal.record(
                requests,
                method=self.editor.name,
                method_config=config,
                model=self.handle.name,
                base_sha256=base_sha256,
                deltas=deltas,
                held=getattr(applied, "held", None),
                client_key=client_key,
            )
        except BaseException:
            applied.undo()
            raise
        release = getattr(applied, "on_undo", None)
        if release is not None:
            self._releases[record.id] = release
        self._snapshot_if_due(record.id)
        return record

    def undo(self, batch_id: int) -> BatchRecord:
        """Undo one applied batch, all or nothing.

        The weights without it are computed first; only then are they switched
        in and the journal updated. If either step fails, the live model and
        the journal are as they were.
        """
        batch = self.journal.batch(batch_id)
        if batch.status != APPLIED:
            raise JournalError(f"batch {batch_id} is {batch.status}, not applied")
        weights, since = self._replayed(without=batch_id)
        current = {name: self._tensor(name).detach().clone() for name in weights}
        self._switch(weights)
        try:
            record = self.journal.set_status(batch_id, UNDONE)
        except BaseException:
            self._switch(current)
            raise
        self._since_snapshot = since
        release = self._releases.pop(batch_id, None)
        if release is not None:
            release()
        return record


def _check_method(
    journal: Journal, applied: Sequence[BatchRecord], editor: EditMethod | None
) -> None:
    """Refuse an editor the journal cannot hold or did not write, and a replay
    without its editor that would silently leave a memory method's edits out."""
    written_by = {batch.method for batch in applied}
    if editor is None:
        in_memory = sorted(written_by & MEMORY_METHODS)
        if in_memory:
            raise JournalError(
                f"{journal.path} holds edits of '{in_memory[0]}', which live in the editor's "
                "memory, not in the weights: open it with that method (lledit serve/edit "
                "--method), since the weights alone would be the unedited model"
            )
        return
    if not (edits_weights(editor) or hasattr(editor, "hold")):
        raise JournalError(
            f"method '{editor.name}' keeps its edits in its own memory, which the journal "
            "cannot hold yet; keep this editor with its save(dir)"
        )
    others = written_by - {editor.name}
    if others:
        raise JournalError(
            f"{journal.path} holds batches written by {sorted(others)}; edit it with "
            f"that method (not '{editor.name}'), or start a new journal"
        )


def _check_settings(journal: Journal, applied: Sequence[BatchRecord], editor: EditMethod) -> None:
    """Refuse an editor whose settings differ from those of the journal's latest
    batch: what it edits next would not be what the journal's own run would edit."""
    if not applied:
        return
    written = applied[-1].method_config
    current = json.loads(json.dumps(editor.config_dict()))
    changed = sorted(k for k in written.keys() | current.keys() if written.get(k) != current.get(k))
    if changed:
        differences = "; ".join(
            f"{key}: {written.get(key)!r} there, {current.get(key)!r} here" for key in changed[:3]
        )
        raise JournalError(
            f"{journal.path} was written by '{editor.name}' with other settings ({differences}); "
            "open it with the journal's settings, or start a new journal"
        )
