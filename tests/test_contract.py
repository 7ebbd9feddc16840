"""What every registered method promises, checked for each one on both tiny models.

A new method added to `METHODS` is checked here without writing anything; it
may add small settings to `FAST` so that it runs in a second on the tiny
models. The checklist for method authors:

- an empty batch is refused;
- a batch changes the model's answers, and undoing it restores the weights
  bit for bit and the outputs exactly (memories included);
- `config_dict` is JSON, names the edited modules, and the settings in it
  rebuild the same editor through `make_editor`;
- `KEY=VALUE` settings (the CLI's `--set`) reach the config;
- `memory_share` counts the same on a meta-device skeleton as on the model,
  and at least the deltas a batch keeps;
- a method with state (`save`/`load`) reloads into the same outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model
from conftest import assert_weights_equal, make_tiny_model, snapshot
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lledit import EditRequest, make_editor
from lledit.hypernet.training import HypernetTrainer
from lledit.journal import Journal, JournaledModel
from lledit.methods import METHODS, editor_share, parse_settings, train_config_class
from lledit.model import ModelHandle, load_model

FAST = {
    "ft": {"steps": 5},
    "locft": {"epochs": 3},
    "memit": {"stats_samples": 600, "prefix_count": 1, "prefix_length": 3, "value_steps": 3},
    "alphaedit": {
        "stats_samples": 600,
        "prefix_count": 1,
        "prefix_length": 3,
        "value_steps": 3,
        "null_space_threshold": 0.5,
    },
    "elder": {"steps": 5},
    "grace": {"steps": 5},
    "memoir": {"steps": 5},
}
"""Settings that keep each method quick on the tiny models."""

TRAINED = {"mend", "malmen", "rledit"}

BATCH = [
    EditRequest("The capital of France is", "Rome", subject="France"),
    EditRequest("Harry Potter was written by", "Stephen King", subject="Harry Potter"),
]
PROBES = [r.prompt for r in BATCH] + ["The chemical symbol for gold is"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Key statistics go to a fresh cache directory, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    """A network trained for two steps per hypernetwork method and architecture."""
    folders = {}
    for method in sorted(TRAINED):
        for arch in ("llama", "gpt2"):
            handle = ModelHandle(make_tiny_model(arch, len(tokenizer)), tokenizer, f"tiny-{arch}")
            config = train_config_class(method)(
                layers="2-3", rank=4, n_blocks=1, batch_size=2, steps=2, warmup_batches=1,
                checkpoint_every=2, validation_edits=0,
            )  # fmt: skip
            out = tmp_path_factory.mktemp(f"{method}-{arch}")
            requests = [
                EditRequest(prompt, target, rephrases=(prompt,), locality=(("It is", "big"),))
                for prompt in PROBES
                for target in ("Rome", "Tokyo")
            ]
            HypernetTrainer(handle, METHODS[method], config, requests, out, data_info={}).train()
            folders[method, arch] = str(out)
    return folders


def _settings(method: str, arch: str, checkpoints) -> dict:
    settings = dict(FAST.get(method, {}))
    if method in TRAINED:
        settings["checkpoint"] = checkpoints[method, arch]
    return settings


def _outputs(handle: ModelHandle) -> torch.Tensor:
    encoded = handle.tokenizer(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return handle.model(**encoded, use_cache=False).logits


def _copy(handle: ModelHandle) -> ModelHandle:
    """The same tiny model, unedited."""
    return ModelHandle(
        make_tiny_model(handle.arch.name, len(handle.tokenizer)), handle.tokenizer, handle.name
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_method_contract(method, tiny, checkpoints, tmp_path):
    arch = tiny.arch.name
    settings = _settings(method, arch, checkpoints)
    editor = make_editor(method, tiny, **settings)
    weights, outputs = snapshot(tiny), _outputs(tiny)

    with pytest.raises(ValueError, match="at least one request"):
        editor.apply([])
    assert_weights_equal(tiny, weights)

    applied = editor.apply(BATCH)
    edited = _outputs(tiny)
    if method != "none":
        assert not torch.equal(edited, outputs), "the batch changed nothing"
    applied.undo()
    assert_weights_equal(tiny, weights)
    assert torch.equal(_outputs(tiny), outputs)

    record = editor.config_dict()
    assert json.loads(json.dumps(record)) == record
    for module in record["modules"]:
        tiny.weight_of(module)
    if method != "none":
        assert record["modules"], "config_dict names no edited module"
    fields = {field.name for field in dataclasses.fields(METHODS[method].config_class)}
    rebuilt = make_editor(method, _copy(tiny), **{k: v for k, v in record.items() if k in fields})
    assert rebuilt.config_dict() == record

    if hasattr(editor, "save"):
        editor.apply(BATCH)
        expected = _outputs(tiny)
        editor.save(tmp_path / method)
        restored = _copy(tiny)
        make_editor(method, restored, **settings).load(tmp_path / method)
        assert torch.equal(_outputs(restored), expected)


@pytest.mark.parametrize("method", list(METHODS))
def test_an_editor_counts_its_memory_on_the_model_skeleton_as_on_the_model(
    method, tiny, checkpoints
):
    settings = _settings(method, tiny.arch.name, checkpoints)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(tiny.model.config)
    on_skeleton = ModelHandle(skeleton, tiny.tokenizer, tiny.name)
    counted, share = editor_share(method, **settings)(on_skeleton)
    editor = make_editor(method, tiny, **settings)
    assert (counted, share) == (method, editor.memory_share())
    kept = getattr(editor.apply(BATCH), "deltas", {}).values()
    assert share >= sum(tensor.numel() * tensor.element_size() for tensor in kept)


@pytest.mark.parametrize("method", list(METHODS))
def test_settings_reach_the_config(method, tiny, checkpoints):
    """Every number a config holds can be set as KEY=VALUE, as `--set` does."""
    base = _settings(method, tiny.arch.name, checkpoints)
    defaults = dataclasses.asdict(METHODS[method].config_class(**base))
    reached = []
    for key, value in defaults.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        changed = value + 1 if isinstance(value, int) else value / 2
        parsed = parse_settings(method, [f"{key}={changed}"])
        assert parsed == {key: changed}
        try:
            editor = make_editor(method, tiny, **{**base, **parsed})
        except ValueError:
            continue  # a value its checks refuse; another field shows the path
        assert editor.config_dict()[key] == changed
        reached.append(key)
    numeric = [k for k, v in defaults.items() if isinstance(v, int | float)]
    assert bool(reached) == bool(numeric), f"no numeric setting of {method} could be set"
    with pytest.raises(ValueError, match=f"method '{method}' has no setting 'no_such_setting'"):
        parse_settings(method, ["no_such_setting=1"])


def _state(editor, folder) -> dict[str, torch.Tensor]:
    """What an editor keeps beside the model's weights: its own tensors, everything it
    saves, and the keys it holds for later batches (AlphaEdit's, RLEdit's)."""
    state = {f"tensor {name}": value for name, value in getattr(editor, "tensors", dict)().items()}
    if hasattr(editor, "save"):
        editor.save(folder)
        for path in sorted(folder.glob("*.safetensors")):
            state |= {f"saved {name}": value for name, value in load_file(path).items()}
    state |= {f"keys {name}": gram for name, gram in getattr(editor, "past_keys", {}).items()}
    held = getattr(editor, "held", None)
    if held is not None:
        state |= {f"precision {name}": value for name, value in held.precisions.items()}
    return state


def _assert_same_end(restarted: JournaledModel, straight: JournaledModel, folder) -> None:
    """Bit-identical weights, editor state and outputs."""
    assert_weights_equal(restarted.handle, snapshot(straight.handle))
    expected = _state(straight.editor, folder / "saved straight")
    found = _state(restarted.editor, folder / "saved restarted")
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(found[name], value), name
    assert torch.equal(_outputs(restarted.handle), _outputs(straight.handle))


@pytest.mark.parametrize("method", list(METHODS))
def test_a_restarted_stream_ends_where_an_uninterrupted_one_does(
    method, tiny, checkpoints, tmp_path
):
    """Two batches, an undo of the first and a third batch in one go, against the
    same stream killed after the undo and restarted from its journal."""
    gold = EditRequest("The chemical symbol for gold is", "Ag")
    stream = [[BATCH[0]], [BATCH[1]], "undo 1", [gold]]
    restart_after = 3
    settings = _settings(method, tiny.arch.name, checkpoints)

    def journaled(handle, path):
        return JournaledModel(handle, Journal(path), make_editor(method, handle, **settings))

    def run(model, events):
        for event in events:
            if event == "undo 1":
                model.undo(1)
            else:
                model.apply(event)

    straight = journaled(tiny, tmp_path / "straight.db")
    run(straight, stream)
    first = journaled(_copy(tiny), tmp_path / "restarted.db")
    run(first, stream[:restart_after])
    first.journal.release_lock()  # what a killed process leaves: no clean close
    # A restart on another machine: no cached key statistics to fall back on.
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    restarted = journaled(_copy(tiny), tmp_path / "restarted.db")
    run(restarted, stream[restart_after:])
    _assert_same_end(restarted, straight, tmp_path)


def _batches_recorded(path) -> int:
    if not path.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            return connection.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not written yet
        return 0


@pytest.mark.parametrize("method", list(METHODS))
def test_a_stream_killed_mid_batch_restarts_where_an_uninterrupted_one_ends(
    method, tiny, checkpoints, tmp_path, monkeypatch
):
    """`lledit edit` is SIGKILLed once its second batch is journaled; the stream,
    restarted from the journal and continued, ends bit for bit where a run
    without the kill does."""
    monkeypatch.chdir(tmp_path)  # the folder's name is the model's, as the networks expect
    model_dir = Path(tiny.name)
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    stream = [BATCH[0], BATCH[1], EditRequest("The chemical symbol for gold is", "Ag")] * 2
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps(request.to_dict()) + "\n" for request in stream))
    settings = _settings(method, tiny.arch.name, checkpoints)
    journal = tmp_path / "killed.db"
    command = [sys.executable, "-m", "lledit.cli", "edit", str(edits), "--journal", str(journal),
               "--method", method, "--model", str(model_dir), "--batch-size", "1"]  # fmt: skip
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    # As many threads as this process: how a CPU splits a product over threads changes
    # its rounding, and the two runs are compared bit for bit.
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while process.poll() is None and _batches_recorded(journal) < 2:
        assert time.monotonic() < deadline, "no second batch within 120 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=30)
    assert process.returncode in (0, -signal.SIGKILL), output.decode()

    def journaled(path):
        handle = load_model(str(model_dir))
        return JournaledModel(handle, Journal(path), make_editor(method, handle, **settings))

    restarted = journaled(journal)
    done = len(restarted.journal.batches())
    assert all(batch.status == "applied" for batch in restarted.journal.batches())
    for request in stream[done:]:
        restarted.apply([request])
    straight = journaled(tmp_path / "straight.db")
    for request in stream:
        straight.apply([request])
    _assert_same_end(restarted, straight, tmp_path)


def _device_map(handle: ModelHandle) -> dict[str, str]:
    """The model in pieces, each decoder layer its own entry, as a map over GPUs has them
    (all on the CPU here)."""
    layers = handle.arch.layers
    pieces = {f"{layers}.{index}": "cpu" for index in range(handle.num_layers)}
    base = layers.rpartition(".")[0]
    for name, _ in handle.module(base).named_children():
        if f"{base}.{name}" != layers:
            pieces[f"{base}.{name}"] = "cpu"
    for name, _ in handle.model.named_children():
        if name != base:
            pieces[name] = "cpu"
    return pieces


@pytest.mark.parametrize("method", list(METHODS))
def test_a_model_split_by_a_device_map_edits_undoes_and_replays_like_a_whole_one(
    method, tiny, checkpoints, tmp_path, monkeypatch
):
    """Loaded with a device map and wrapped in accelerate's per-layer hooks, as a
    model split over GPUs is, the model takes a journaled batch, its undo and a
    restart exactly as the unsplit model does."""
    monkeypatch.chdir(tmp_path)  # the folder's name is the model's, as the networks expect
    tiny.model.save_pretrained(tiny.name)
    tiny.tokenizer.save_pretrained(tiny.name)
    settings = _settings(method, tiny.arch.name, checkpoints)
    device_map = _device_map(tiny)

    def split_model() -> ModelHandle:
        handle = load_model(tiny.name, device_map=device_map)
        dispatch_model(handle.model, device_map, force_hooks=True)
        assert hasattr(handle.module(handle.decoder_layer(1)), "_hf_hook")
        return handle

    def journaled(handle, path):
        return JournaledModel(handle, Journal(path), make_editor(method, handle, **settings))

    weights, outputs = snapshot(tiny), _outputs(tiny)
    whole = journaled(tiny, tmp_path / "whole.db")
    split = journaled(split_model(), tmp_path / "split.db")
    whole.apply(BATCH)
    split.apply(BATCH)
    _assert_same_end(split, whole, tmp_path)
    split.journal.release_lock()
    restarted = journaled(split_model(), tmp_path / "split.db")
    _assert_same_end(restarted, whole, tmp_path)
    restarted.undo(1)
    assert_weights_equal(restarted.handle, weights)
    assert torch.equal(_outputs(restarted.handle), outputs)


def test_an_edited_module_offloaded_by_the_device_map_is_refused_by_name(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    device_map = _device_map(tiny)
    device_map[tiny.decoder_layer(3)] = "disk"
    handle = load_model(str(tmp_path), device_map=device_map)
    offloaded = handle.layer_module(3, handle.arch.mlp_out)
    with pytest.raises(ValueError, match=f"module '{offloaded}' is offloaded by the device map"):
        make_editor("ft", handle, layers="3")
    assert make_editor("ft", handle, layers="2").config_dict()["modules"] == [
        handle.layer_module(2, handle.arch.mlp_out)
    ]
