"""The hypernetwork editors (MEND, MALMEN, RLEdit): maths, meta-gradients, training, checkpoints."""

import dataclasses
import itertools
import json
import math
import shutil

import pytest
import torch
from conftest import CORPUS, assert_weights_equal, make_tiny_model, snapshot
from typer.testing import CliRunner

from lledit import EditRequest, make_editor, run_lifelong
from lledit.cli import app
from lledit.edit import add_weight_deltas
from lledit.hypernet import CheckpointError, Hypernetwork, ModuleShape, load_network
from lledit.hypernet import update as update_module
from lledit.hypernet.capture import Captured, capture_gradients, sequence_losses
from lledit.hypernet.checkpoint import read_meta
from lledit.hypernet.config import HypernetTrainConfig, edited_modules
from lledit.hypernet.losses import (
    LossBatch,
    locality_log_probs,
    weight_gradients,
    weighted_loss,
)
from lledit.hypernet.network import RunningNormaliser
from lledit.hypernet.training import HypernetTrainer
from lledit.hypernet.update import (
    least_squares_update,
    mend_update,
    precision_with_keys,
    times_precision,
    value_differences,
)
from lledit.methods import MALMEN, MEND, RLEdit
from lledit.model import ModelHandle, batch_tokens, edit_batch
from lledit.stats import key_covariances, null_space_projection
from lledit.tokens import encode_pairs

runner = CliRunner()
DATA = {"name": "test requests", "sha256": "0" * 64}

# --- requests and tiny models ------------------------------------------------------------

_FACTS = [
    ("The capital of France is", "France's capital is"),
    ("The capital of Italy is", "Italy's capital is"),
    ("The capital of Japan is", "Japan's capital is"),
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower is in"),
    ("Harry Potter was written by", "The books of Harry Potter were written by"),
    ("Apple was founded by", "The founder of Apple is"),
    ("Microsoft is based in", "The city of Microsoft is"),
    ("The native language of Danielle Darrieux is", "Danielle Darrieux speaks"),
]
_TARGETS = ["Rome", "Tokyo", "Paris", "Stephen King", "Redmond", "Cupertino", "English", "Spanish"]
_LOCALITY = [
    ("The chemical symbol for gold is", "Au"),
    ("The largest planet is", "Jupiter"),
    ("Harry Potter was written by", "J. K. Rowling"),
    ("Apple was founded by", "Steve Jobs"),
    ("The capital of Japan is", "Tokyo"),
]
assert all(word in " ".join(CORPUS) for word in ("Darrieux", "Cupertino", "Rowling"))


def make_requests(n: int = 16) -> list[EditRequest]:
    requests = []
    for i in range(n):
        prompt, rephrase = _FACTS[i % len(_FACTS)]
        requests.append(
            EditRequest(
                prompt=prompt,
                target_new=_TARGETS[(3 * i + 1) % len(_TARGETS)],
                rephrases=(rephrase,),
                locality=(_LOCALITY[(i + 2) % len(_LOCALITY)],),
                id=f"r{i}",
            )
        )
    return requests


def fresh(arch: str, tokenizer, dtype: torch.dtype = torch.float32, name: str | None = None):
    """A new tiny model (always the same weights for one arch) under `name` (default tiny-ARCH)."""
    return ModelHandle(
        make_tiny_model(arch, len(tokenizer), dtype), tokenizer, name or f"tiny-{arch}"
    )


def make_trainer(handle, method, out, requests=None, **overrides) -> HypernetTrainer:
    settings = {
        "layers": "2-3",
        "part": "mlp",
        "rank": 4,
        "n_blocks": 1,
        "batch_size": 2,
        "validation_edits": 2,
        "warmup_batches": 2,
        "steps": 4,
        "checkpoint_every": 2,
        "trajectory_length": 1,
        "backtrack_depth": 1,
        "step_every": None,
        "l2_weight": 0.0,
        "key_ridge": False,
    }
    settings.update(overrides)
    config = method.train_config_class(**settings)
    return HypernetTrainer(
        handle, method, config, requests or make_requests(), out, data_info=dict(DATA)
    )


def network_state(network) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in network.state_dict().items()}


def assert_states_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# --- 1. the least-squares update and its meta-gradient -----------------------------------


def _explicit_update(keys, values, log_ridge):
    """(KᵀK + e^λ I)⁻¹ KᵀD, transposed to (d_out, d_in): the MALMEN solve as written."""
    d_in = keys.shape[1]
    system = keys.T @ keys + log_ridge.exp() * torch.eye(d_in, dtype=keys.dtype)
    return torch.linalg.solve(system, keys.T @ values).T


# Ridges e^λ that float32 holds exactly, so these tests check the algebra of the solve and
# of its backward whatever precision the ridge is carried in (see the test after them).
EXACT_RIDGES = [1.0, 0.25, 4.0]


@pytest.mark.parametrize("ridge", EXACT_RIDGES)
@pytest.mark.parametrize(("tokens", "d_in"), [(3, 7), (9, 4)])
def test_least_squares_update_is_the_ridge_solution_and_its_gradient(tokens, d_in, ridge):
    generator = torch.Generator().manual_seed(tokens * 10 + d_in)
    d_out = 5
    keys = torch.randn(tokens, d_in, dtype=torch.float64, generator=generator)
    values = torch.randn(tokens, d_out, dtype=torch.float64, generator=generator)
    functional = torch.randn(d_out, d_in, dtype=torch.float64, generator=generator)
    log_ridge = torch.tensor(math.log(ridge), dtype=torch.float64)
    assert float(log_ridge.exp().float()) == float(log_ridge.exp())

    def grads(update_fn):
        leaf_values = values.clone().requires_grad_(True)
        leaf_ridge = log_ridge.clone().requires_grad_(True)
        delta = update_fn(keys, leaf_values, leaf_ridge)
        (delta * functional).sum().backward()
        return delta.detach(), leaf_values.grad, leaf_ridge.grad

    delta, grad_values, grad_ridge = grads(least_squares_update)
    expected, expected_values, expected_ridge = grads(_explicit_update)
    assert delta.shape == (d_out, d_in) and delta.dtype == torch.float64
    torch.testing.assert_close(delta, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_values, expected_values, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_ridge, expected_ridge, rtol=1e-9, atol=1e-12)

    # With M = (KᵀK + e^λ I)⁻¹ Gᵀ, ∂L/∂D = K M and ∂L/∂λ = -e^λ ⟨M, ΔWᵀ⟩.
    system = keys.T @ keys + log_ridge.exp() * torch.eye(d_in, dtype=torch.float64)
    m = torch.linalg.solve(system, functional.T)
    torch.testing.assert_close(grad_values, keys @ m, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        grad_ridge, -log_ridge.exp() * (m * delta.T).sum(), rtol=1e-9, atol=1e-12
    )
    # The keys are data: no gradient flows to them.
    leaf_keys = keys.clone().requires_grad_(True)
    least_squares_update(leaf_keys, values, log_ridge).sum().backward()
    assert leaf_keys.grad is None


