"""MEMOIR on tiny random models: TopHash masks, sparse writes, the overlap gate."""

import pytest
import torch

from lledit import make_editor
from lledit.model import ModelHandle

UNRELATED = ["The largest planet is", "Microsoft is based in", "What is the native language of"]


def logits(handle: ModelHandle, prompts: list[str]) -> torch.Tensor:
    encoded = handle.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return handle.model(**encoded, use_cache=False).logits


def module_inputs(handle: ModelHandle, name: str, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's input to module `name`, (tokens, d_in), one prompt at a time."""
    captured = []
    hook = handle.module(name).register_forward_pre_hook(
        lambda module, args: captured.append(args[0][0].float())
    )
    try:
        for prompt in prompts:
            with torch.no_grad():
                handle.model(**handle.tokenizer([prompt], return_tensors="pt"), use_cache=False)
    finally:
        hook.remove()
    return captured


def test_tophash_masks_are_the_permuted_top_of_the_prompts_mean_activation(tiny):
    editor = make_editor("memoir", tiny, active=0.125)
    prompts = ["The capital of France is", "Harry Potter was written by"]
    inputs = module_inputs(tiny, editor.module_name, prompts)
    captured = []
    hook = tiny.module(editor.module_name).register_forward_pre_hook(
        lambda module, args: captured.append(editor._masks(args[0]))
    )
    try:
        logits(tiny, prompts)  # right padding: the shorter prompt's padding is left out
    finally:
        hook.remove()
    for row, x in enumerate(inputs):
        top = x.mean(dim=0).abs().topk(editor.active).indices
        expected = torch.zeros(x.shape[1], dtype=torch.bool)
        expected[editor.permutation[top]] = True
        assert torch.equal(captured[0][row], expected)
    assert captured[0].sum(dim=1).tolist() == [editor.active] * 2


def test_an_edit_writes_only_its_masks_columns(tiny, requests_small):
    editor = make_editor("memoir", tiny, active=0.125, steps=5, early_stop=1.0)
    applied = editor.apply(requests_small)
    delta = applied.deltas["memoir.memory"]
    written = delta.abs().sum(dim=0) > 0
    masks = applied.held["masks"]
    assert masks.shape == (len(requests_small), editor.memory.shape[1])
    assert written.any() and not (written & ~masks.any(dim=0)).any()


def test_inputs_below_the_overlap_threshold_get_the_base_models_output_bit_for_bit(
    tiny, requests_small
):
    base = logits(tiny, UNRELATED)
    prompts = [r.prompt for r in requests_small]
    editor = make_editor("memoir", tiny, active=0.125, steps=10, threshold=1.0)
    edited_before = logits(tiny, prompts)
    editor.apply(requests_small)
    masks = []
    hook = tiny.module(editor.module_name).register_forward_pre_hook(
        lambda module, args: masks.append(editor._masks(args[0]))
    )
    try:
        logits(tiny, UNRELATED)
    finally:
        hook.remove()
    assert not editor._within(masks[0]).any(), "an unrelated prompt matched an edit's mask exactly"
    assert torch.equal(logits(tiny, UNRELATED), base)
    assert not torch.equal(logits(tiny, prompts), edited_before)  # the edits' own masks match


def test_memoir_config_errors(tiny):
    for settings, message in [
        ({"active": 0.0}, r"active must be in \(0, 1\]"),
        ({"active": 2.0}, r"active must be in \(0, 1\]"),
        ({"threshold": 0.0}, r"threshold must be in \(0, 1\]"),
        ({"layers": "1-2"}, "MEMOIR adapts one module"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_editor("memoir", tiny, **settings)
