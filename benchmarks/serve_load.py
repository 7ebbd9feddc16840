"""The HTTP service under load: reads from many clients while edit batches stream in.

Starts `lledit serve` on loopback (default model, or `--model DIR`), then runs
8 client threads issuing generate (8 new tokens) and score requests while one
more thread applies 50 edit batches of 5 built-in train requests one after
another (the 200 records are reused once exhausted), and one more polls
`/v1/health` every 0.2 s. With `--heavy-score`, one of the clients instead
sends the largest score request the service accepts (100 candidates, close to
its token budget) again and again. Stops after the last batch or the time
limit. Reports throughput and p50/p99 latency per kind, the number of errors
(must be 0) and the service's peak RSS, and checks that every acknowledged
batch and edit is in the journal afterwards.
Run: `python benchmarks/serve_load.py [--model DIR] [--method ft] [--batches 50]
[--set steps=15] [--heavy-score]`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from lledit import EditRequest, load_dataset
from lledit.journal import APPLIED, Journal

HOST = "127.0.0.1"
KINDS = ("edit", "generate", "score", "heavy score", "health")


class Results:
    """Latencies and errors per request kind, shared by all threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)

    def post(self, kind: str, client: httpx.Client, path: str, body: dict | None) -> Any:
        """The JSON answer of a successful request (a GET without `body`), None (and an
        error counted) otherwise."""
        started = time.perf_counter()
        try:
            response = client.get(path) if body is None else client.post(path, json=body)
        except httpx.HTTPError as error:
            failure = f"{kind}: {type(error).__name__}: {error}"
        else:
            if response.status_code == 200:
                with self.lock:
                    self.latencies[kind].append(time.perf_counter() - started)
                return response.json()
            failure = f"{kind}: HTTP {response.status_code}: {response.text[:200]}"
        with self.lock:
            self.errors[kind].append(failure)
        return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_service(arguments: argparse.Namespace, journal: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "lledit.cli", "serve", "--journal", str(journal)]
    command += ["--method", arguments.method, "--host", HOST, "--port", str(port)]
    # Every reading client may be in flight at once: none should be told to retry.
    command += ["--max-concurrent-reads", str(arguments.clients)]
    command += ["--model", arguments.model] if arguments.model else []
    for setting in arguments.settings:
        command += ["--set", setting]
    log = journal.with_name("service.log")
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    base_url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the service exited with code {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base_url}/v1/health", timeout=5).status_code == 200:
                return server, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    sys.exit("the service did not answer within 300 s")