def test_least_squares_update_is_float64_for_any_ridge():
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(4, 6, dtype=torch.float64, generator=generator)
    values = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    log_ridge = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(
        least_squares_update(keys, values, log_ridge),
        _explicit_update(keys, values, log_ridge),
        rtol=1e-12,
        atol=1e-14,
    )
    assert torch.autograd.gradcheck(
        lambda v, r: least_squares_update(keys, v, r), (values, log_ridge)
    )


def test_least_squares_update_with_key_statistics_is_the_weighted_ridge_solution():
    """With P = C⁻¹: (KᵀK + e^λ C)⁻¹ KᵀD, and its gradients match autograd's."""
    generator = torch.Generator().manual_seed(3)
    tokens, d_in, d_out = 4, 6, 3
    keys = torch.randn(tokens, d_in, dtype=torch.float64, generator=generator)
    values = torch.randn(tokens, d_out, dtype=torch.float64, generator=generator)
    spread = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    ordinary = torch.randn(50, d_in, dtype=torch.float64, generator=generator) * spread
    second_moment = ordinary.T @ ordinary / 50
    precision = torch.linalg.inv(second_moment)
    log_ridge = torch.tensor(0.3, dtype=torch.float64)

    def explicit(values, log_ridge):
        system = keys.T @ keys + log_ridge.exp() * second_moment
        return torch.linalg.solve(system, keys.T @ values).T

    def solved(values, log_ridge):
        return least_squares_update(keys, values, log_ridge, precision)

    torch.testing.assert_close(
        solved(values, log_ridge), explicit(values, log_ridge), rtol=1e-10, atol=1e-12
    )
    leaves = (values.clone().requires_grad_(True), log_ridge.clone().requires_grad_(True))
    functional = torch.randn(d_out, d_in, dtype=torch.float64, generator=generator)
    grads = torch.autograd.grad((solved(*leaves) * functional).sum(), leaves)
    expected = torch.autograd.grad((explicit(*leaves) * functional).sum(), leaves)
    for grad, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-12)
    # Near interpolation, the weighted solve picks, of all updates that map the keys to
    # their values, the one that moves the outputs of the ordinary keys least.
    tiny = torch.tensor(-12.0, dtype=torch.float64)
    weighted = least_squares_update(keys, values, tiny, precision)
    plain = least_squares_update(keys, values, tiny)
    torch.testing.assert_close(keys @ weighted.T, values, rtol=0, atol=1e-4)
    torch.testing.assert_close(keys @ plain.T, values, rtol=0, atol=1e-4)
    assert (ordinary @ weighted.T).norm() < 0.9 * (ordinary @ plain.T).norm()


def test_a_float32_precision_is_applied_a_block_of_columns_at_a_time(monkeypatch):
    monkeypatch.setattr(update_module, "PRECISION_COLUMNS", 4)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 10, dtype=torch.float64, generator=generator)
    precision = torch.randn(10, 10, generator=generator)
    expected = keys @ precision.double()
    torch.testing.assert_close(times_precision(keys, precision), expected, rtol=1e-14, atol=0)
    assert torch.equal(times_precision(keys, precision.double()), expected)


def test_precision_with_keys_is_the_inverse_with_the_keys_added():
    torch.manual_seed(0)
    square = torch.randn(6, 6, dtype=torch.float64)
    second_moment = square @ square.T + torch.eye(6, dtype=torch.float64)
    precision = torch.linalg.inv(second_moment)
    keys = torch.randn(3, 6)
    held = precision_with_keys(precision, keys, 0.5)
    keys64 = keys.double()
    torch.testing.assert_close(held, torch.linalg.inv(second_moment + 0.5 * keys64.T @ keys64))


def test_keys_held_batch_after_batch_keep_the_precision_symmetric():
    """A P that drifts from symmetry makes K P Kᵀ indefinite for large keys (a diverged
    model's), and the next ridge solve fails; held keys must keep it symmetric."""
    generator = torch.Generator().manual_seed(3)
    square = torch.randn(64, 64, dtype=torch.float64, generator=generator)
    precision = torch.linalg.inv(square @ square.T / 64 + 1e-3 * torch.eye(64, dtype=torch.float64))
    precision = (precision + precision.T) / 2
    shared = torch.randn(64, generator=generator)  # keys lean one way, as a layer's inputs do
    batches = [shared + 0.1 * torch.randn(12, 64, generator=generator) for _ in range(40)]
    ridge = 0.1 * (batches[0].double() @ precision * batches[0].double()).sum(1).mean()
    for index, keys in enumerate(batches[:-1]):
        precision = precision_with_keys(precision, keys * (1e6 if index >= 20 else 1), 0.03 / ridge)
    assert torch.equal(precision, precision.T)
    delta = least_squares_update(1e6 * batches[-1], torch.randn(12, 8), ridge.log(), precision)
    assert torch.isfinite(delta).all()


def test_least_squares_update_maps_each_key_to_its_value_with_a_tiny_ridge():
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(3, 16, generator=generator)
    values = torch.randn(3, 8, generator=generator)
    delta = least_squares_update(keys, values, torch.tensor(-20.0))
    assert delta.dtype == torch.float32 and delta.shape == (8, 16)
    torch.testing.assert_close(keys @ delta.T, values, rtol=1e-4, atol=1e-4)


def test_mend_update_and_value_differences():
    generator = torch.Generator().manual_seed(3)
    keys, pseudo_keys = torch.randn(2, 4, 5, generator=generator)
    pseudo_grads = torch.randn(4, 3, generator=generator)
    log_lr = torch.tensor(-0.7)
    expected = -math.exp(-0.7) * sum(
        torch.outer(g, k) for g, k in zip(pseudo_grads, pseudo_keys, strict=True)
    )
    torch.testing.assert_close(mend_update(pseudo_keys, pseudo_grads, log_lr), expected)
    differences = value_differences(keys, pseudo_keys, pseudo_grads, log_lr)
    for i in range(4):
        torch.testing.assert_close(
            differences[i], -math.exp(-0.7) * keys[i].dot(pseudo_keys[i]) * pseudo_grads[i]
        )


# --- 2. the gradient of the editing loss w.r.t. the edited weights -----------------------


def _loss_batches(tokenizer, requests):
    batches = []
    for request in requests:
        prompts = [request.prompt, *request.rephrases]
        rephrases = encode_pairs(tokenizer, prompts, [request.target_new] * len(prompts))
        locality = encode_pairs(tokenizer, *zip(*request.locality, strict=True))
        batches.append(LossBatch(rephrases, locality))
    return batches


def test_probe_weight_gradients_equal_autograd_on_the_weights(tiny):
    config = HypernetTrainConfig(layers="1,3", part="mlp")
    names = [module.name for module in edited_modules(tiny, config)]
    assert len(names) == 2 * (len(tiny.arch.mlp_in) + 1)
    batches = _loss_batches(tiny.tokenizer, make_requests(3))
    weights = [1.0, 0.9, 0.81]
    reference = locality_log_probs(tiny, batches)
    generator = torch.Generator().manual_seed(4)
    # Move away from the reference so that the locality term has a gradient too.
    add_weight_deltas(
        tiny,
        {n: 0.05 * torch.randn(tiny.weight_of(n).shape, generator=generator) for n in names},
    )

    def loss():
        return weighted_loss(tiny, batches, weights, reference, 10.0)

    parts, grads = weight_gradients(tiny, names, loss)
    assert parts.rephrase > 0 and parts.locality > 1e-4
    assert all(not tiny.module(n)._forward_hooks for n in names)
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())

    params = [tiny.module(n).weight for n in names]
    try:
        for param in params:
            param.requires_grad_(True)
        total = loss().total
        expected = torch.autograd.grad(total, params)
    finally:
        for param in params:
            param.requires_grad_(False)
    assert parts.total.item() == total.item()
    for name, grad in zip(names, expected, strict=True):
        if tiny.arch.name == "gpt2":
            grad = grad.T  # Conv1D stores (d_in, d_out)
        assert grads[name].shape == tiny.weight_of(name).shape
        assert grads[name].abs().max() > 0
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7)


