import json

import pytest
import torch
from conftest import assert_weights_equal, make_tiny_model, snapshot
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lledit import EditRequest
from lledit.cli import app
from lledit.edit import NonFiniteUpdateError, add_weight_deltas, apply_weight_deltas
from lledit.journal import APPLIED, FAILED, UNDONE, Journal, JournaledModel, JournalError
from lledit.methods import make_editor
from lledit.model import ModelHandle, load_model

FT = {"steps": 3, "lr": 0.05, "norm_bound": 0.5}


@pytest.fixture(params=["llama", "gpt2"])
def fresh(request, tokenizer):
    """A factory of identical, unedited tiny models (a restart loads the same base)."""
    return lambda: ModelHandle(
        make_tiny_model(request.param, len(tokenizer)), tokenizer, f"tiny-{request.param}"
    )


def open_model(handle, path, editor=True):
    return JournaledModel(
        handle, Journal(path), make_editor("ft", handle, **FT) if editor else None
    )


def test_restart_rebuilds_the_exact_weights(fresh, requests_small, tmp_path):
    live = open_model(fresh(), tmp_path / "j.db")
    first = live.apply(requests_small[:2])
    second = live.apply(requests_small[2:])
    assert (first.status, second.status) == (APPLIED, APPLIED)
    assert first.edit_ids == (1, 2) and second.edit_ids == (3,)
    assert (tmp_path / "j.db.deltas" / first.delta_file).is_file()
    restarted = open_model(fresh(), tmp_path / "j.db", editor=False)
    assert_weights_equal(restarted.handle, snapshot(live.handle))
    edits = restarted.journal.edits()
    assert [e.request for e in edits] == requests_small


def test_undo_of_an_old_batch_removes_only_its_delta(fresh, requests_small, tmp_path):
    base = snapshot(fresh())
    live = open_model(fresh(), tmp_path / "j.db")
    first = live.apply(requests_small[:1])
    second = live.apply(requests_small[1:])
    live.undo(first.id)
    assert live.journal.batch(first.id).status == UNDONE
    # What is left is the base model plus the second batch's delta alone.
    only_second = fresh()
    apply_weight_deltas(only_second, live.journal.deltas(second))
    current = snapshot(live.handle)
    assert_weights_equal(only_second, current)
    restarted = open_model(fresh(), tmp_path / "j.db", editor=False)
    assert_weights_equal(restarted.handle, current)
    live.undo(second.id)
    assert_weights_equal(live.handle, base)
    with pytest.raises(JournalError, match="is undone, not applied"):
        live.undo(second.id)
    with pytest.raises(JournalError, match="no batch 99"):
        live.undo(99)


def test_failed_batch_is_journaled_and_changes_nothing(fresh, requests_small, tmp_path):
    live = open_model(fresh(), tmp_path / "j.db")
    before = snapshot(live.handle)
    poison = live.handle.module(live.editor.modules[0]).register_forward_hook(
        lambda module, inputs, output: output * float("nan")
    )
    try:
        with pytest.raises(NonFiniteUpdateError):
            live.apply(requests_small)
    finally:
        poison.remove()
    assert_weights_equal(live.handle, before)
    (failed,) = live.journal.batches()
    assert failed.status == FAILED and "NonFiniteUpdateError" in failed.error
    assert failed.delta_file is None and len(failed.edit_ids) == 3


def test_journal_refuses_another_base_model(fresh, tokenizer, requests_small, tmp_path):
    live = open_model(fresh(), tmp_path / "j.db")
    live.apply(requests_small[:1])
    live.journal.close()
    other = fresh()
    with torch.no_grad():
        other.weight_of(live.editor.modules[0]).add_(1.0)
    with pytest.raises(JournalError, match="base weights"):
        open_model(other, tmp_path / "j.db")
    renamed = fresh()
    renamed.name = "something-else"
    with pytest.raises(JournalError, match="was written for model"):
        open_model(renamed, tmp_path / "j.db")


def test_replay_only_model_cannot_edit(fresh, requests_small, tmp_path):
    replay = open_model(fresh(), tmp_path / "j.db", editor=False)
    with pytest.raises(JournalError, match="replay only"):
        replay.apply(requests_small)


