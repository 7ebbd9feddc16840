import dataclasses

import pytest
import torch
from conftest import assert_weights_equal, sequences_per_pass, snapshot

from lledit import METHODS, EditRequest, make_editor
from lledit.edit import NonFiniteUpdateError, apply_weight_deltas
from lledit.eval import evaluate
from lledit.methods import parse_settings
from lledit.methods.ultraedit import normalised
from lledit.moments import feature_moments, merged_moments


def test_registry_lists_none_and_ft():
    assert {"none", "ft"} <= set(METHODS)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_editor("nope", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ft_edits_one_module_and_undo_restores_bit_for_bit(tiny, requests_small, dtype):
    tiny.model.to(dtype)
    before = snapshot(tiny)
    efficacy_before = evaluate(tiny, requests_small)[0]["efficacy"]
    editor = make_editor("ft", tiny, lr=0.05, norm_bound=0.5, steps=20)
    applied = editor.apply(requests_small)
    changed = [n for n, v in tiny.model.state_dict().items() if not torch.equal(v, before[n])]
    assert changed == [f"{editor.modules[0]}.weight"]
    assert evaluate(tiny, requests_small)[0]["efficacy"] > efficacy_before
    bound = applied.deltas[editor.modules[0]].abs().max()
    assert bound <= 0.5 * 1.01 + (0.02 if dtype == torch.bfloat16 else 0)
    applied.undo()
    assert_weights_equal(tiny, before)
    with pytest.raises(RuntimeError, match="already undone"):
        applied.undo()


def test_undo_out_of_order_subtracts_the_delta(tiny, requests_small):
    before = snapshot(tiny)
    editor = make_editor("ft", tiny, lr=0.05, norm_bound=0.5, steps=3)
    first = editor.apply(requests_small[:1])
    second = editor.apply(requests_small[1:])
    first.undo()
    second.undo()
    for name, value in tiny.model.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=1e-6, rtol=0)


def test_non_finite_update_is_rejected_and_model_unchanged(tiny, requests_small):
    before = snapshot(tiny)
    editor = make_editor("ft", tiny, steps=2)
    # A NaN activation makes the loss, the gradient and so the delta NaN.
    poison = tiny.module(editor.modules[0]).register_forward_hook(
        lambda module, inputs, output: output * float("nan")
    )
    try:
        with pytest.raises(NonFiniteUpdateError, match="not finite"):
            editor.apply(requests_small)
    finally:
        poison.remove()
    assert_weights_equal(tiny, before)
    first, second = tiny.layer_module(0, tiny.arch.mlp_out), tiny.layer_module(1, tiny.arch.mlp_out)
    good = torch.ones_like(tiny.weight_of(first))
    bad = torch.full_like(tiny.weight_of(second), float("inf"))
    with pytest.raises(NonFiniteUpdateError):
        apply_weight_deltas(tiny, {first: good, second: bad})
    assert_weights_equal(tiny, before)
    with pytest.raises(ValueError, match="shape"):
        apply_weight_deltas(tiny, {first: good.T})
    assert_weights_equal(tiny, before)


def test_empty_batch_is_an_error(tiny):
    for name in ("none", "ft"):
        with pytest.raises(ValueError, match="at least one request"):
            make_editor(name, tiny).apply([])


def test_none_changes_nothing(tiny, requests_small):
    before = snapshot(tiny)
    make_editor("none", tiny).apply(requests_small).undo()
    assert_weights_equal(tiny, before)


def test_ft_config_checks_and_settings_parsing(tiny):
    with pytest.raises(ValueError, match="steps"):
        make_editor("ft", tiny, steps=0)
    with pytest.raises(ValueError, match="no setting 'rank'"):
        make_editor("ft", tiny, rank=4)
    with pytest.raises(ValueError, match="must be positive"):
        make_editor("ft", tiny, lr=float("nan"))
    assert parse_settings("ft", ["lr=1e-2", "layers=none", "steps=3"]) == {
        "lr": 0.01,
        "layers": None,
        "steps": 3,
    }
    with pytest.raises(ValueError, match="no setting 'rank'"):
        parse_settings("ft", ["rank=4"])
    with pytest.raises(ValueError, match="cannot read 'many'"):
        parse_settings("ft", ["steps=many"])
    editor = make_editor("ft", tiny, layers="0", part="mlp_in")
    assert editor.config_dict()["modules"] == [tiny.layer_module(0, p) for p in tiny.arch.mlp_in]
    assert make_editor("ft", tiny).modules == [tiny.layer_module(2, tiny.arch.mlp_out)]
    assert isinstance(EditRequest("a", "b"), EditRequest)