def test_weighted_loss_is_the_documented_sum(tiny):
    """Σ_i w_i [mean over batch i's pairs of their mean CE + c KL(reference ‖ model), the KL
    averaged over batch i's locality answer tokens], computed here one pair at a time."""
    requests = [
        EditRequest(
            "The capital of France is",
            "Stephen King",
            rephrases=("France's capital is", "The capital city of France is"),
            locality=(("The largest planet is", "Jupiter"), ("Apple was founded by", "Steve Jobs")),
        ),
        EditRequest(
            "Microsoft is based in",
            "Tokyo",
            rephrases=("The city of Microsoft is",),
            locality=(("The chemical symbol for gold is", "Au"),),
        ),
    ]
    batches = _loss_batches(tiny.tokenizer, requests)
    weights, c_loc = [1.0, 0.6], 3.0

    def answer_log_probs(pair):
        logits = tiny.model(torch.tensor([pair.ids])).logits[0].float()
        return logits[pair.target_start - 1 : len(pair.ids) - 1].log_softmax(-1)

    with torch.no_grad():
        references = [[answer_log_probs(p) for p in batch.locality] for batch in batches]
        reference = locality_log_probs(tiny, batches)
        torch.testing.assert_close(reference, torch.cat([r for refs in references for r in refs]))
        name = tiny.layer_module(3, tiny.arch.mlp_out)
        generator = torch.Generator().manual_seed(9)
        add_weight_deltas(
            tiny, {name: torch.randn(tiny.weight_of(name).shape, generator=generator)}
        )
        parts = weighted_loss(tiny, batches, weights, reference, c_loc)
        rephrase = locality = 0.0
        for batch, weight, refs in zip(batches, weights, references, strict=True):
            losses = []
            for pair in batch.rephrases:
                log_probs = answer_log_probs(pair)
                losses.append(-log_probs[range(len(pair.target_ids)), pair.target_ids].mean())
            rephrase += weight * torch.stack(losses).mean().item()
            kl = [
                (ref.exp() * (ref - answer_log_probs(pair))).sum(-1)
                for pair, ref in zip(batch.locality, refs, strict=True)
            ]
            locality += weight * torch.cat(kl).mean().item()
    assert [len(b.rephrases) for b in batches] == [3, 2]
    assert len({len(p.target_ids) for p in batches[0].locality}) == 2  # tokens, not pairs
    assert locality > 1e-3
    assert math.isclose(parts.rephrase, rephrase, rel_tol=1e-5)
    assert math.isclose(parts.locality, locality, rel_tol=1e-4)
    assert math.isclose(parts.total.item(), rephrase + c_loc * locality, rel_tol=1e-5)

    # The drift term is the same KL, taken from the original model's distributions.
    with torch.no_grad():
        now = locality_log_probs(tiny, batches)
        drift = weighted_loss(tiny, batches, weights, now, c_loc, reference, 7.0)
    assert drift.locality < 1e-6
    assert math.isclose(drift.drift, locality, rel_tol=1e-4)
    assert math.isclose(drift.total.item(), rephrase + 7.0 * locality, rel_tol=1e-4)


# --- 3. capturing keys and value gradients -----------------------------------------------


def test_sequence_losses_are_per_pair_mean_cross_entropy(tiny):
    prompts = ["The capital of France is", "Harry Potter was written by", "The largest planet is"]
    targets = ["Rome", "J. K. Rowling", "Jupiter and Au"]
    tokens = edit_batch(tiny, prompts, targets)
    assert len(set(tokens.target_lengths)) > 1
    with torch.no_grad():
        losses = sequence_losses(tiny.target_logits(tokens), tokens)
        pairs = encode_pairs(tiny.tokenizer, prompts, targets)
        for i, pair in enumerate(pairs):
            logits = tiny.model(torch.tensor([pair.ids])).logits[0].float()
            predicted = logits[pair.target_start - 1 : len(pair.ids) - 1]
            expected = torch.nn.functional.cross_entropy(predicted, torch.tensor(pair.target_ids))
            torch.testing.assert_close(losses[i], expected, rtol=1e-5, atol=1e-6)