def test_cli_edit_history_undo_export_round_trip(fresh, requests_small, tmp_path):
    handle = fresh()
    model_dir = tmp_path / "model"
    handle.model.save_pretrained(model_dir)
    handle.tokenizer.save_pretrained(model_dir)
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in requests_small))
    journal = tmp_path / "j.db"
    runner = CliRunner()
    common = ["--journal", str(journal)]
    result = runner.invoke(
        app,
        ["edit", str(edits), *common, "--method", "ft", "--model", str(model_dir),
         "--batch-size", "2", "--set", "steps=3", "--set", "lr=0.05", "--set", "norm_bound=0.5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [b.status for b in Journal(journal).batches()] == [APPLIED, APPLIED]

    result = runner.invoke(app, ["history", *common], terminal_width=200)
    assert result.exit_code == 0 and "applied" in result.output

    result = runner.invoke(app, ["undo", "1", *common])
    assert result.exit_code == 0, result.output
    assert [b.status for b in Journal(journal).batches()] == [UNDONE, APPLIED]

    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", *common, "--out", str(out)])
    assert result.exit_code == 0, result.output
    plain = AutoModelForCausalLM.from_pretrained(out)
    replayed = JournaledModel(load_model(str(model_dir)), Journal(journal))
    replayed_weights = snapshot(replayed.handle)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, replayed_weights[name]), name
    assert not torch.equal(
        replayed.handle.weight_of(replayed.handle.layer_module(2, replayed.handle.arch.mlp_out)),
        fresh().weight_of(replayed.handle.layer_module(2, replayed.handle.arch.mlp_out)),
    )

    result = runner.invoke(app, ["undo", "7", *common])
    assert result.exit_code == 2 and "no batch 7" in result.output
    result = runner.invoke(app, ["history", "--journal", str(tmp_path / "none.db")])
    assert result.exit_code == 2 and "no journal at" in result.output


def test_edit_requests_round_trip_through_the_journal(tmp_path):
    journal = Journal(tmp_path / "j.db")
    request = EditRequest("p", "t", rephrases=["r"], locality=[("l", "a")], id="x")
    record = journal.record([request], method="none", method_config={}, model="m")
    assert journal.edit(record.edit_ids[0]).request == request
    assert journal.edit(record.edit_ids[0]).to_dict()["request"]["id"] == "x"


# Robustness --------------------------------------------------------------------------------


def _two_batches(fresh, requests_small, path):
    live = open_model(fresh(), path)
    return live, live.apply(requests_small[:1]), live.apply(requests_small[1:])


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "swapped", "missing"])
def test_a_damaged_delta_file_is_refused_and_nothing_is_half_replayed(
    fresh, requests_small, tmp_path, damage
):
    live, first, second = _two_batches(fresh, requests_small, tmp_path / "j.db")
    live.journal.close()
    folder = tmp_path / "j.db.deltas"
    first_file, second_file = folder / first.delta_file, folder / second.delta_file
    data = bytearray(second_file.read_bytes())
    if damage == "corrupted":
        data[-1] ^= 0xFF
        second_file.write_bytes(bytes(data))
    elif damage == "truncated":
        second_file.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "swapped":
        second_file.write_bytes(first_file.read_bytes())
        first_file.write_bytes(bytes(data))
    else:
        second_file.unlink()
    handle = fresh()
    base = snapshot(handle)
    expected = "missing" if damage == "missing" else "not the one the journal wrote"
    batch = first.id if damage == "swapped" else second.id
    with pytest.raises(JournalError, match=f"batch {batch}: its delta file .* {expected}"):
        JournaledModel(handle, Journal(tmp_path / "j.db"))
    assert_weights_equal(handle, base)


def test_an_undo_whose_rebuild_fails_changes_nothing(fresh, requests_small, tmp_path):
    live, first, second = _two_batches(fresh, requests_small, tmp_path / "j.db")
    before = snapshot(live.handle)
    (tmp_path / "j.db.deltas" / second.delta_file).unlink()
    with pytest.raises(JournalError, match=f"batch {second.id}: its delta file"):
        live.undo(first.id)
    assert_weights_equal(live.handle, before)
    assert [b.status for b in live.journal.batches()] == [APPLIED, APPLIED]


def test_a_second_writer_is_refused(fresh, requests_small, tmp_path):
    path = tmp_path / "j.db"
    live, first, _ = _two_batches(fresh, requests_small, path)
    with pytest.raises(JournalError, match="open for writing by another process"):
        open_model(fresh(), path)
    result = CliRunner().invoke(app, ["undo", str(first.id), "--journal", str(path)])
    assert result.exit_code == 2 and "open for writing by another process" in result.output
    assert [b.status for b in Journal(path).batches()] == [APPLIED, APPLIED]  # readers may read
    live.journal.close()
    result = CliRunner().invoke(app, ["undo", str(first.id), "--journal", str(path)])
    assert result.exit_code == 0, result.output


def test_files_a_crash_left_behind_are_removed(fresh, requests_small, tmp_path):
    live, first, second = _two_batches(fresh, requests_small, tmp_path / "j.db")
    live.journal.close()
    folder = tmp_path / "j.db.deltas"
    (folder / "batch-00000099.safetensors").write_bytes(b"never committed")
    (folder / "batch-00000100.partial").write_bytes(b"half written")
    reopened = open_model(fresh(), tmp_path / "j.db")
    assert sorted(p.name for p in folder.iterdir()) == [first.delta_file, second.delta_file]
    reopened.journal.close()


