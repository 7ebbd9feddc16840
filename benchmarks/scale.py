"""Peak memory and edit time of every method at Llama-3-8B's layer shapes, on few layers.

Builds a randomly initialised Llama with Llama-3-8B's shapes (hidden 4096,
MLP 14336, 32 heads with 8 KV heads, vocabulary 128256) but only `--layers`
decoder layers, and applies `--batches` batches of 10 zsRE edits with each
method, each method in a process of its own and time-boxed (`--budget-s`).
Reports per method: the peak memory (resident set on the CPU,
`max_memory_allocated` on CUDA), what the method added to it beside what its
`memory_share()` counts (the figure the fit check of `load_model` uses), the
median seconds per edit against one
forward and backward pass of the same model on the same batch, and the peak
extrapolated to the full 32 layers:

    peak(32) ≈ base(L) + (32 - L) · one layer's weights
               + (peak(L) - base(L)) · edited layers at 32 / edited layers at L

where base(L) is the process's peak memory once the model is built, before
the method exists (the timed forward and backward pass runs after the peak
is read, so it is in neither figure): what a method adds is
taken to grow with the number of layers it edits, which its default band
sets (at 32 layers as on the full model). The hypernetwork methods edit with
an untrained network of their default size, which costs what a trained one
does. Settings that only change how long statistics take to gather
(`stats_samples`) are lowered; they do not change any tensor's size.

Run: `python benchmarks/scale.py [--methods ft,memit] [--layers 8] [--device cuda]
[--dtype bfloat16] [--batches 3] [--budget-s 900]`; `--tiny` checks the script
on small shapes in seconds; `--only-report` prints the table of the methods
already run; `--counted` prints only what each method's `memory_share()`
counts on all 32 layers, built on the meta device (instant).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 224,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "rope_theta": 10000.0,
}
FULL_LAYERS = 32
QUICK = {
    "memit": {"stats_samples": 2000},
    "alphaedit": {"stats_samples": 2000},
}
"""Fewer keys for the statistics: the same tensors, gathered sooner."""
BATCH = 10


def build(shapes: dict, layers: int, device: str, dtype: str):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lledit.model import ModelHandle, default_model_folder, resolve_dtype

    config = LlamaConfig(**shapes, num_hidden_layers=layers, max_position_embeddings=2048)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(resolve_dtype(dtype))  # built in its dtype, never twice over
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    tokenizer = AutoTokenizer.from_pretrained(default_model_folder(), local_files_only=True)
    # Named by its shapes: cached key statistics are found by name.
    name = f"random-llama-{shapes['hidden_size']}x{shapes['intermediate_size']}-{layers}-layers"
    return ModelHandle(model, tokenizer, name)


def print_counted(methods: list[str], dtype: str) -> None:
    """Each method's counted share on a 32-layer skeleton (meta device) of the
    chosen shapes, beside the weights: the figures `load_model` checks."""
    from lledit.model import bytes_of

    handle = build(LLAMA3_8B, FULL_LAYERS, "meta", dtype)
    weights = bytes_of(handle.model.parameters())
    print(f"weights in {dtype}: {weights / 2**30:.1f} GiB")
    print("| method | edited modules | counted share GiB |\n|---|---|---|")
    for method in methods:
        editor = editor_for(method, handle)
        modules = len(editor.config_dict().get("modules", []))
        print(f"| {method} | {modules} | {editor.memory_share() / 2**30:.1f} |")


def editor_for(method: str, handle):
    from lledit.hypernet.config import untrained_network
    from lledit.methods import METHODS, is_trained, make_editor, train_config_class

    settings = QUICK.get(method, {})
    editor_class = METHODS[method]
    if is_trained(method):
        network = untrained_network(handle, train_config_class(method)(), editor_class.update_rule)
        return editor_class.from_network(handle, network)
    return make_editor(method, handle, **settings)


def forward_backward_seconds(handle, requests) -> float:
    """One forward and backward pass over a batch's prompts and targets, the
    gradient taken down to the input embeddings (no weight gradients, whose
    memory would swamp what the methods add)."""
    from lledit.model import edit_batch

    tokens = edit_batch(handle, [r.prompt for r in requests], [r.target_new for r in requests])
    embeddings = handle.model.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_())
    started = time.perf_counter()
    try:
        with torch.enable_grad():
            handle.target_logits(tokens).logsumexp(-1).sum().backward()
    finally:
        hook.remove()
    return time.perf_counter() - started


def run_one(method: str, arguments) -> dict:
    from lledit import load_dataset
    from lledit.eval.lifelong import peak_memory_mb
    from lledit.layers import default_layers
    from lledit.model import bytes_of

    shapes = TINY if arguments.tiny else LLAMA3_8B
    handle = build(shapes, arguments.layers, arguments.device, arguments.dtype)
    device = handle.device
    requests = load_dataset("zsre", "eval").requests[: BATCH * arguments.batches]
    base = peak_memory_mb(device)
    editor = editor_for(method, handle)
    counted = editor.memory_share() / 2**20
    editor.prepare()
    per_edit = []
    budget_started = time.perf_counter()
    for start in range(0, len(requests), BATCH):
        batch_started = time.perf_counter()
        editor.apply(requests[start : start + BATCH])
        per_edit.append((time.perf_counter() - batch_started) / BATCH)
        if time.perf_counter() - budget_started > arguments.budget_s:
            break
    peak = peak_memory_mb(device)
    forward_backward_s = forward_backward_seconds(handle, requests[:BATCH])
    modules = editor.config_dict().get("modules", [])
    edited = len({handle.layer_of(name) for name in modules})
    layer_bytes = bytes_of(handle.module(handle.decoder_layer(0)).parameters())
    band_at_full = edited
    if edited > 1:  # a band of layers, as wide at 32 layers as its default there
        lowest = min(handle.layer_of(name) for name in modules)
        band = "upper" if lowest >= default_layers(arguments.layers, "upper")[0] else "lower"
        band_at_full = len(default_layers(FULL_LAYERS, band))
    added = peak - base
    full = base + (FULL_LAYERS - arguments.layers) * layer_bytes / 2**20
    full += added * (band_at_full / edited if edited else 1.0)
    return {
        "method": method,
        "device": str(device),
        "dtype": arguments.dtype,
        "layers": arguments.layers,
        "batches": len(per_edit),
        "edited_layers": edited,
        "edited_layers_at_32": band_at_full,
        "forward_backward_s": forward_backward_s,
        "per_edit_s": statistics.median(per_edit),
        "base_mib": base,
        "peak_mib": peak,
        "counted_mib": counted,
        "full_32_layers_mib": full,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help="Comma-separated; default every one.")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=900.0)
    parser.add_argument("--tiny", action="store_true", help="Small shapes: check the script.")
    parser.add_argument("--counted", action="store_true", help="Only the counted shares.")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--only-report", action="store_true", help="Table only.")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    arguments.out.mkdir(parents=True, exist_ok=True)
    if arguments.one:
        result = run_one(arguments.one, arguments)
        (arguments.out / f"{arguments.one}.json").write_text(json.dumps(result, indent=1) + "\n")
        return
    from lledit.methods import METHODS

    if arguments.methods:
        methods = [m.strip() for m in arguments.methods.split(",") if m.strip()]
    else:
        methods = [m for m in METHODS if m != "none"]
    if arguments.counted:
        print_counted(methods, arguments.dtype)
        return
    passed = [f"--layers={arguments.layers}", f"--device={arguments.device}",
              f"--dtype={arguments.dtype}", f"--batches={arguments.batches}",
              f"--budget-s={arguments.budget_s}", f"--out={arguments.out}"]  # fmt: skip
    passed += ["--tiny"] if arguments.tiny else []
    if not arguments.only_report:
        for method in methods:
            command = [sys.executable, __file__, *passed, "--one", method]
            finished = subprocess.run(command, env=os.environ, check=False)
            if finished.returncode:
                print(f"{method}: failed (exit {finished.returncode})")
    header = ["method", "edited layers (at 32)", "peak MiB", "added MiB (counted)", "s/edit",
              "s/edit ÷ fwd+bwd", "32-layer peak GiB"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method in methods:
        path = arguments.out / f"{method}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        ratio = r["per_edit_s"] / r["forward_backward_s"]
        print(
            f"| {r['method']} | {r['edited_layers']} ({r['edited_layers_at_32']}) | "
            f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['base_mib']:.0f} ({r['counted_mib']:.0f}) | "
            f"{r['per_edit_s']:.2f} | {ratio:.1f} | "
            f"{r['full_32_layers_mib'] / 1024:.1f} |"
        )


if __name__ == "__main__":
    main()