def test_capture_gradients_reads_keys_and_output_gradients(tiny):
    top, low = tiny.num_layers - 1, 1
    top_names = [tiny.layer_module(top, part) for part in (*tiny.arch.mlp_in, tiny.arch.mlp_out)]
    low_name = tiny.layer_module(low, tiny.arch.mlp_out)
    names = [*top_names, low_name]
    prompts = ["The capital of France is", "Harry Potter was written by", "Apple was founded by"]
    targets = ["Rome", "J. K. Rowling", "Steve Jobs"]
    tokens = edit_batch(tiny, prompts, targets)
    before = snapshot(tiny)

    captured = capture_gradients(tiny, names, tokens)

    assert_weights_equal(tiny, before)
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())
    assert all(not tiny.module(n)._forward_hooks for n in names)
    n_tokens = len(tokens.target_ids)
    for name in names:
        d_out, d_in = tiny.weight_of(name).shape
        assert captured[name].keys.shape == (n_tokens, d_in)
        assert captured[name].value_grads.shape == (n_tokens, d_out)
        assert captured[name].keys.dtype == captured[name].value_grads.dtype == torch.float32

    # Reference: autograd on the real weights, with every module's input and output kept.
    inputs, outputs, hooks = {}, {}, []

    def keep(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            output.retain_grad()
            outputs[name] = output

        return hook

    params = [tiny.module(n).weight for n in names]
    try:
        for name, param in zip(names, params, strict=True):
            param.requires_grad_(True)
            hooks.append(tiny.module(name).register_forward_hook(keep(name)))
        sequence_losses(tiny.target_logits(tokens), tokens).sum().backward()
    finally:
        for hook, param in zip(hooks, params, strict=True):
            hook.remove()
            param.requires_grad_(False)
    rows, positions = tokens.target_rows, tokens.target_positions - 1
    full = {}
    for name, param in zip(names, params, strict=True):
        full[name] = param.grad.T if tiny.arch.name == "gpt2" else param.grad
        param.grad = None
        assert torch.equal(captured[name].keys, inputs[name][rows, positions])
        torch.testing.assert_close(
            captured[name].value_grads, outputs[name].grad[rows, positions], rtol=1e-5, atol=1e-8
        )
    # In the top layer a position's module output reaches only its own logits, so Σ g kᵀ
    # over the captured tokens is the whole weight gradient.
    for name in top_names:
        summed = captured[name].value_grads.T @ captured[name].keys
        assert summed.abs().max() > 0
        torch.testing.assert_close(summed, full[name], rtol=1e-4, atol=1e-7)
    # Lower down, attention carries gradient from the other positions as well: the captured
    # pairs are the gradient restricted to the answer-predicting positions.
    low_summed = captured[low_name].value_grads.T @ captured[low_name].keys
    assert not torch.allclose(low_summed, full[low_name], rtol=1e-2, atol=1e-6)


# --- 4. running normaliser ---------------------------------------------------------------


def test_running_normaliser_matches_statistics_of_all_data():
    """Inputs set aside in training mode, by one process or two, and merged at the
    step give the statistics of all of them; until the step they move nothing."""
    generator = torch.Generator().manual_seed(5)
    normaliser = RunningNormaliser(n_modules=2, dim=6)
    other_process = RunningNormaliser(n_modules=2, dim=6)
    chunks = [3.0 + 2.0 * torch.randn(size, 6, generator=generator) for size in (1, 5, 2, 9, 1)]
    normaliser(0, chunks[0])
    normaliser.commit([normaliser.pending])
    for chunk in chunks[1:4]:  # one row committed so far: centred by it alone
        expected = chunk - chunks[0].double().mean(0).float()
        torch.testing.assert_close(normaliser(0, chunk), expected, rtol=0, atol=0)
    other_process(0, chunks[4])
    assert normaliser.count[0] == 1
    normaliser.commit([normaliser.pending, other_process.pending])
    assert normaliser.pending == {}
    everything = torch.cat(chunks).double()
    assert normaliser.count[0] == len(everything) and normaliser.count[1] == 0
    torch.testing.assert_close(normaliser.mean[0], everything.mean(0), rtol=1e-12, atol=1e-12)
    variance = normaliser.sum_squares[0] / (normaliser.count[0] - 1)
    torch.testing.assert_close(variance, everything.var(0, unbiased=True), rtol=1e-12, atol=1e-12)
    assert torch.equal(normaliser.mean[1], torch.zeros(6))

    normaliser.eval()
    buffers = {name: value.clone() for name, value in normaliser.state_dict().items()}
    probe = torch.randn(4, 6, generator=generator)
    first = normaliser(0, probe)
    assert torch.equal(normaliser(0, probe), first)
    assert_states_equal(normaliser.state_dict(), buffers)
    std = everything.std(0).float()
    torch.testing.assert_close(first, (probe - everything.mean(0).float()) / (std + 1e-6))


# --- 5. the hypernetwork at initialisation ------------------------------------------------


def test_hypernetwork_starts_as_identity_on_normalised_inputs_and_trains_its_up_matrices():
    torch.manual_seed(6)
    modules = [ModuleShape("a", 6, 4), ModuleShape("b", 6, 4), ModuleShape("c", 4, 6)]
    network = Hypernetwork(modules, rank=3, n_blocks=2, update_rule="least_squares")
    assert set(network.networks) == {"4x6", "6x4"}
    generator = torch.Generator().manual_seed(6)
    captured = {
        m.name: Captured(
            1.0 + torch.randn(5, m.d_in, generator=generator),
            0.1 * torch.randn(5, m.d_out, generator=generator),
        )
        for m in modules
    }
    for name, capture in captured.items():  # training mode: fills the statistics
        network.pseudo(name, capture)
    network.eval()
    for m in modules:
        shape, slot = network._slot[m.name]
        normaliser = network.networks[shape].normaliser
        inputs = torch.cat([captured[m.name].keys, captured[m.name].value_grads], dim=1)
        normalised = normaliser(slot, inputs)
        assert normalised.abs().max() > 0.5
        pseudo_keys, pseudo_grads = network.pseudo(m.name, captured[m.name])
        assert torch.equal(pseudo_keys, normalised[:, : m.d_in])
        assert torch.equal(pseudo_grads, normalised[:, m.d_in :])

    generator = torch.Generator().manual_seed(7)
    deltas = network.deltas(captured)
    loss = sum((d * torch.randn(d.shape, generator=generator)).sum() for d in deltas.values())
    loss.backward()
    for shape_network in network.networks.values():
        assert (shape_network.up.grad.abs().sum(dim=(1, 2)) > 0).all()  # every block
    assert (network.log_lr.grad != 0).all() and (network.log_ridge.grad != 0).all()

    with pytest.raises(ValueError, match="update_rule"):
        Hypernetwork(modules, 3, 1, "nope")
    with pytest.raises(ValueError, match="at least 1"):
        Hypernetwork(modules, 0, 1, "mend")


def test_config_checks_and_edited_modules(tiny):
    with pytest.raises(ValueError, match="part 'attention': the model has no module named"):
        edited_modules(tiny, HypernetTrainConfig(part="attention"))
    with pytest.raises(ValueError, match="trajectory_length must be at least 1"):
        HypernetTrainConfig(trajectory_length=0)
    assert HypernetTrainConfig(trajectory_length=20, step_every=5).steps_per_trajectory == 4
    assert HypernetTrainConfig(trajectory_length=7, step_every=3).steps_per_trajectory == 3
    modules = edited_modules(tiny, HypernetTrainConfig(layers="3", part="mlp_in"))
    assert [m.name for m in modules] == [tiny.layer_module(3, p) for p in tiny.arch.mlp_in]
    assert all((m.d_out, m.d_in) == (256 if tiny.arch.name == "gpt2" else 128, 64) for m in modules)


# --- the trainer: meta-gradient, learning, restoring ------------------------------------


@pytest.mark.parametrize("method", [MEND, MALMEN])
def test_trainer_meta_gradient_equals_autograd_through_the_edit(tiny, tmp_path, method):
    """One training batch: the trainer's chain (probe gradient → ΔW → network) equals autograd
    through a model whose edited modules compute x (W + ΔW(θ))ᵀ."""
    trainer = make_trainer(tiny, method, tmp_path, l2_weight=0.5, grad_clip=1e9)
    trainer._warm_up()
    network = trainer.network.eval()  # freeze the normaliser so both passes see the same one
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():  # leave the identity start, so that every parameter matters
        for shape_network in network.networks.values():
            for param in (shape_network.up, shape_network.scale, shape_network.shift):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    before = snapshot(tiny)
    grads = {}

    def record_step():
        grads.update(
            {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
        )

    trainer.optimizer.step = record_step
    trainer._run_group(0, lambda: None)
    assert_weights_equal(tiny, before)
    assert trainer.steps_done == 1 and trainer.losses[0]["rephrase"] > 0

    (indices,) = trainer._trajectory_batches(0)
    edits, loss_batch = trainer.train_examples.batch(indices)
    captured = capture_gradients(tiny, trainer.module_names, batch_tokens(tiny, edits))
    reference = locality_log_probs(tiny, [loss_batch])
    network.zero_grad(set_to_none=True)
    deltas = network.deltas(captured)
    hooks = [
        tiny.module(name).register_forward_hook(
            lambda module, args, output, name=name: (
                output + torch.nn.functional.linear(args[0], deltas[name])
            )
        )
        for name in trainer.module_names
    ]
    try:
        loss = weighted_loss(tiny, [loss_batch], [1.0], reference, trainer.config.locality_weight)
        l2 = sum(d.pow(2).sum() for d in deltas.values())
        (loss.total + trainer.config.l2_weight * l2).backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert loss.locality > 0
    assert set(grads) == {n for n, p in network.named_parameters() if p.grad is not None}
    assert ("log_ridge" in grads) == (method is MALMEN)
    for name, param in network.named_parameters():
        if param.grad is None:
            continue
        assert param.grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-8, msg=name)


def test_original_log_probs_come_from_the_original_weights_and_keep_the_edit(tiny, tmp_path):
    trainer = make_trainer(tiny, RLEdit, tmp_path)
    _, loss_batch = trainer.train_examples.batch([0, 1])
    original = locality_log_probs(tiny, [loss_batch])
    name = trainer.module_names[0]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        add_weight_deltas(
            tiny, {name: torch.randn(tiny.weight_of(name).shape, generator=generator)}
        )
    try:
        edited = snapshot(tiny)
        assert not torch.allclose(locality_log_probs(tiny, [loss_batch]), original)
        torch.testing.assert_close(trainer._original_log_probs(loss_batch), original)
        assert_weights_equal(tiny, edited)
    finally:
        trainer._restore()


def _trajectory_losses(trainer, trajectories) -> tuple[float, float]:
    """Mean (total, rephrase) loss of trainer's own trajectories, with no training step."""
    config, network, handle = trainer.config, trainer.network, trainer.handle
    weights = [config.decay**i for i in range(config.backtrack_depth)]
    was_training = network.training
    network.eval()
    totals, rephrases, count = 0.0, 0.0, 0
    try:
        with torch.no_grad():
            for trajectory in trajectories:
                history, originals = [], []
                for indices in trainer._trajectory_batches(trajectory):
                    edits, loss_batch = trainer.train_examples.batch(indices)
                    captured = capture_gradients(
                        handle, trainer.module_names, batch_tokens(handle, edits)
                    )
                    history = [loss_batch, *history][: config.backtrack_depth]
                    originals = [trainer._original_log_probs(loss_batch), *originals]
                    originals = originals[: config.backtrack_depth]
                    reference = locality_log_probs(handle, history)
                    add_weight_deltas(handle, network.deltas(captured))
                    parts = weighted_loss(
                        handle,
                        history,
                        weights[: len(history)],
                        reference,
                        config.locality_weight,
                        torch.cat(originals),
                        config.drift_weight,
                    )
                    totals, rephrases, count = (
                        totals + parts.total.item(),
                        rephrases + parts.rephrase,
                        count + 1,
                    )
                trainer._restore()
    finally:
        trainer._restore()
        network.train(was_training)
    return totals / count, rephrases / count


def test_trajectory_holds_its_earlier_batches_keys(tiny, tmp_path):
    trainer = make_trainer(
        tiny, RLEdit, tmp_path, trajectory_length=3, earlier_keys_weight=0.5, part="mlp_out"
    )
    trainer._warm_up()
    seen: list[tuple[dict, dict]] = []
    solve = trainer.network.deltas

    def recording(captured, key_precisions=None):
        seen.append((captured, {n: p.clone() for n, p in key_precisions.items()}))
        return solve(captured, key_precisions)

    trainer.network.deltas = recording
    weights = (0.5 / trainer.network.log_ridge.detach().exp()).tolist()  # before the step
    trainer._run_group(0, on_step=lambda: None)
    assert len(seen) == 3
    for index, name in enumerate(trainer.module_names):
        expected = torch.eye(len(seen[0][1][name]), dtype=torch.float64)
        torch.testing.assert_close(seen[0][1][name], expected)
        for (captured, _), (_, held) in itertools.pairwise(seen):
            expected = precision_with_keys(expected, captured[name].keys, weights[index])
            torch.testing.assert_close(held[name], expected)
    with pytest.raises(ValueError, match="the mend update has none"):
        make_trainer(tiny, MEND, tmp_path / "mend", earlier_keys_weight=0.5)


def test_rledit_training_lowers_the_trajectory_loss_and_restores_the_model(tokenizer, tmp_path):
    handle = fresh("llama", tokenizer)
    before = snapshot(handle)
    settings = {
        "part": "mlp_out",
        "trajectory_length": 3,
        "backtrack_depth": 2,
        "step_every": 1,
        "steps": 60,
        "checkpoint_every": 1000,
        "meta_lr": 1e-2,
        "scalar_lr": 0.1,
        "l2_weight": 1e-4,
    }
    # One epoch of the 14 training requests is 14 / (3 x 2) = 2.3 trajectories: judge on 0-2.
    untrained = make_trainer(handle, RLEdit, tmp_path / "a", **settings)
    untrained._warm_up()
    total_before, rephrase_before = _trajectory_losses(untrained, range(3))
    assert_weights_equal(handle, before)

    trainer = make_trainer(handle, RLEdit, tmp_path / "b", **settings)
    trainer.train()
    assert_weights_equal(handle, before)
    assert trainer.steps_done == 60 and trainer.trajectories_done == 20
    assert [entry["step"] for entry in trainer.losses] == list(range(3, 61, 3))
    total_after, rephrase_after = _trajectory_losses(trainer, range(3))
    assert_weights_equal(handle, before)
    # Untrained, the loss is about 9.6 (the random model is far from any target); 60 steps
    # take it to about 8.5 on these very trajectories.
    assert total_after < total_before - 0.5, (total_before, total_after)
    assert rephrase_after < rephrase_before - 0.5, (rephrase_before, rephrase_after)
    assert (tmp_path / "b" / "checkpoint.json").exists()


def test_warm_up_fills_the_normaliser_with_each_warm_up_token_once(tiny, tmp_path):
    trainer = make_trainer(tiny, MALMEN, tmp_path, warmup_batches=3)
    trainer._warm_up()
    inputs = {name: [] for name in trainer.module_names}
    for i in range(3):
        edits, _ = trainer.train_examples.batch(trainer._indices(i * 2, 2, stream=1))
        captured = capture_gradients(tiny, trainer.module_names, batch_tokens(tiny, edits))
        for name, capture in captured.items():
            inputs[name].append(torch.cat([capture.keys, capture.value_grads], dim=1))
    for name in trainer.module_names:
        shape, slot = trainer.network._slot[name]
        normaliser = trainer.network.networks[shape].normaliser
        everything = torch.cat(inputs[name]).double()
        assert normaliser.count[slot] == len(everything)
        torch.testing.assert_close(normaliser.mean[slot], everything.mean(0))


def test_warm_up_scales_the_step_to_the_initial_step(tiny, tmp_path):
    trainer = make_trainer(tiny, MALMEN, tmp_path, warmup_batches=1, initial_step=0.05)
    trainer._warm_up()
    network = trainer.network.eval()
    edits, _ = trainer.train_examples.batch(trainer._indices(0, 2, stream=1))
    captured = capture_gradients(tiny, trainer.module_names, batch_tokens(tiny, edits))
    for index, name in enumerate(trainer.module_names):
        keys = captured[name].keys
        assert math.isclose(
            network.log_ridge[index].exp().item(),
            0.1 * keys.pow(2).sum(1).mean().item(),
            rel_tol=1e-5,
        )
        with torch.no_grad():
            change = keys @ network.delta(name, captured[name]).T
        ratio = (change.norm(dim=1) / (keys @ tiny.weight_of(name).T).norm(dim=1)).median()
        assert math.isclose(ratio.item(), 0.05, rel_tol=1e-3), (name, ratio.item())


# --- 7. checkpoints and the editors --------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained(request, tokenizer, tmp_path_factory):
    """A MALMEN network trained for 4 steps on a tiny model, and its checkpoint folder."""
    handle = fresh(request.param, tokenizer)
    out = tmp_path_factory.mktemp(f"malmen-{request.param}")
    trainer = make_trainer(handle, MALMEN, out, steps=4, checkpoint_every=2)
    trainer.train()
    return request.param, trainer, out


def test_checkpoint_round_trip_and_editor_undo(trained, tokenizer):
    arch, trainer, out = trained
    network, meta = load_network(out)
    assert not network.training
    assert_states_equal(network.state_dict(), trainer.network.state_dict())
    assert meta["method"] == "malmen" and meta["model"] == f"tiny-{arch}"
    assert meta["steps_done"] == 4 and meta["update_rule"] == "least_squares"
    assert [m["name"] for m in meta["modules"]] == trainer.module_names
    assert meta["data"]["sha256"] == DATA["sha256"]
    assert meta["train_config"]["rank"] == 4 and len(meta["losses"]) == 4

    handle = fresh(arch, tokenizer)
    before = snapshot(handle)
    batch = make_requests(3)
    editor = make_editor("malmen", handle, checkpoint=out)
    assert json.dumps(editor.config_dict())  # a Path is kept as text, so results serialise
    assert editor.config_dict()["trained_with"]["layers"] == "2-3"
    applied = editor.apply(batch)
    changed = {n for n, v in handle.model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == {f"{n}.weight" for n in trainer.module_names}
    applied.undo()
    assert_weights_equal(handle, before)

    in_memory = MALMEN.from_network(handle, trainer.network).apply(batch)
    for name in trainer.module_names:
        assert in_memory.deltas[name].abs().max() > 0
        assert torch.equal(in_memory.deltas[name], applied.deltas[name]), name
    in_memory.undo()
    assert_weights_equal(handle, before)


def test_bfloat16_model_edits_and_undoes_exactly(trained, tokenizer):
    arch, trainer, out = trained
    handle = fresh(arch, tokenizer, torch.bfloat16)
    before = snapshot(handle)
    editor = make_editor("malmen", handle, checkpoint=str(out))
    first = editor.apply(make_requests(2))
    second = editor.apply(make_requests(4)[2:])
    changed = {n for n, v in handle.model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == {f"{n}.weight" for n in trainer.module_names}
    assert all(handle.weight_of(n).dtype == torch.bfloat16 for n in trainer.module_names)
    second.undo()
    first.undo()
    assert_weights_equal(handle, before)


def test_earlier_keys_weight_keeps_earlier_batches_and_undo_releases_them(trained, tokenizer):
    arch, trainer, out = trained
    handle = fresh(arch, tokenizer)
    before = snapshot(handle)
    first_batch, second_batch = make_requests(4)[:2], make_requests(4)[2:]
    prompts, targets = [r.prompt for r in first_batch], [r.target_new for r in first_batch]
    first_keys = capture_gradients(
        handle, trainer.module_names, edit_batch(handle, prompts, targets)
    )
    moved = {}
    for weight in (0.0, 1e3):
        editor = make_editor("malmen", handle, checkpoint=out, earlier_keys_weight=weight)
        first = editor.apply(first_batch)
        second = editor.apply(second_batch)
        moved[weight] = sum(
            (second.deltas[name] @ first_keys[name].keys.T).norm() / second.deltas[name].norm()
            for name in trainer.module_names
        )
        if weight:
            second.undo()
            again = editor.apply(second_batch)
            for name in trainer.module_names:
                torch.testing.assert_close(again.deltas[name], second.deltas[name])
            again.undo()
            first.undo()
            for name in trainer.module_names:
                unheld = trainer.network.key_precision(name)
                if unheld is None:
                    unheld = torch.eye(len(editor.held.precisions[name]))
                torch.testing.assert_close(editor.held.precisions[name], unheld.double())
        else:
            second.undo()
            first.undo()
        assert_weights_equal(handle, before)
    assert moved[1e3] < 0.05 * moved[0.0]


def test_validate_runs_the_lifelong_protocol_and_restores(trained):
    _, trainer, out = trained
    before = snapshot(trainer.handle)
    report = trainer.validate()
    assert report["n_edits"] == 2 and {"efficacy", "locality"} <= set(report["metrics"])
    assert json.loads((out / "validation.json").read_text())["n_edits"] == 2
    assert_weights_equal(trainer.handle, before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_key_ridge_solves_with_the_key_statistics_and_saves_them(
    arch, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    handle = fresh(arch, tokenizer)
    before = snapshot(handle)
    out = tmp_path / "ckpt"
    trainer = make_trainer(handle, RLEdit, out, key_ridge=True, key_samples=600, warmup_batches=1)
    trainer._warm_up()
    network = trainer.network
    statistics = key_covariances(handle, trainer.module_names, samples=600)
    edits, _ = trainer.train_examples.batch(trainer._indices(0, 2, stream=1))
    captured = capture_gradients(handle, trainer.module_names, batch_tokens(handle, edits))
    for index, name in enumerate(trainer.module_names):
        second_moment = statistics[name].double()
        identity = torch.eye(len(second_moment), dtype=torch.float64)
        scaled = second_moment * (len(second_moment) / second_moment.trace()) + 1e-3 * identity
        precision = network.key_precision(name)
        expected = torch.linalg.inv(scaled)
        torch.testing.assert_close(
            precision.double(), expected, rtol=0, atol=1e-5 * expected.abs().max()
        )
        # The initial ridge is relative to the keys' own scale under P: mean kᵀPk.
        keys = captured[name].keys
        ridge = network.log_ridge[index].exp().item()
        assert math.isclose(ridge, 0.1 * (keys @ precision * keys).sum(1).mean(), rel_tol=1e-5)
        with torch.no_grad():
            pseudo_keys, pseudo_grads = network.pseudo(name, captured[name])
            values = value_differences(keys, pseudo_keys, pseudo_grads, network.log_lr[index])
            plain = least_squares_update(keys, values, network.log_ridge[index])
            assert not torch.allclose(network.delta(name, captured[name]), plain), name

    trainer.save()
    loaded, meta = load_network(out)
    assert meta["key_ridge"] is True and loaded.key_ridge
    assert_states_equal(loaded.state_dict(), network.state_dict())
    applied = make_editor("rledit", handle, checkpoint=out).apply(make_requests(2))
    applied.undo()
    in_memory = RLEdit.from_network(handle, network).apply(make_requests(2))
    for name in trainer.module_names:
        assert torch.equal(in_memory.deltas[name], applied.deltas[name]), name
    in_memory.undo()
    assert_weights_equal(handle, before)
    with pytest.raises(ValueError, match="key_ridge"):
        make_trainer(handle, MEND, tmp_path / "mend", key_ridge=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_null_space_projection_leaves_ordinary_keys_alone_in_training_and_editing(
    arch, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    handle = fresh(arch, tokenizer)
    out = tmp_path / "ckpt"
    settings = {"key_ridge": True, "key_samples": 600, "warmup_batches": 1, "steps": 2}
    trainer = make_trainer(handle, RLEdit, out, null_space_threshold=0.05, **settings)
    initial = network_state(trainer.network)
    trainer.train()
    assert any(not torch.equal(v, initial[k]) for k, v in network_state(trainer.network).items())
    assert read_meta(out)["null_space_threshold"] == 0.05
    statistics = key_covariances(handle, trainer.module_names, samples=600)

    projected = make_editor("rledit", handle, checkpoint=out).apply(make_requests(2))
    projected.undo()
    unprojected = make_editor("rledit", handle, checkpoint=out, null_space_threshold=0.0)
    plain = unprojected.apply(make_requests(2))
    for name in trainer.module_names:
        expected = null_space_projection(statistics[name], 0.05)
        assert 0 < torch.linalg.matrix_rank(expected) < len(expected)
        torch.testing.assert_close(trainer.network.null_space(name), expected, atol=1e-4, rtol=0)
        # Keys of ordinary text (outside P's range) keep their outputs; the
        # update is the unprojected one times P.
        delta, unprojected_delta = projected.deltas[name], plain.deltas[name]
        outside = torch.eye(len(expected)) - expected
        assert (delta @ outside).abs().max() < 1e-4 * delta.abs().max(), name
        projector = trainer.network.null_space(name)
        torch.testing.assert_close(delta, unprojected_delta @ projector)
        assert not torch.allclose(delta, unprojected_delta)

    with pytest.raises(ValueError, match="null_space_threshold must be in"):
        make_editor("rledit", handle, checkpoint=out, null_space_threshold=1.5)
    with pytest.raises(ValueError, match="key statistics of key_ridge"):
        make_trainer(handle, MALMEN, tmp_path / "malmen", null_space_threshold=0.05)


# --- 8. resuming ---------------------------------------------------------------------------


def test_resume_continues_exactly_as_an_uninterrupted_run(tokenizer, tmp_path):
    handle = fresh("gpt2", tokenizer)
    before = snapshot(handle)
    settings = {
        "trajectory_length": 2,
        "backtrack_depth": 2,
        "step_every": 1,
        "checkpoint_every": 2,
        "l2_weight": 1e-3,
    }
    straight = make_trainer(handle, RLEdit, tmp_path / "straight", steps=8, **settings)
    straight.train()

    first = make_trainer(handle, RLEdit, tmp_path / "split", steps=4, **settings)
    first.train()
    assert first.steps_done == 4 and first.trajectories_done == 2
    second = make_trainer(handle, RLEdit, tmp_path / "split", steps=8, **settings)
    second.resume()
    assert second.steps_done == 4
    second.train()

    assert second.steps_done == straight.steps_done == 8
    assert second.trajectories_done == straight.trajectories_done == 4
    assert_states_equal(network_state(second.network), network_state(straight.network))
    assert second.losses == straight.losses
    assert_states_equal(
        load_network(tmp_path / "split")[0].state_dict(), straight.network.state_dict()
    )
    assert_weights_equal(handle, before)

    for overrides, message in [
        ({"rank": 8}, "settings differ from the checkpoint's: rank"),
        ({"decay": 0.5}, "settings differ from the checkpoint's: decay"),
    ]:
        other = make_trainer(handle, RLEdit, tmp_path / "split", **{**settings, **overrides})
        with pytest.raises(CheckpointError, match=message):
            other.resume()
    other = make_trainer(handle, MALMEN, tmp_path / "split", **settings)
    with pytest.raises(CheckpointError, match="trained with method 'rledit'"):
        other.resume()
    other = make_trainer(handle, RLEdit, tmp_path / "split", **settings)
    other.data_info = {"sha256": "1" * 64}
    with pytest.raises(CheckpointError, match="other data"):
        other.resume()


def test_trainer_refuses_too_few_requests_or_missing_locality(tiny, tmp_path):
    with pytest.raises(ValueError, match="too few"):
        make_trainer(tiny, MALMEN, tmp_path, requests=make_requests(3))
    requests = [*make_requests(8), EditRequest("The largest planet is", "Au", id="bare")]
    with pytest.raises(ValueError, match=r"request 8 \(bare\) has none"):
        make_trainer(tiny, MALMEN, tmp_path, requests=requests)


def test_a_network_scored_on_another_style_of_data_is_warned_about(
    trained, tokenizer, tmp_path, caplog
):
    arch, _, out = trained
    copy = tmp_path / "counterfact-trained"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "checkpoint.json").read_text())
    meta["data"]["style"] = "counterfact"
    (copy / "checkpoint.json").write_text(json.dumps(meta))
    requests = [dataclasses.replace(r, target_true="Paris") for r in make_requests(2)]
    for style, warned in (("counterfact", False), ("qa", True)):
        caplog.clear()
        editor = make_editor("malmen", fresh(arch, tokenizer), checkpoint=str(copy))
        assert editor.trained_style == "counterfact"
        with caplog.at_level("WARNING", logger="lledit.eval.lifelong"):
            run_lifelong(editor.handle, editor, requests, 2, style=style, scoring="teacher")
        assert ("trained on counterfact data and edits qa data" in caplog.text) == warned


def test_validation_scores_in_the_style_of_the_training_data(tokenizer, tmp_path):
    handle = fresh("llama", tokenizer)
    requests = [dataclasses.replace(r, target_true="Paris") for r in make_requests()]
    metrics = {}
    for style in ("qa", "counterfact"):
        trainer = make_trainer(handle, MALMEN, tmp_path / style, requests=requests, steps=1)
        trainer.data_info["style"] = style
        trainer.train()
        metrics[style] = trainer.validate()["metrics"]
    assert "efficacy_exact" in metrics["qa"] and "efficacy_exact" not in metrics["counterfact"]


# --- 9. bad checkpoints ----------------------------------------------------------------------


def test_bad_checkpoints_are_refused_clearly(trained, tokenizer, tmp_path):
    arch, _, out = trained
    other_arch = "gpt2" if arch == "llama" else "llama"
    handle = fresh(arch, tokenizer)

    with pytest.raises(CheckpointError, match=r"no checkpoint in .*lledit train"):
        make_editor("malmen", handle, checkpoint=str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="trained for 'malmen', not 'rledit'"):
        make_editor("rledit", handle, checkpoint=str(out))
    with pytest.raises(CheckpointError, match=f"trained on model 'tiny-{arch}', not 'other'"):
        make_editor("malmen", fresh(arch, tokenizer, name="other"), checkpoint=str(out))
    wrong_model = fresh(other_arch, tokenizer, name=f"tiny-{arch}")
    with pytest.raises(CheckpointError, match="in this model it is missing"):
        make_editor("malmen", wrong_model, checkpoint=str(out))

    def damaged(edit) -> str:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, copy)
        edit(copy)
        return str(copy)

    def edit_meta(change):
        def edit(folder):
            meta = json.loads((folder / "checkpoint.json").read_text())
            change(meta)
            (folder / "checkpoint.json").write_text(json.dumps(meta))

        return edit

    garbage = damaged(lambda folder: (folder / "checkpoint.json").write_text("{not json"))
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        make_editor("malmen", handle, checkpoint=garbage)
    newer = damaged(edit_meta(lambda meta: meta.update(format=99)))
    with pytest.raises(CheckpointError, match="has format 99; this lledit reads format 1"):
        make_editor("malmen", handle, checkpoint=newer)
    no_rank = damaged(edit_meta(lambda meta: meta.pop("rank")))
    with pytest.raises(CheckpointError, match="lacks the field 'rank'"):
        make_editor("malmen", handle, checkpoint=no_rank)
    shape = damaged(edit_meta(lambda meta: meta["modules"][0].update(d_in=3)))
    with pytest.raises(CheckpointError, match=r"of shape \(\d+, 3\); in this model it has shape"):
        make_editor("malmen", handle, checkpoint=shape)
    before = snapshot(handle)
    for damage, message in [
        (lambda folder: (folder / "network.safetensors").unlink(), "cannot read"),
        (lambda folder: (folder / "network.safetensors").write_bytes(b"\0" * 64), "cannot read"),
        (edit_meta(lambda meta: meta.update(rank=8)), "does not match checkpoint.json"),
    ]:
        editor = make_editor("malmen", handle, checkpoint=damaged(damage))  # reads only the JSON
        with pytest.raises(CheckpointError, match=message):
            editor.apply(make_requests(1))
    assert_weights_equal(handle, before)


def test_earlier_keys_weight_is_refused_without_a_ridge_or_below_zero(tiny):
    with pytest.raises(ValueError, match="the mend update has none"):
        make_editor("mend", tiny, checkpoint="unread", earlier_keys_weight=0.1)
    with pytest.raises(ValueError, match="earlier_keys_weight must be >= 0, got -1"):
        make_editor("rledit", tiny, checkpoint="unread", earlier_keys_weight=-1.0)


@pytest.mark.parametrize("method", ["mend", "malmen", "rledit"])
def test_editors_without_a_checkpoint_say_how_to_train_one(tiny, method):
    with pytest.raises(ValueError, match=f"`lledit train --method {method} --out DIR`"):
        make_editor(method, tiny)


# --- 10. command line ------------------------------------------------------------------------


def test_cli_refuses_untrained_methods_and_ambiguous_checkpoints(tmp_path):
    result = runner.invoke(app, ["train", "--method", "ft", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "method 'ft' is not trained; methods that are: mend, malmen, rledit" in result.output
    result = runner.invoke(
        app, ["train", "--method", "rledit", "--out", str(tmp_path), "--set", "rank=0"]
    )
    assert result.exit_code == 2 and "rank must be at least 1" in result.output
    result = runner.invoke(
        app, ["train", "--method", "mend", "--out", str(tmp_path), "--set", "checkpoint=x"]
    )
    assert result.exit_code == 2 and "method 'mend' has no setting 'checkpoint'" in result.output
    (tmp_path / "checkpoint.json").write_text("{}")
    result = runner.invoke(app, ["train", "--method", "mend", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "already holds a checkpoint; pass --resume" in result.output
    for methods in (["mend", "malmen"], ["ft"]):
        arguments = [part for m in methods for part in ("--method", m)]
        result = runner.invoke(
            app, ["bench", *arguments, "--checkpoint", str(tmp_path), "--out", str(tmp_path)]
        )
        assert result.exit_code == 2
        assert "--checkpoint needs exactly one trained method" in result.output


def test_cli_trains_resumes_and_benches_a_tiny_model(tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    model = make_tiny_model("llama", len(tokenizer))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "malmen"
    common = ["--model", str(model_dir), "--data", "builtin", "--limit", "8", "--out", str(out)]
    settings = ["layers=3", "rank=4", "n_blocks=1", "validation_edits=2", "warmup_batches=1"]
    sets = [part for s in settings for part in ("--set", s)]
    train = ["train", "--method", "malmen", *common, *sets, "--batch-size", "2"]
    result = runner.invoke(app, [*train, "--steps", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "validation on 2 held-out edits" in result.output and "(2 steps" in result.output
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["model"] == str(model_dir) and meta["data"]["name"] == "builtin/train"
    assert (out / "validation.json").exists()

    result = runner.invoke(app, [*train, "--steps", "3", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "checkpoint.json").read_text())["steps_done"] == 3

    bench = ["bench", "--method", "none", "--method", "malmen", "--model", str(model_dir)]
    bench += ["--edits", "4", "--batch-size", "2", "--out", str(tmp_path / "bench")]
    result = runner.invoke(app, [*bench, "--checkpoint", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "bench" / "malmen" / "results.json").read_text())
    assert saved["method_config"]["checkpoint"] == str(out) and saved["n_edits"] == 4
    result = runner.invoke(
        app, ["bench", "--method", "rledit", "--model", str(model_dir), "--edits", "2",
              "--checkpoint", str(out), "--out", str(tmp_path / "b2")],
    )  # fmt: skip
    assert result.exit_code == 2 and "trained for 'malmen', not 'rledit'" in result.output


def test_two_processes_train_the_network_one_process_trains_and_resume_across_them(
    tokenizer, tmp_path, monkeypatch
):
    """`--nproc 2` (two gloo processes, one trajectory each) trains the network that
    one process trains with the same global batch of two trajectories, and a run
    begun on two processes resumes on one as if it had never stopped."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # seen by the workers too
    model_dir = tmp_path / "model"
    make_tiny_model("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    settings = [
        "layers=3", "rank=4", "n_blocks=1", "validation_edits=2", "warmup_batches=1",
        "trajectory_length=2", "step_every=1", "trajectories_per_step=2", "checkpoint_every=2",
    ]  # fmt: skip
    common = ["train", "--method", "rledit", "--model", str(model_dir), "--data", "builtin"]
    common += ["--limit", "10", "--batch-size", "2"]
    common += [part for setting in settings for part in ("--set", setting)]

    def train(out, *extra):
        result = runner.invoke(app, [*common, "--out", str(out), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return load_network(out)[0].state_dict(), json.loads((out / "checkpoint.json").read_text())

    alone, alone_meta = train(tmp_path / "one", "--steps", "4")
    together, together_meta = train(tmp_path / "two", "--steps", "4", "--nproc", "2")
    assert together_meta["steps_done"] == alone_meta["steps_done"] == 4
    assert together_meta["trajectories_done"] == alone_meta["trajectories_done"] == 4
    assert alone.keys() == together.keys()
    assert any(name.endswith(".up") and value.abs().max() > 0 for name, value in alone.items())
    for name, value in alone.items():
        torch.testing.assert_close(together[name], value, rtol=1e-5, atol=1e-7, msg=name)
    for first, second in zip(alone_meta["losses"], together_meta["losses"], strict=True):
        assert first.keys() == second.keys()
        for key in first:
            assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-7), key

    train(tmp_path / "resumed", "--steps", "2", "--nproc", "2")
    resumed, resumed_meta = train(tmp_path / "resumed", "--steps", "4", "--resume")
    assert resumed_meta["steps_done"] == 4
    for name, value in alone.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-7, msg=name)

    result = runner.invoke(app, [*common, "--out", str(tmp_path / "x"), "--nproc", "3"])
    assert (
        result.exit_code == 2 and "--nproc 3 must divide trajectories_per_step (2)" in result.output
    )
