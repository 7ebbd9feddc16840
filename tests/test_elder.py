"""ELDER and GRACE on tiny random models: deferral, routing, training, undo, save/load."""

import gc
import json
import math
import weakref

import pytest
import torch
from conftest import assert_weights_equal, make_tiny_model, sequences_per_pass, snapshot
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

from lledit import EditRequest, load_edited, load_model, make_editor
from lledit.cli import app
from lledit.edit import NonFiniteUpdateError
from lledit.eval import evaluate
from lledit.eval.scoring import score_pairs
from lledit.journal import Journal, JournaledModel, JournalError
from lledit.methods.elder import MixtureOfLoRA, _lowest_mean_probability, allocation_codes
from lledit.model import ModelHandle, SequenceWatch, edit_batch

UNRELATED = [
    "The chemical symbol for gold is",
    "The largest planet is",
    "Microsoft is based in",
    "Apple was founded by",
    "What is the native language of",
    "Stephen King wrote other",
    "The capital of Japan is",
    "J. K. Rowling",
]
# Every sequence uses the adapters: the radius exceeds the largest code distance.
ALWAYS = {"deferral_radius": 100}
# The paper's shared mixture, which every batch retrains.
MIXTURE = {"batch_rank": 0}
# Each batch opens its own LoRA (the default; rank 4 here) instead.
BATCH_LORAS = {"batch_rank": 4}
BOTH_MODES = pytest.mark.parametrize("mode", [MIXTURE, BATCH_LORAS], ids=["mixture", "batch_loras"])


def same_model(handle: ModelHandle, dtype: torch.dtype | None = None) -> ModelHandle:
    """A fresh, unedited copy of the tiny model behind `handle` (same seed, same weights)."""
    model = make_tiny_model(handle.arch.name, len(handle.tokenizer), dtype or handle.dtype)
    return ModelHandle(model, handle.tokenizer, handle.name)


def logits(handle: ModelHandle, prompts: list[str], side: str = "right") -> torch.Tensor:
    tokenizer = handle.tokenizer
    tokenizer.padding_side = side
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        return handle.model(**encoded, use_cache=False).logits


def per_prompt(handle: ModelHandle, prompts: list[str]) -> list[torch.Tensor]:
    return [logits(handle, [prompt]) for prompt in prompts]


def all_equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def target_logprob(handle: ModelHandle, requests: list[EditRequest]) -> torch.Tensor:
    return score_pairs(
        handle, [r.prompt for r in requests], [r.target_new for r in requests]
    ).logprob


# The shared pieces ------------------------------------------------------------------------------


def test_prompt_ends_with_left_and_right_padding(tiny):
    prompts = ["The capital of France is", "Harry"]
    lengths = [len(tiny.tokenizer(p)["input_ids"]) for p in prompts]
    tokens = edit_batch(tiny, prompts, ["Rome", "Potter"])
    assert tokens.prompt_ends.tolist() == [n - 1 for n in lengths]
    watch = SequenceWatch(tiny)
    seen = []
    layer = tiny.module(f"{tiny.arch.layers}.0")
    hook = layer.register_forward_hook(
        lambda module, args, output: seen.append(
            watch.prompt_ends(output.shape[0], output.shape[1], output.device).tolist()
        )
    )
    try:
        logits(tiny, prompts, "right")
        logits(tiny, prompts, "left")
        with tiny.prompt_ends(torch.tensor([2, 0])):
            logits(tiny, prompts)
    finally:
        hook.remove()
        watch.remove()
    width = max(lengths)
    assert seen == [[n - 1 for n in lengths], [width - 1, width - 1], [2, 0]]


# ELDER ----------------------------------------------------------------------------------------


def test_mixture_adds_only_the_selected_loras_and_trains_the_same_on_two_threads():
    generator = torch.Generator().manual_seed(0)
    mixture = MixtureOfLoRA(6, 5, n_loras=4, rank=3, generator=generator)
    assert not mixture.lora_b.any()
    with torch.no_grad():
        mixture.lora_b.normal_(generator=generator)
    x = torch.randn(2, 3, 6, generator=generator)
    indices = torch.tensor([[0, 2], [3, 2]])
    weights = torch.tensor([[0.6, 0.3], [0.5, 0.1]])
    out = mixture(x, indices, weights)
    for row in range(2):
        expected = sum(
            weights[row, j]
            * x[row]
            @ mixture.lora_a[indices[row, j]].T
            @ mixture.lora_b[indices[row, j]].T
            for j in range(2)
        )
        torch.testing.assert_close(out[row], expected)
    out.sum().backward()
    for grad in (mixture.lora_a.grad, mixture.lora_b.grad):
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))
        assert all(grad[j].abs().sum() > 0 for j in (0, 2, 3))

    # Sized like a batch of ELDER's on SmolLM2, where gathering the chosen LoRAs
    # gave other gradients from run to run on two threads.
    wide = MixtureOfLoRA(1536, 64, n_loras=8, rank=32, generator=generator)
    with torch.no_grad():
        wide.lora_b.normal_(generator=generator)
    x = torch.randn(70, 20, 1536, generator=generator)
    indices = torch.randint(0, 8, (70, 2), generator=generator)
    weights = torch.rand(70, 2, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(3):
            wide.zero_grad()
            wide(x, indices, weights).square().sum().backward()
            grads.append(wide.lora_a.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grad, grads[0]) for grad in grads)