def test_closing_checkpoints_so_the_database_file_alone_holds_every_batch(
    fresh, requests_small, tmp_path
):
    live, _, _ = _two_batches(fresh, requests_small, tmp_path / "j.db")
    live.journal.close()
    wal = tmp_path / "j.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    copy = tmp_path / "copy" / "j.db"
    copy.parent.mkdir()
    copy.write_bytes((tmp_path / "j.db").read_bytes())
    assert [b.status for b in Journal(copy).batches()] == [APPLIED, APPLIED]


def test_a_file_that_is_not_a_journal_is_refused_unchanged(tmp_path):
    import sqlite3

    other = tmp_path / "other.db"
    connection = sqlite3.connect(other)
    connection.execute("CREATE TABLE notes (text TEXT)")
    connection.commit()
    connection.close()
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, " * 50)
    for path in (other, text):
        before = path.read_bytes()
        with pytest.raises(JournalError, match="is not an lledit journal"):
            Journal(path)
        assert path.read_bytes() == before
        assert not path.with_name(path.name + ".deltas").exists()


def test_an_undo_through_the_journal_releases_the_editors_held_keys(
    fresh, requests_small, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    handle = fresh()
    settings = {"layers": "1,2", "stats_samples": 600, "prefix_count": 1, "prefix_length": 3,
                "value_steps": 3, "null_space_threshold": 0.5}  # fmt: skip
    editor = make_editor("alphaedit", handle, **settings)
    live = JournaledModel(handle, Journal(tmp_path / "j.db"), editor)
    first = live.apply(requests_small[:1])
    held_after_first = {name: gram.clone() for name, gram in editor.past_keys.items()}
    second = live.apply(requests_small[1:])
    live.undo(second.id)
    for name, gram in editor.past_keys.items():
        torch.testing.assert_close(gram, held_after_first[name], rtol=0, atol=1e-9)
    live.undo(first.id)
    assert all(gram.abs().max() < 1e-9 for gram in editor.past_keys.values())


def test_snapshots_bound_the_replay_and_keep_undo_exact(fresh, requests_small, tmp_path):
    path = tmp_path / "j.db"
    handle = fresh()
    live = JournaledModel(handle, Journal(path), make_editor("ft", handle, **FT), snapshot_every=2)
    records = [live.apply([requests_small[i % 3]]) for i in range(5)]
    assert [s.after_batch for s in live.journal.snapshots()] == [2, 4]
    expected = snapshot(live.handle)
    live.journal.close()
    # The snapshot after batch 4 stands for batches 1-4: their files are not read.
    away = tmp_path / "away"
    away.mkdir()
    for record in records[:4]:
        (path.parent / "j.db.deltas" / record.delta_file).rename(away / record.delta_file)
    assert_weights_equal(JournaledModel(fresh(), Journal(path)).handle, expected)
    for record in records[:4]:
        (away / record.delta_file).rename(path.parent / "j.db.deltas" / record.delta_file)

    handle = fresh()
    writer = JournaledModel(
        handle, Journal(path), make_editor("ft", handle, **FT), snapshot_every=2
    )
    writer.undo(records[2].id)  # older than the last snapshot, which no longer applies
    reference = fresh()
    for index in (0, 1, 3, 4):
        add_weight_deltas(reference, writer.journal.deltas(records[index]))
    assert_weights_equal(writer.handle, snapshot(reference))
    writer.journal.close()
    assert_weights_equal(JournaledModel(fresh(), Journal(path)).handle, snapshot(reference))


def test_a_journal_is_edited_by_the_method_that_wrote_it(fresh, requests_small, tmp_path):
    live, _, _ = _two_batches(fresh, requests_small, tmp_path / "j.db")
    live.journal.close()
    handle = fresh()
    with pytest.raises(JournalError, match=r"written by \['ft'\]; edit it with that method"):
        JournaledModel(handle, Journal(tmp_path / "j.db"), make_editor("none", handle))
    JournaledModel(handle, Journal(tmp_path / "j.db"))  # replay needs no method


def test_a_journal_is_continued_only_with_the_settings_that_wrote_it(
    fresh, requests_small, tmp_path
):
    live, _, _ = _two_batches(fresh, requests_small, tmp_path / "j.db")
    live.journal.close()
    handle = fresh()
    changed = {**FT, "steps": FT["steps"] + 1}
    with pytest.raises(JournalError, match=rf"other settings \(steps: {FT['steps']} there, "):
        JournaledModel(handle, Journal(tmp_path / "j.db"), make_editor("ft", handle, **changed))
    JournaledModel(handle, Journal(tmp_path / "j.db"), make_editor("ft", handle, **FT))