def run_load(
    arguments: argparse.Namespace,
    base_url: str,
    batches: list[list[EditRequest]],
    probes: list[EditRequest],
) -> tuple[float, Results, list[dict]]:
    """One editing thread and `--clients` reading threads; returns wall time and results."""
    results = Results()
    acknowledged: list[dict] = []
    edits_done = threading.Event()
    deadline = time.monotonic() + arguments.time_limit

    def edit() -> None:
        with httpx.Client(base_url=base_url, timeout=arguments.time_limit) as client:
            for batch in batches:
                if time.monotonic() > deadline:
                    break
                body = {"edits": [request.to_dict() for request in batch]}
                answer = results.post("edit", client, "/v1/edits", body)
                if answer is not None:
                    acknowledged.append(answer)
        edits_done.set()

    def read(worker: int) -> None:
        with httpx.Client(base_url=base_url, timeout=arguments.time_limit) as client:
            heavy = heaviest_score(client) if arguments.heavy_score and worker == 0 else None
            for count in itertools.count(worker):
                if edits_done.is_set() or time.monotonic() > deadline:
                    return
                probe = probes[count % len(probes)]
                if heavy is not None:
                    results.post("heavy score", client, "/v1/score", heavy)
                elif count % 2:
                    body = {"prompt": probe.prompt, "max_new_tokens": arguments.max_new_tokens}
                    results.post("generate", client, "/v1/generate", body)
                else:
                    candidates = [probe.target_new, probe.target_true or "nothing"]
                    body = {"prompt": probe.prompt, "candidates": candidates}
                    results.post("score", client, "/v1/score", body)

    def health() -> None:
        with httpx.Client(base_url=base_url, timeout=arguments.time_limit) as client:
            while not edits_done.is_set() and time.monotonic() < deadline:
                results.post("health", client, "/v1/health", None)
                time.sleep(0.2)

    threads = [threading.Thread(target=edit), threading.Thread(target=health)]
    threads += [threading.Thread(target=read, args=(i,)) for i in range(arguments.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, results, acknowledged


def heaviest_score(client: httpx.Client) -> dict:
    """A score request of 100 candidates, each as long as the token budget allows."""
    for words in range(20, 0, -1):
        candidates = [f"{index} " + " ".join(["Paris"] * words) for index in range(100)]
        body = {"prompt": "The capital of France is", "candidates": candidates}
        if client.post("/v1/score", json=body).status_code == 200:
            return body
    raise RuntimeError("the service refused even one-word candidates")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set so far (Linux's VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc (not Linux?)")


def unjournaled(journal_path: Path, acknowledged: list[dict]) -> list[dict]:
    """Acknowledged batches whose batch or edits are not in the journal as applied."""
    journal = Journal(journal_path)
    applied = {batch.id: batch for batch in journal.batches(status=APPLIED)}
    edit_ids = {edit.id for edit in journal.edits()}
    journal.close()
    return [
        answer
        for answer in acknowledged
        if answer["batch_id"] not in applied
        or tuple(answer["edit_ids"]) != applied[answer["batch_id"]].edit_ids
        or not set(answer["edit_ids"]) <= edit_ids
    ]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Local model folder; default SmolLM2-135M.")
    parser.add_argument("--method", default="ft")
    parser.add_argument("--set", dest="settings", action="append", default=[])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=600, help="Seconds of load at most.")
    parser.add_argument(
        "--heavy-score", action="store_true", help="One client sends the largest score."
    )
    arguments = parser.parse_args()

    size = arguments.batch_size
    train = load_dataset("builtin", "train").requests
    requests = list(itertools.islice(itertools.cycle(train), arguments.batches * size))
    batches = [requests[i : i + size] for i in range(0, len(requests), size)]
    probes = load_dataset("builtin", "eval").requests

    with tempfile.TemporaryDirectory(prefix="lledit-serve-load-") as workdir:
        journal_path = Path(workdir) / "journal.db"
        server, base_url = start_service(arguments, journal_path)
        try:
            wall, results, acknowledged = run_load(arguments, base_url, batches, probes)
            peak = peak_rss_mib(server.pid)
        finally:
            server.terminate()  # SIGTERM: uvicorn finishes in-flight requests first
            server.wait(timeout=120)
        missing = unjournaled(journal_path, acknowledged)

    print(
        f"{len(acknowledged)}/{len(batches)} batches of {size} edits, {arguments.clients} "
        f"read clients, {wall:.1f} s, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    )
    print(f"{'kind':<10}{'requests':>10}{'req/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for kind in KINDS:
        latencies, errors = results.latencies[kind], results.errors[kind]
        p50 = f"{1000 * percentile(latencies, 0.5):.0f}" if latencies else "-"
        p99 = f"{1000 * percentile(latencies, 0.99):.0f}" if latencies else "-"
        print(
            f"{kind:<10}{len(latencies):>10}{len(latencies) / wall:>9.2f}"
            f"{p50:>10}{p99:>10}{len(errors):>8}"
        )
    errors = [error for kind in KINDS for error in results.errors[kind]]
    for error in errors[:5]:
        print(f"error: {error}")
    print(f"service peak RSS: {peak:.0f} MiB")
    print(f"acknowledged batches missing from the journal: {len(missing)}")
    if errors or missing:
        sys.exit(1)


if __name__ == "__main__":
    main()