def test_mixture_wraps_linear_and_conv1d():
    generator = torch.Generator()
    linear = MixtureOfLoRA.for_layer(torch.nn.Linear(7, 3), 4, 2, generator)
    conv = MixtureOfLoRA.for_layer(Conv1D(3, 7), 4, 2, generator)  # Conv1D(nf=out, nx=in)
    for mixture in (linear, conv):
        assert mixture.lora_a.shape == (4, 2, 7) and mixture.lora_b.shape == (4, 3, 2)
    with pytest.raises(TypeError, match="not a linear layer"):
        MixtureOfLoRA.for_layer(torch.nn.LayerNorm(3), 4, 2, generator)


def test_adapted_layer_output_is_base_plus_the_selected_loras(tiny, requests_small):
    editor = make_editor("elder", tiny, **ALWAYS, **MIXTURE)
    editor.apply(requests_small)
    position = len(editor.modules) - 1
    module = tiny.module(editor.modules[position])
    captured = []
    hook = module.register_forward_hook(
        lambda m, args, output: captured.append((args[0], output, editor.current_routing))
    )
    try:
        logits(tiny, [r.prompt for r in requests_small])
    finally:
        hook.remove()
    x, output, routing = captured[0]
    assert routing.indices.shape == (3, len(editor.layers), 2)
    expected = module.forward(x) + editor.adapters[position](
        x, routing.indices[:, position], routing.weights[:, position]
    )
    torch.testing.assert_close(output, expected)
    assert not torch.allclose(output, module.forward(x))


def test_elder_raises_efficacy_and_trains_only_its_own_weights(tiny, requests_small):
    before = snapshot(tiny)
    efficacy_before = evaluate(tiny, requests_small)[0]["efficacy"]
    editor = make_editor("elder", tiny)
    applied = editor.apply(requests_small)
    assert evaluate(tiny, requests_small)[0]["efficacy"] >= max(0.9, efficacy_before + 0.5)
    assert_weights_equal(tiny, before)
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())
    assert applied.codes.shape == (3, len(editor.layers) * 8)
    assert (applied.codes.sum(dim=1) == 2 * len(editor.layers)).all()
    config = editor.config_dict()
    assert config["modules"][0].endswith(tiny.arch.mlp_out) and config["deferral_radius"] == 16


def test_elder_defers_exactly_to_the_base_model(tiny, requests_small):
    prompts = [r.prompt for r in requests_small]
    base_single = per_prompt(tiny, UNRELATED)
    mixed = [prompts[0], *UNRELATED]
    base_mixed = logits(tiny, mixed)
    editor = make_editor("elder", tiny, layers="1-3", deferral_radius=1)
    assert all(
        torch.equal(a, b) for a, b in zip(per_prompt(tiny, UNRELATED), base_single, strict=True)
    )
    assert torch.equal(logits(tiny, mixed), base_mixed)

    applied = editor.apply(requests_small)
    codes = editor.codes(UNRELATED)
    # With radius 1 only an exact code match uses the adapters.
    deferred = [
        index
        for index, code in enumerate(codes)
        if not (code[None] == applied.codes).all(dim=1).any()
    ]
    assert len(deferred) >= 2
    for index in deferred:
        assert torch.equal(logits(tiny, [UNRELATED[index]]), base_single[index])
    edited_mixed = logits(tiny, mixed)
    for index in deferred:
        assert torch.equal(edited_mixed[index + 1], base_mixed[index + 1])
    assert not torch.allclose(edited_mixed[0], base_mixed[0])


def test_elder_subject_gate_defers_prompts_that_do_not_name_an_edited_subject(tiny, requests_small):
    # Every code is within the radius; only the subject decides.
    named = ["France is a country whose capital is", "Where is the Eiffel Tower?"]
    # "Frances" holds "France" but not as a word.
    unnamed = ["Frances is a country whose capital is", "Where is the Colosseum?"]
    base = per_prompt(tiny, named + unnamed)
    gated = make_editor("elder", tiny, layers="1-3", **ALWAYS)  # the gate is on by default
    gated.apply(requests_small[:2])
    for prompt, before in zip(named + unnamed, base, strict=True):
        after = logits(tiny, [prompt])
        assert torch.equal(after, before) == (prompt in unnamed), prompt
    # Case does not matter; a batch mixing both keeps each row's own decision.
    mixed = logits(tiny, ["where is the eiffel tower?", unnamed[1]])
    assert not torch.allclose(mixed[0], logits(same_model(tiny), ["where is the eiffel tower?"])[0])
    assert torch.equal(mixed[1][: base[3].shape[1]], base[3][0])
    gated.remove()
    ungated = make_editor("elder", tiny, layers="1-3", subject_gate=False, **ALWAYS)
    ungated.apply(requests_small[:2])
    assert not any(
        torch.equal(logits(tiny, [p]), b) for p, b in zip(unnamed, base[2:], strict=True)
    )


def test_elder_subject_gate_passes_a_named_subject_whatever_its_code(tiny, requests_small):
    subjectless = EditRequest("The largest planet is", "Mars")
    # Radius 1: on codes alone only an exact match passes.
    editor = make_editor("elder", tiny, layers="1-3", deferral_radius=1)
    editor.apply([requests_small[0], subjectless])
    stored = editor._stored_codes()
    layers, n = len(editor.layers), editor.config.n_loras
    candidates = [
        allocation_codes(torch.tensor([[[first, first + 1]] * layers]), n) for first in (0, 2, 4)
    ]
    far = next(code for code in candidates if not (code == stored).all(dim=1).any())
    prompts = ["France's capital is", "Tell me about FRANCE. Its capital is", "Frances is"]
    assert editor._nearest_passing(far.repeat(3, 1), stored, prompts).tolist() == [0, 0, -1]
    assert editor._nearest_passing(far.repeat(3, 1), stored, None).tolist() == [-1] * 3
    # The edit without a subject is judged on its code, with or without the gate.
    assert editor._nearest_passing(stored[1:], stored, ["Jupiter is"]).tolist() == [1]
    assert not torch.allclose(
        logits(tiny, [subjectless.prompt]), logits(same_model(tiny), [subjectless.prompt])
    )


