"""Key statistics: the second moment of module inputs, computed, cached and reused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lledit.stats import key_covariances, read_corpus


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Key statistics go to a fresh cache directory, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_key_statistics_are_cached_and_reused(tiny, monkeypatch, tmp_path):
    modules = [tiny.layer_module(layer, tiny.arch.mlp_out) for layer in (1, 2)]
    first = key_covariances(tiny, modules, samples=300, max_length=32, batch_size=4)
    files = sorted((tmp_path / "cache" / "lledit" / "stats").rglob("*.safetensors"))
    assert len(files) == 2
    settings = json.loads(files[0].with_suffix(".json").read_text())
    assert settings["key"]["model"] == tiny.name and settings["count"] == 300
    mtimes = [f.stat().st_mtime_ns for f in files]

    def recompute(*args, **kwargs):
        raise AssertionError("cached statistics were recomputed")

    monkeypatch.setattr("lledit.stats._collect_from_samples", recompute)
    second = key_covariances(tiny, modules, samples=300, max_length=32, batch_size=4)
    for module in modules:
        assert first[module].dtype == torch.float32
        assert torch.equal(first[module], second[module])
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    # Another sample count is another cache entry.
    with pytest.raises(AssertionError, match="recomputed"):
        key_covariances(tiny, modules, samples=301, max_length=32, batch_size=4)


def test_cached_statistics_of_another_width_are_computed_again(tiny, tmp_path, caplog):
    # Another model cached under the same name, with narrower MLPs.
    module = tiny.layer_module(1, tiny.arch.mlp_out)
    width = tiny.weight_of(module).shape[1]
    first = key_covariances(tiny, [module], samples=300, max_length=32, batch_size=4)[module]
    (path,) = (tmp_path / "cache" / "lledit" / "stats").rglob("*.safetensors")
    save_file({"covariance": torch.eye(width - 8)}, str(path))
    with caplog.at_level("WARNING", logger="lledit.stats"):
        again = key_covariances(tiny, [module], samples=300, max_length=32, batch_size=4)[module]
    assert f"ignoring statistics {path}" in caplog.text
    assert f"takes {width}-wide keys" in caplog.text
    assert torch.equal(again, first)
    assert torch.equal(load_file(path)["covariance"], first)


def test_too_few_keys_for_their_width_are_warned_about(tiny, caplog):
    module = tiny.layer_module(1, tiny.arch.mlp_out)
    width = tiny.weight_of(module).shape[1]
    with caplog.at_level("WARNING", logger="lledit.stats"):
        key_covariances(tiny, [module], samples=width, max_length=32, batch_size=4)
    assert f"over {width} keys for {width}-wide keys are poorly estimated" in caplog.text
    assert f"ask for at least {4 * width}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lledit.stats"):
        key_covariances(tiny, [module], samples=4 * width, max_length=32, batch_size=4)
    assert "poorly estimated" not in caplog.text


def test_key_statistics_from_a_corpus_file(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of France is Paris.\nHarry Potter was written by Rowling.\n")
    assert read_corpus(corpus) == [
        "The capital of France is Paris.",
        "Harry Potter was written by Rowling.",
    ]
    corpus.write_text("The capital of France is Paris.\nIt is big.\n\n\nRome is old.\n")
    documents = read_corpus(corpus)
    assert documents == ["The capital of France is Paris.\nIt is big.", "Rome is old."]
    module = tiny.layer_module(1, tiny.arch.mlp_out)
    # The second moment, computed directly, one document at a time.
    keys = []
    hook = tiny.module(module).register_forward_pre_hook(lambda m, i: keys.append(i[0][0]))
    with torch.no_grad():
        for document in documents:
            tiny.model(**tiny.tokenizer(document, return_tensors="pt"))
    hook.remove()
    keys = torch.cat(keys)
    expected = keys.T @ keys / len(keys)
    stats = key_covariances(tiny, [module], samples=len(keys), corpus=str(corpus), batch_size=2)
    torch.testing.assert_close(stats[module], expected, rtol=1e-4, atol=1e-6)
    corpus.write_text("Another text entirely.\n")
    changed = key_covariances(tiny, [module], samples=len(keys), corpus=str(corpus))
    assert not torch.equal(changed[module], stats[module])
    corpus.write_text("\n \n")
    with pytest.raises(ValueError, match="no text"):
        key_covariances(tiny, [module], samples=10, corpus=str(corpus))
