"""Crash safety: `lledit serve` killed mid-batch leaves a journal that replays exactly.

The service is SIGKILLed while an edit request is in flight. Every batch it
acknowledged must be in the journal, no batch may be partly written, and the
journal must rebuild the same weights as an uninterrupted `lledit edit` run
over the same batches.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from conftest import make_tiny_model, make_tokenizer
from safetensors.torch import load_file

from lledit import EditRequest, load_dataset
from lledit.journal import APPLIED, Journal

BATCH_SIZE = 2
MAX_BATCHES = 40
KILL_AFTER = 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lledit(*arguments: str | Path) -> None:
    command = [sys.executable, "-m", "lledit.cli", *map(str, arguments)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"


def wait_until_healthy(client: httpx.Client, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the service exited:\n{log.read_text()}"
        try:
            if client.get("/v1/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the service did not come up in 60 s:\n{log.read_text()}")


def send_until_killed(
    client: httpx.Client, server: subprocess.Popen, batches: list[list[EditRequest]]
) -> tuple[dict[int, list[EditRequest]], int | None]:
    """Post batches one after another; after KILL_AFTER answers, SIGKILL the service.

    The kill comes from a timer after a random delay of up to two batch
    durations, so it lands while a later request is being served. Returns
    the acknowledged batches and the index of the batch cut off.
    """
    acknowledged: dict[int, list[EditRequest]] = {}
    durations: list[float] = []
    killer = None
    try:
        for index, batch in enumerate(batches):
            if killer is None and len(acknowledged) == KILL_AFTER:
                delay = random.uniform(0, 2 * statistics.median(durations))
                killer = threading.Timer(delay, os.kill, (server.pid, signal.SIGKILL))
                killer.start()
            started = time.perf_counter()
            try:
                response = client.post("/v1/edits", json={"edits": [r.to_dict() for r in batch]})
            except httpx.TransportError:
                return acknowledged, index
            durations.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
            acknowledged[response.json()["batch_id"]] = batch
        return acknowledged, None
    finally:
        if killer is not None:
            killer.join()


def test_killed_service_leaves_a_journal_that_replays_exactly(tmp_path):
    model_dir = tmp_path / "model"
    tokenizer = make_tokenizer()
    make_tiny_model("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    requests = load_dataset("builtin", "train").requests[: MAX_BATCHES * BATCH_SIZE]
    batches = [requests[i : i + BATCH_SIZE] for i in range(0, len(requests), BATCH_SIZE)]

    journal_path, log = tmp_path / "j.db", tmp_path / "serve.log"
    port = free_port()
    command = [sys.executable, "-m", "lledit.cli", "serve", "--journal", str(journal_path)]
    command += ["--method", "ft", "--model", str(model_dir), "--set", "steps=2"]
    command += ["--port", str(port)]
    with log.open("w") as output:
        server = subprocess.Popen(command, env=ENV, stdout=output, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_until_healthy(client, server, log)
            acknowledged, cut_off = send_until_killed(client, server, batches)
        assert server.wait(timeout=30) == -signal.SIGKILL
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert cut_off is not None, "the kill came after the last batch; no request was in flight"
    assert len(acknowledged) >= KILL_AFTER

    journal = Journal(journal_path)
    recorded = journal.batches()
    edits = journal.edits()
    journal.close()
    assert [batch.status for batch in recorded] == [APPLIED] * len(recorded)
    assert set(acknowledged) <= {batch.id for batch in recorded}
    # The batch cut off is either wholly in the journal or absent.
    assert len(recorded) in (len(acknowledged), len(acknowledged) + 1)
    assert len(recorded) <= cut_off + 1
    for batch in recorded:
        assert len(batch.edit_ids) == BATCH_SIZE, f"batch {batch.id} is partly written"
    journaled = [[e.request for e in edits if e.batch_id == batch.id] for batch in recorded]
    assert journaled == batches[: len(recorded)]
    for batch_id, sent in acknowledged.items():
        assert [e.request for e in edits if e.batch_id == batch_id] == sent

    replay = tmp_path / "replay.jsonl"
    lines = [json.dumps(request.to_dict()) for batch in journaled for request in batch]
    replay.write_text("\n".join(lines) + "\n")
    uninterrupted = tmp_path / "j2.db"
    lledit(
        "edit",
        "--journal",
        uninterrupted,
        "--method",
        "ft",
        "--model",
        model_dir,
        "--set",
        "steps=2",
        "--batch-size",
        BATCH_SIZE,
        replay,
    )
    lledit("export", "--journal", journal_path, "--out", tmp_path / "e1")
    lledit("export", "--journal", uninterrupted, "--out", tmp_path / "e2")

    served = load_file(str(tmp_path / "e1" / "model.safetensors"))
    expected = load_file(str(tmp_path / "e2" / "model.safetensors"))
    base = load_file(str(model_dir / "model.safetensors"))
    assert served.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(served[name], tensor), name
    assert any(not torch.equal(served[name], base[name]) for name in base), "nothing was edited"