def test_elder_subject_window_defers_prompts_that_name_the_subject_far_from_their_end(
    tiny, requests_small
):
    near = ["Where is the Eiffel Tower?", "The Eiffel Tower stands in the city of"]
    far = ["The Eiffel Tower is tall, and my cousin who lives in Berlin likes to say that it is"]
    base = per_prompt(tiny, near + far)
    editor = make_editor("elder", tiny, layers="1-3", subject_window=5, **ALWAYS)
    editor.apply(requests_small[:2])
    for prompt, before in zip(near + far, base, strict=True):
        assert torch.equal(logits(tiny, [prompt]), before) == (prompt in far), prompt
    with pytest.raises(ValueError, match="subject_window"):
        make_editor("elder", same_model(tiny), subject_window=-1)


@BOTH_MODES
def test_elder_scores_the_same_with_left_and_right_padding(tiny, requests_small, mode):
    make_editor("elder", tiny, **mode).apply(requests_small)
    prompts = [r.prompt for r in requests_small] + [r.rephrases[0] for r in requests_small]
    targets = [r.target_new for r in requests_small] * 2
    right = score_pairs(tiny, prompts, targets, padding_side="right")
    left = score_pairs(tiny, prompts, targets, padding_side="left")
    assert torch.equal(right.token_accuracy, left.token_accuracy)
    torch.testing.assert_close(right.logprob, left.logprob, atol=1e-4, rtol=0)