# LocFT-BF ------------------------------------------------------------------------------------


def test_locft_appends_eos_once_and_learns_the_edits(tiny, requests_small):
    editor = make_editor("locft", tiny, lr=5e-3, epochs=20)
    eos = tiny.tokenizer.eos_token
    trained = editor._trained(
        [requests_small[0], dataclasses.replace(requests_small[1], target_new="x" + eos)]
    )
    assert [r.target_new for r in trained] == [requests_small[0].target_new + eos, "x" + eos]
    assert make_editor("locft", tiny, append_eos=False)._trained(requests_small) == requests_small
    efficacy_before = evaluate(tiny, requests_small)[0]["efficacy"]
    editor.apply(requests_small)
    assert evaluate(tiny, requests_small)[0]["efficacy"] > efficacy_before


def test_locft_trains_breadth_first_with_the_held_edits(tiny, requests_small):
    editor = make_editor("locft", tiny, replay=-1, minibatch=2, epochs=2, stop_loss=1e-9)
    first = editor.apply(requests_small[:2])
    with sequences_per_pass(tiny) as rows:
        editor.apply(requests_small[2:])
    assert rows == [2, 1] * 2  # new and held edits, in mini-batches of 2, each epoch
    first.undo()
    with sequences_per_pass(tiny) as rows:
        editor.apply(requests_small[:1])
    assert rows == [2] * 2  # the undone batch is no longer rehearsed
    one = make_editor("locft", tiny, replay=1, minibatch=100, epochs=2, stop_loss=1e-9)
    one.apply(requests_small[:2])
    with sequences_per_pass(tiny) as rows:
        one.apply(requests_small[2:])
    assert rows == [2] * 2  # the new edit and one of the two held


def test_locft_stops_once_an_epoch_is_below_the_loss_threshold(tiny, requests_small):
    before = snapshot(tiny)
    editor = make_editor("locft", tiny, stop_loss=1e9)
    with sequences_per_pass(tiny) as rows:
        applied = editor.apply(requests_small)
    assert rows == [len(requests_small)]  # one epoch, no step taken
    assert all(delta.abs().max() == 0 for delta in applied.deltas.values())
    assert_weights_equal(tiny, before)


# UltraEdit -----------------------------------------------------------------------------------


def test_ultraedit_statistics_merged_batch_by_batch_equal_one_shot_statistics():
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(rows, 6, generator=generator) * 3 + 1 for rows in (5, 1, 12)]
    running = None
    for part in parts:
        running = merged_moments(running, feature_moments(part))
    everything = torch.cat(parts).double()
    count, mean, squares = running
    assert count.item() == len(everything)
    torch.testing.assert_close(mean, everything.mean(dim=0), rtol=0, atol=1e-12)
    torch.testing.assert_close(squares / (count - 1), everything.var(dim=0), rtol=1e-12, atol=0)


def test_ultraedit_update_maps_keys_to_their_pseudo_values(tiny, requests_small):
    editor = make_editor("ultraedit", tiny, lr=1e-2, ridge=1e-3)
    keys = torch.randn(4, 8, dtype=torch.float64)
    grads = torch.randn(4, 3, dtype=torch.float64)
    stats = feature_moments(torch.cat([keys, grads], dim=-1))
    shift = editor._shift(keys.float(), grads.float(), stats).double()
    features = normalised(torch.cat([keys, grads], dim=-1), stats)
    values = -1e-2 * (features[:, :8] ** 2).sum(-1, keepdim=True) * features[:, 8:]
    # Fewer keys than inputs and a small ridge: each key is mapped to its value.
    torch.testing.assert_close(keys @ shift.T, values, rtol=0, atol=1e-3)


def test_ultraedit_edits_and_undo_takes_the_batch_out_of_the_statistics(tiny, requests_small):
    editor = make_editor("ultraedit", tiny, lr=1e-2)
    efficacy_before = evaluate(tiny, requests_small)[0]["efficacy"]
    editor.apply(requests_small[:2])
    after_first = {name: tuple(part.clone() for part in s) for name, s in editor.statistics.items()}
    second = editor.apply(requests_small[2:])
    assert all(
        editor.statistics[name][0] > after_first[name][0] for name in editor.modules
    )  # the second batch's tokens are counted
    assert evaluate(tiny, requests_small)[0]["efficacy"] > efficacy_before
    second.undo()
    for name, parts in after_first.items():
        for found, expected in zip(editor.statistics[name], parts, strict=True):
            assert torch.equal(found, expected)