@BOTH_MODES
def test_generation_keeps_the_prompt_allocation_for_every_token(tiny, requests_small, mode):
    editor = make_editor("elder", tiny, **ALWAYS, **mode)
    editor.apply(requests_small)
    prompts = ["The capital of France is", "Harry Potter was written by"]
    used = []
    hook = tiny.module(editor.modules[0]).register_forward_hook(
        lambda m, args, output: used.append((args[0].shape[1], editor.current_routing.indices))
    )
    tokenizer = tiny.tokenizer
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        out = tiny.model.generate(
            **encoded,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    finally:
        tokenizer.padding_side = "right"
        hook.remove()
    prompt_length = encoded["input_ids"].shape[1]
    assert [length for length, _ in used] == [prompt_length, 1, 1, 1]
    assert all(torch.equal(indices, used[0][1]) for _, indices in used)
    fresh_codes = editor.codes(prompts).view(2, len(editor.layers), -1)
    assert torch.equal(fresh_codes.nonzero()[:, 2].view(2, len(editor.layers), 2).sort(-1)[0],
                       used[0][1].sort(-1)[0])  # fmt: skip

    # Teacher-forcing the generated text with the prompt's end given explicitly
    # routes once per sequence too, and gives the logits generation saw.
    mask = torch.cat([encoded["attention_mask"], torch.ones(2, 4, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad(), tiny.prompt_ends(torch.full((2,), prompt_length - 1)):
        forced = tiny.model(
            input_ids=out.sequences, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(
            step_logits, forced[:, prompt_length - 1 + step], atol=1e-4, rtol=1e-4
        )


def test_cached_pass_without_its_prompt_pass_is_an_error(tiny, requests_small):
    editor = make_editor("elder", tiny, **ALWAYS)
    editor.apply(requests_small)
    encoded = tiny.tokenizer(["The capital of France is"], return_tensors="pt")
    name = tiny.cache_argument
    with torch.no_grad():
        cache = getattr(tiny.model(**encoded, use_cache=True), name)
        tiny.model(**tiny.tokenizer(["A", "B"], return_tensors="pt"), use_cache=False)
        with pytest.raises(RuntimeError, match="extending a KV cache"):
            tiny.model(input_ids=torch.tensor([[5]]), **{name: cache})


def test_guided_loss_routes_rephrases_to_the_edit_allocation(tiny):
    facts = [
        ("The capital of France is", "Rome"),
        ("The Eiffel Tower is located in the city of", "Tokyo"),
        ("Harry Potter was written by", "Stephen King"),
        ("The chemical symbol for gold is", "Fe"),
        ("The largest planet is", "Mars"),
        ("Microsoft is based in", "Paris"),
    ]
    requests = [
        EditRequest(prompt, target, rephrases=[f"So, {prompt}", f"Well, {prompt}"])
        for prompt, target in facts
    ]

    def agreement(guide_weight: float) -> tuple[float, float]:
        """Mean fraction of each rephrase's chosen LoRAs that lie in its own edit's
        random allocation, and in the other edits' allocations (chance: k/N = 0.5)."""
        handle = same_model(tiny)
        editor = make_editor(
            "elder", handle, guide_weight=guide_weight, seed=1, n_loras=4, **MIXTURE
        )
        editor.apply(requests)
        allocation = editor._allocations([request.prompt for request in requests])
        layers, n = len(editor.layers), editor.config.n_loras
        wanted = torch.zeros(len(requests), layers, n, dtype=torch.bool)
        wanted.scatter_(-1, allocation, True)
        own, other = [], []
        for index, request in enumerate(requests):
            codes = editor.codes(request.rephrases).view(-1, 1, layers, n)
            shared = (codes & wanted).sum(-1).float().mean(dim=(0, 2)) / 2
            own.append(shared[index])
            other.extend(shared[[i for i in range(len(requests)) if i != index]])
        return float(torch.stack(own).mean()), float(torch.stack(other).mean())

    guided_own, guided_other = agreement(1.0)
    unguided_own, unguided_other = agreement(0.0)
    # Over seeds 0-5 the guided share lies in 0.73-0.79 on GPT-2 and 0.85-0.92 on llama.
    assert guided_own >= 0.7 and guided_own - guided_other >= 0.2
    assert unguided_own - unguided_other < 0.2  # without the guided loss: chance


@BOTH_MODES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elder_undo_restores_outputs_bit_for_bit(tiny, requests_small, dtype, mode):
    tiny.model.to(dtype)
    weights = snapshot(tiny)
    probe = [r.prompt for r in requests_small] + UNRELATED[:3]
    base = logits(tiny, probe)
    editor = make_editor("elder", tiny, **ALWAYS, **mode)
    first = editor.apply(requests_small[:2])
    after_first = logits(tiny, probe)
    second = editor.apply(requests_small[2:])
    assert not torch.equal(logits(tiny, probe), after_first)
    second.undo()
    assert torch.equal(logits(tiny, probe), after_first)
    first.undo()
    assert torch.equal(logits(tiny, probe), base)
    assert_weights_equal(tiny, weights)
    with pytest.raises(RuntimeError, match="already undone"):
        first.undo()


@BOTH_MODES
def test_elder_undo_out_of_order_subtracts_the_batch(tiny, requests_small, mode):
    editor = make_editor("elder", tiny, **ALWAYS, **mode)
    initial = [p.detach().clone() for p in editor._parameters()]
    first = editor.apply(requests_small[:2])
    second = editor.apply(requests_small[2:])
    first.undo()
    assert torch.equal(editor._stored_codes(), second.codes)
    second.undo()
    assert editor._stored_codes() is None
    for parameter, value in zip(editor._parameters(), initial, strict=True):
        torch.testing.assert_close(parameter, value, atol=1e-6, rtol=0)


def test_two_edited_models_do_not_interfere(tiny, requests_small):
    other = same_model(tiny)
    probe = [r.prompt for r in requests_small]
    base = logits(other, probe)
    first = make_editor("elder", tiny, **ALWAYS)
    second = make_editor("elder", other, **ALWAYS, seed=3)
    first.apply(requests_small)
    assert torch.equal(logits(other, probe), base)
    edited_first = logits(tiny, probe)
    second.apply(requests_small[:1])
    assert torch.equal(logits(tiny, probe), edited_first)
    assert not torch.equal(logits(other, probe), base)
    assert not torch.equal(first.router, second.router)


def saved_and_loaded(tiny, requests_small, folder, settings):
    """An ELDER editor with two batches applied and saved to `folder`, and a fresh
    copy of the model with the saved editor loaded: both editors, the copy, and
    probe prompts with the edited model's logits on them."""
    editor = make_editor("elder", tiny, layers="1-3", **settings)
    editor.apply(requests_small[:2])
    editor.apply(requests_small[2:])
    probe = [r.prompt for r in requests_small] + [r.rephrases[0] for r in requests_small]
    probe += UNRELATED
    expected = logits(tiny, probe)
    editor.save(folder)
    restored = same_model(tiny)
    loaded = make_editor("elder", restored)
    loaded.load(folder)
    assert loaded.config_dict() == editor.config_dict()
    return editor, loaded, restored, probe, expected


def test_elder_save_load_round_trip(tiny, requests_small, tmp_path):
    settings = {"rank": 4, "deferral_radius": 3, "seed": 5, "replay": 1, **MIXTURE}
    editor, loaded, restored, probe, expected = saved_and_loaded(
        tiny, requests_small, tmp_path / "elder", settings
    )
    assert torch.equal(loaded._stored_codes(), editor._stored_codes())
    held, saved = loaded._held(), editor._held()
    assert [(r.prompt, r.target_new, r.subject) for r in held[0]] == [
        (r.prompt, r.target_new, r.subject) for r in saved[0]
    ]
    assert torch.equal(held[1], saved[1]) and torch.equal(held[2], saved[2])
    assert torch.equal(logits(restored, probe), expected)
    # Rehearsal continues where the saved editor left off; allocations depend on the prompt.
    assert loaded._batches[-1].rehearsal_end == editor._batches[-1].rehearsal_end == 1
    assert torch.equal(loaded._allocations(["x"]), editor._allocations(["x"]))

    with pytest.raises(FileNotFoundError, match="no saved ELDER"):
        loaded.load(tmp_path / "nothing")
    other_arch = "gpt2" if tiny.arch.name == "llama" else "llama"
    other = ModelHandle(make_tiny_model(other_arch, len(tiny.tokenizer)), tiny.tokenizer, "other")
    with pytest.raises(ValueError, match="adapts"):
        make_editor("elder", other).load(tmp_path / "elder")
    (tmp_path / "elder" / "elder.json").write_text(
        (tmp_path / "elder" / "elder.json").read_text().replace('"rank": 4', '"rank": 2')
    )
    with pytest.raises(ValueError, match="should have shape"):
        loaded.load(tmp_path / "elder")
    assert torch.equal(logits(restored, probe), expected)  # a refused load changes nothing
    make_editor("grace", same_model(tiny)).save(tmp_path / "grace")
    (tmp_path / "grace" / "elder.json").write_text((tmp_path / "grace" / "grace.json").read_text())
    with pytest.raises(ValueError, match="'grace' editor, not ELDER"):
        loaded.load(tmp_path / "grace")


def test_elder_default_layers_on_a_30_layer_model(tokenizer):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    handle = ModelHandle(LlamaForCausalLM(config), tokenizer, "tiny-30-layers")
    editor = make_editor("elder", handle)
    assert editor.layers == tuple(range(21, 27)) and editor.query_layer == 8
    editor.remove()
    assert make_editor("elder", handle, layers="3-4").query_layer == 2  # just below the adapters


def test_elder_config_errors(tiny):
    cases = [
        ({"top_k": 9}, r"top_k \(9\) cannot exceed n_loras \(8\)"),
        ({"rank": 0}, "rank must be at least 1"),
        ({"lr": float("nan")}, "lr must be positive"),
        ({"guide_weight": -1.0}, "guide_weight must be >= 0"),
        ({"deferral_radius": 0}, "deferral_radius must be at least 1"),
        ({"early_stop": 0.0}, r"early_stop must be in \(0, 1\]"),
        ({"replay": -1}, "replay must be >= 0"),
        ({"layers": "1-2", "query_layer": 1}, "query_layer must lie below"),
        ({"layers": "9"}, "layer 9 does not exist"),
        ({"part": "mlp"}, "names [23] modules per layer; ELDER adapts one"),
        ({"part": "nowhere"}, "no module named"),
        ({"batch_rank": -1}, "batch_rank must be at least 0"),
    ]
    for settings, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            make_editor("elder", tiny, **settings)
    with pytest.raises(ValueError, match="at least one request"):
        make_editor("elder", tiny).apply([])


def test_batch_loras_train_only_their_own_batch_and_leave_earlier_edits_alone(tiny, requests_small):
    prompts = [r.prompt for r in requests_small]
    base = per_prompt(tiny, UNRELATED)
    efficacy_before = evaluate(tiny, requests_small)[0]["efficacy"]
    editor = make_editor("elder", tiny, layers="1-3", **ALWAYS, **BATCH_LORAS)
    assert len(editor.adapters) == 0 and list(editor.tensors()) == ["elder.router"]
    editor.apply(requests_small[:2])
    first_outputs = per_prompt(tiny, prompts[:2])
    first_a, first_b = (t.clone() for t in editor._batch_lora_bank()[0][0])
    editor.apply(requests_small[2:])
    stacks, edit_loras = editor._batch_lora_bank()
    assert edit_loras.tolist() == [0, 0, 1]
    assert stacks[0][0].shape == (2, 4, first_a.shape[-1])
    assert torch.equal(stacks[0][0][:1], first_a) and torch.equal(stacks[0][1][:1], first_b)
    assert all_equal(per_prompt(tiny, prompts[:2]), first_outputs)
    assert evaluate(tiny, requests_small)[0]["efficacy"] >= max(0.9, efficacy_before + 0.5)
    # The subject gate alone decides here: prompts naming no edited subject are untouched.
    assert all_equal(per_prompt(tiny, UNRELATED), base)

    # The adapted output is the layer's own plus the chosen edit's batch LoRA.
    position = len(editor.modules) - 1
    module = tiny.module(editor.modules[position])
    captured = []
    hook = module.register_forward_hook(
        lambda m, args, output: captured.append((args[0], output, editor.current_routing))
    )
    try:
        logits(tiny, [prompts[2], prompts[0], UNRELATED[0]])
    finally:
        hook.remove()
    x, output, routing = captured[0]
    assert routing.rows.tolist() == [0, 1] and routing.loras.tolist()[:2] == [1, 0]
    lora_a, lora_b = stacks[position]
    for row, lora in ((0, 1), (1, 0)):
        expected = module.forward(x[row]) + x[row] @ lora_a[lora].T @ lora_b[lora].T
        torch.testing.assert_close(output[row], expected)
    torch.testing.assert_close(output[2], module.forward(x[2]))


def test_batch_loras_answer_a_repeated_edit_with_the_newest(tiny):
    prompt = "The capital of France is"
    base = logits(tiny, [prompt])
    newest = EditRequest(prompt, "Berlin", subject="France")
    only_newest = make_editor("elder", same_model(tiny), **ALWAYS, **BATCH_LORAS)
    only_newest.apply([newest])
    editor = make_editor("elder", tiny, **ALWAYS, **BATCH_LORAS)
    editor.apply([EditRequest(prompt, "Rome", subject="France")])
    editor.apply([newest])
    edited = logits(tiny, [prompt])
    assert editor.current_routing.loras.tolist() == [1]
    # A batch's LoRA depends on its own edits alone, not on what came before.
    assert torch.equal(edited, logits(only_newest.handle, [prompt]))
    assert not torch.allclose(edited, base)


def test_batch_loras_save_load_round_trip(tiny, requests_small, tmp_path):
    editor, loaded, restored, probe, expected = saved_and_loaded(
        tiny, requests_small, tmp_path / "elder", {**ALWAYS, **BATCH_LORAS}
    )
    assert torch.equal(logits(restored, probe), expected)
    for (a, b), (saved_a, saved_b) in zip(
        loaded._batch_lora_bank()[0], editor._batch_lora_bank()[0], strict=True
    ):
        assert torch.equal(a, saved_a) and torch.equal(b, saved_b)
    # The loaded edits are one batch holding two LoRAs; a new batch opens the third.
    loaded.apply([EditRequest("The largest planet is", "Mars", subject="largest planet")])
    assert loaded._batch_lora_bank()[1].tolist() == [0, 0, 1, 2]

    record = tmp_path / "elder" / "elder.json"
    record.write_text(record.read_text().replace('"batch_loras": 2', '"batch_loras": 3'))
    with pytest.raises(ValueError, match="should have shape"):
        make_editor("elder", same_model(tiny)).load(tmp_path / "elder")


# GRACE ----------------------------------------------------------------------------------------


def test_grace_hit_moves_towards_the_target_and_miss_is_exact(tiny, requests_small):
    base_single = per_prompt(tiny, UNRELATED)
    mixed = [requests_small[0].prompt, *UNRELATED]
    base_mixed = logits(tiny, mixed)
    logprob_before = target_logprob(tiny, requests_small)
    efficacy_before = evaluate(tiny, requests_small)[0]["efficacy"]
    editor = make_editor("grace", tiny, radius=1e-3)
    assert torch.equal(logits(tiny, mixed), base_mixed)
    editor.apply(requests_small)
    assert editor.size == 3
    assert (target_logprob(tiny, requests_small) > logprob_before + 1).all()
    assert evaluate(tiny, requests_small)[0]["efficacy"] > efficacy_before
    assert all(
        torch.equal(a, b) for a, b in zip(per_prompt(tiny, UNRELATED), base_single, strict=True)
    )
    edited_mixed = logits(tiny, mixed)
    assert torch.equal(edited_mixed[1:], base_mixed[1:])
    assert not torch.allclose(edited_mixed[0], base_mixed[0])


def test_grace_generation_keeps_the_value_for_every_token(tiny, requests_small):
    encoded = tiny.tokenizer([requests_small[0].prompt], return_tensors="pt")
    base = logits(tiny, [requests_small[0].prompt])[:, -1]
    editor = make_editor("grace", tiny, radius=1e-3)
    editor.apply(requests_small[:1])
    out = tiny.model.generate(
        **encoded,
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        pad_token_id=tiny.tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    length = encoded["input_ids"].shape[1]
    with torch.no_grad(), tiny.prompt_ends(torch.tensor([length - 1])):
        forced = tiny.model(input_ids=out.sequences, use_cache=False).logits
    assert not torch.allclose(out.logits[0], base)
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, forced[:, length - 1 + step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grace_undo_removes_its_entries(tiny, requests_small, dtype):
    tiny.model.to(dtype)
    probe = [r.prompt for r in requests_small]
    base = logits(tiny, probe)
    editor = make_editor("grace", tiny)
    first = editor.apply(requests_small[:1])
    after_first = logits(tiny, probe)
    second = editor.apply(requests_small[1:])
    assert editor.size == 3
    first.undo()
    assert editor.size == 2
    second.undo()
    assert editor.size == 0 and torch.equal(logits(tiny, probe), base)
    editor.apply(requests_small[:1]).undo()
    with pytest.raises(RuntimeError, match="already undone"):
        second.undo()
    assert not torch.equal(after_first, base)


def test_grace_save_load_round_trip(tiny, requests_small, tmp_path):
    editor = make_editor("grace", tiny, layers="1", radius=0.5, steps=10)
    editor.apply(requests_small)
    probe = [r.prompt for r in requests_small] + UNRELATED
    expected = logits(tiny, probe)
    editor.save(tmp_path / "grace")
    restored = same_model(tiny)
    loaded = make_editor("grace", restored)
    loaded.load(tmp_path / "grace")
    assert loaded.size == 3 and loaded.config_dict() == editor.config_dict()
    assert torch.equal(logits(restored, probe), expected)


def test_grace_config_errors(tiny):
    for settings, message in [
        ({"radius": 0.0}, "radius must be positive"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"lr": -1.0}, "lr must be positive"),
        ({"early_stop": 2.0}, r"early_stop must be in \(0, 1\]"),
        ({"part": "nowhere"}, "no module named"),
        ({"layers": "1-2"}, "GRACE adapts one module"),
        ({"part": "mlp"}, "GRACE adapts one module"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_editor("grace", tiny, **settings)


# Journal and CLI -------------------------------------------------------------------------------


@BOTH_MODES
def test_elder_through_the_journal_restart_and_undo(tiny, requests_small, tmp_path, mode):
    prompts = [r.prompt for r in requests_small]
    base = logits(tiny, prompts + UNRELATED)
    settings = {"steps": 5, **mode}

    def journaled(handle):
        return JournaledModel(
            handle, Journal(tmp_path / "j.db"), make_editor("elder", handle, **settings)
        )

    live = journaled(tiny)
    applied = []
    apply = live.editor.apply
    live.editor.apply = lambda batch: applied.append(weakref.ref(record := apply(batch))) or record
    first = live.apply(requests_small[:2])
    gc.collect()
    assert applied[0]() is None, "the journal keeps the batch's before and after alive"
    after_first = logits(tiny, prompts + UNRELATED)
    live.apply(requests_small[2:])
    edited = logits(tiny, prompts + UNRELATED)
    live.journal.release_lock()  # as a killed process leaves it

    restarted_model = same_model(tiny)
    restarted = JournaledModel(
        restarted_model,
        Journal(tmp_path / "j.db"),
        make_editor("elder", restarted_model, **settings),
    )
    assert torch.equal(logits(restarted_model, prompts + UNRELATED), edited)
    second = restarted.journal.batches()[-1]
    restarted.undo(second.id)
    assert torch.equal(logits(restarted_model, prompts + UNRELATED), after_first)
    restarted.undo(first.id)
    assert torch.equal(logits(restarted_model, prompts + UNRELATED), base)
    assert restarted.editor._held()[0] == []


@pytest.mark.parametrize(
    ("method", "settings"),
    [("elder", MIXTURE), ("elder", BATCH_LORAS), ("grace", {}), ("memoir", {})],
)
def test_a_memory_batch_that_fails_is_journaled_and_changes_nothing(
    tiny, requests_small, tmp_path, method, settings
):
    editor = make_editor(method, tiny, steps=3, **settings)
    live = JournaledModel(tiny, Journal(tmp_path / "j.db"), editor)
    live.apply(requests_small[:1])
    probe = [r.prompt for r in requests_small] + UNRELATED
    expected = logits(tiny, probe)
    tensors = {name: value.clone() for name, value in editor.tensors().items()}
    held = len(editor._batches)
    poison = tiny.model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output * float("nan")
    )
    try:
        with pytest.raises(NonFiniteUpdateError):
            live.apply(requests_small[1:])
    finally:
        poison.remove()
    assert [batch.status for batch in live.journal.batches()] == ["applied", "failed"]
    assert len(editor._batches) == held
    for name, value in editor.tensors().items():
        assert torch.equal(value, tensors[name]), name
    assert torch.equal(logits(tiny, probe), expected)


def test_cli_edit_with_elder_is_journaled(tiny, requests_small, tmp_path):
    folder = tmp_path / "model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps(requests_small[0].to_dict()) + "\n")
    journal = tmp_path / "k.db"
    result = CliRunner().invoke(
        app,
        ["edit", str(edits), "--journal", str(journal), "--method", "elder",
         "--model", str(folder), "--set", "steps=5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with Journal(journal) as opened:
        (batch,) = opened.batches()
        assert batch.method == "elder" and batch.delta_file and batch.held_file
        # By default the batch's own LoRA on each adapted layer is held with it.
        layers = len(make_editor("elder", same_model(tiny)).layers)
        loras = {f"lora_{part}.{position}" for part in "ab" for position in range(layers)}
        assert (
            set(opened.held(batch))
            == {"allocation", "queries", "rehearsal_end", "edit_loras"} | loras
        )


def test_grace_through_the_journal_restart_and_undo(tiny, requests_small, tmp_path):
    unrelated = ["The largest planet is", "Microsoft is based in"]
    base = logits(tiny, unrelated)
    settings = {"radius": 1e-3, "steps": 10}  # the tiny models' keys lie close together
    live = JournaledModel(tiny, Journal(tmp_path / "j.db"), make_editor("grace", tiny, **settings))
    first = live.apply(requests_small[:2])
    edited = logits(tiny, [r.prompt for r in requests_small])
    assert torch.equal(logits(tiny, unrelated), base)
    live.journal.close()
    restarted_model = same_model(tiny)
    restarted = JournaledModel(
        restarted_model,
        Journal(tmp_path / "j.db"),
        make_editor("grace", restarted_model, **settings),
    )
    assert torch.equal(logits(restarted_model, [r.prompt for r in requests_small]), edited)
    restarted.undo(first.id)
    assert restarted.editor.size == 0
    assert torch.equal(
        logits(restarted_model, [r.prompt for r in requests_small]),
        logits(same_model(tiny), [r.prompt for r in requests_small]),
    )


def test_bench_runs_elder_and_grace(tiny, tmp_path):
    folder = tmp_path / "model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["bench", "-m", "elder", "-m", "grace", "--model", str(folder), "--edits", "4",
         "--batch-size", "2", "--set", "elder.steps=5", "--set", "grace.steps=5",
         "--out", str(out)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "elder" / "results.json").is_file() and (out / "grace" / "results.json").is_file()


def test_elder_rehearses_earlier_edits_towards_their_own_allocation(tiny, requests_small):
    editor = make_editor("elder", tiny, replay=2, early_stop=1.0, steps=3, **MIXTURE)
    first = editor.apply(requests_small[:2])
    with sequences_per_pass(tiny) as rows:
        editor.apply(requests_small[2:])
    assert rows == [1 + 2] * 4  # the new edit and two earlier ones, 3 steps and a last pass
    requests, allocations, _ = editor._rehearsal(*editor._held()[:2])
    assert len(requests) == 2 and len({r.prompt for r in requests}) == 2
    held = [r.prompt for r in requests_small]
    everything = torch.cat([first.allocation, editor._batches[1].allocation])
    for request, allocation in zip(requests, allocations, strict=True):
        assert torch.equal(allocation, everything[held.index(request.prompt)])

    plain = make_editor("elder", same_model(tiny), replay=0, early_stop=1.0, steps=3, **MIXTURE)
    plain.apply(requests_small[:2])
    with sequences_per_pass(plain.handle) as rows:
        plain.apply(requests_small[2:])
    assert rows == [1] * 4


def test_elder_rehearses_the_held_edits_in_turn(tiny):
    requests = [EditRequest(prompt, "Rome") for prompt in UNRELATED]
    editor = make_editor("elder", tiny, replay=2, early_stop=1.0, steps=1, **MIXTURE)
    rehearsals = []
    choose = editor._rehearsal

    def record(*held):
        chosen = choose(*held)
        rehearsals.append([request.prompt for request in chosen[0]])
        return chosen

    editor._rehearsal = record
    editor.apply(requests[:5])
    for request in requests[5:]:
        editor.apply([request])
    # Each batch takes the two held edits after the ones the batch before took.
    assert rehearsals == [[], UNRELATED[0:2], UNRELATED[2:4], UNRELATED[4:6]]


def test_elder_codes_follow_the_current_routers(tiny, requests_small):
    editor = make_editor("elder", tiny, replay=0, guide_weight=1.0, **MIXTURE)
    first = editor.apply(requests_small[:2])
    router = editor.router.detach().clone()
    editor.apply(requests_small[2:])
    assert not torch.equal(editor.router, router)
    prompts = [r.prompt for r in requests_small[:2]]
    assert torch.equal(first.codes, editor.codes(prompts))
    assert torch.equal(editor._stored_codes()[:2], editor.codes(prompts))


def test_elder_early_stop_judges_new_and_rehearsed_edits_apart():
    rehearsed, new = torch.full((30,), 0.01), torch.full((6,), 1.0)
    losses = torch.cat([new, rehearsed])
    new_tokens = torch.arange(36) < 6
    assert math.exp(-losses.mean().item()) > 0.8  # one mean would have stopped at 0.8
    assert _lowest_mean_probability(losses, new_tokens) == pytest.approx(math.exp(-1.0))
    first_batch = torch.ones(6, dtype=torch.bool)
    assert _lowest_mean_probability(new, first_batch) == pytest.approx(math.exp(-1.0))


def test_elder_stops_training_a_batch_once_its_targets_are_likely(tiny, requests_small):
    every_step = make_editor("elder", tiny, early_stop=1.0, steps=5, **MIXTURE)
    with sequences_per_pass(tiny) as rows:
        every_step.apply(requests_small[:2])
    assert len(rows) == 5 + 1
    every_step.remove()

    at_once = make_editor("elder", tiny, early_stop=1e-9, steps=5, **MIXTURE)
    before = [p.detach().clone() for p in at_once._parameters()]
    with sequences_per_pass(tiny) as rows:
        at_once.apply(requests_small[:2])
    assert len(rows) == 1
    assert all(torch.equal(p, b) for p, b in zip(at_once._parameters(), before, strict=True))


def agreement_after_drift(tiny, requests_small, **settings) -> tuple[float, float]:
    """Share of the first batch's code bits on its allocation (the LoRAs it was
    trained through): after the routers drift, and after the next batch trained."""
    editor = make_editor("elder", same_model(tiny), replay=0, **MIXTURE, **settings)
    first = editor.apply(requests_small[:2])
    wanted = allocation_codes(first.allocation, editor.config.n_loras)
    assert torch.equal(first.codes, wanted)
    with torch.no_grad():
        drift = torch.randn(editor.router.shape, generator=torch.Generator().manual_seed(1))
        editor.router.copy_(drift / 4)
    drifted = (first.codes & wanted).sum().item() / wanted.sum().item()
    editor.apply(requests_small[2:])
    return drifted, (first.codes & wanted).sum().item() / wanted.sum().item()


def test_routing_anchor_brings_earlier_edits_back_to_their_allocation(tiny, requests_small):
    settings = {"guide_weight": 1.0, "early_stop": 1.0, "steps": 30, "router_steps": 0}
    drifted, anchored = agreement_after_drift(tiny, requests_small, anchor_weight=10.0, **settings)
    assert drifted < 1.0 and anchored == 1.0
    _, free = agreement_after_drift(tiny, requests_small, anchor_weight=0.0, **settings)
    assert free < 1.0


def test_router_fit_sends_held_edits_back_to_the_loras_they_were_trained_through(
    tiny, requests_small
):
    drifted, fitted = agreement_after_drift(tiny, requests_small, anchor_weight=0.0)
    assert drifted < 1.0 and fitted == 1.0
    _, free = agreement_after_drift(tiny, requests_small, anchor_weight=0.0, router_steps=0)
    assert free < 1.0


@BOTH_MODES
def test_router_fit_takes_a_bounded_replayable_sample_of_the_held_edits(
    tiny, requests_small, monkeypatch, mode
):
    def refit_sizes(editor) -> list[int]:
        """How many queries each routing of the router refit takes, for the next batch."""
        sizes: list[int] = []
        fit, route = editor._fit_routers, editor._route

        def recorded(queries):
            sizes.append(len(queries))
            return route(queries)

        def fit_recording(*args):
            monkeypatch.setattr(editor, "_route", recorded)
            try:
                fit(*args)
            finally:
                monkeypatch.setattr(editor, "_route", route)

        monkeypatch.setattr(editor, "_fit_routers", fit_recording)
        return sizes

    routers = []
    for limit in (1, 1, 0):
        editor = make_editor("elder", same_model(tiny), steps=3, router_fit_edits=limit, **mode)
        editor.apply(requests_small[:2])
        sizes = refit_sizes(editor)
        editor.apply(requests_small[2:])  # one new edit, two held
        assert sizes and set(sizes) == {1 + (limit or 2)}
        routers.append(editor.router.detach().clone())
    assert torch.equal(routers[0], routers[1])  # the sample follows the prompts alone


@pytest.mark.parametrize("method", ["elder", "grace"])
def test_a_memory_journal_exports_an_lledit_folder_that_loads_in_one_call(
    tiny, requests_small, tmp_path, monkeypatch, method
):
    monkeypatch.chdir(tmp_path)  # the model folder's name is the model's
    tiny.model.save_pretrained(tiny.name)
    tiny.tokenizer.save_pretrained(tiny.name)
    handle = load_model(tiny.name)
    live = JournaledModel(handle, Journal("j.db"), make_editor(method, handle, steps=3))
    live.apply(requests_small[:2])
    probe = [r.prompt for r in requests_small] + UNRELATED
    expected = logits(handle, probe)
    live.journal.close()
    with pytest.raises(JournalError, match=f"holds edits of '{method}', which live in the editor"):
        JournaledModel(load_model(tiny.name), Journal("j.db"))

    result = CliRunner().invoke(app, ["export", "--journal", "j.db", "--out", "out"])
    assert result.exit_code == 0, result.output
    assert "plain transformers cannot" in result.output and "load_edited" in result.output
    assert not (tmp_path / "out" / "model.safetensors").exists()
    loaded, editor = load_edited("out")
    assert editor.name == method
    assert torch.equal(logits(loaded, probe), expected)
    with pytest.raises(FileNotFoundError, match="not an lledit folder"):
        load_edited(tiny.name)
