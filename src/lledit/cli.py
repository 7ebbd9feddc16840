"""The `lledit` command. It parses arguments and calls the public API, nothing more."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from lledit.data import DataFileError, InvalidEditError, UnknownDatasetError, list_datasets
from lledit.data import load_dataset as load_edit_dataset
from lledit.eval import console_table, markdown_table, plot_curves, run_lifelong
from lledit.methods import METHODS, UnknownMethodError, config_fields, make_editor, parse_settings
from lledit.model import ModelLoadError, load_model

app = typer.Typer(help="Lifelong knowledge editing of language models.", no_args_is_help=True)
data_app = typer.Typer(help="Benchmark data: what is available.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# Tables are wider than the 80 columns rich assumes when output goes to a file or pipe.
console = Console(width=None if sys.stdout.isatty() else 120)

USER_ERRORS = (
    DataFileError,
    InvalidEditError,
    UnknownDatasetError,
    UnknownMethodError,
    ModelLoadError,
    FileNotFoundError,
    ValueError,
)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {error}")
    return typer.Exit(code=2)


def _settings_per_method(methods: list[str], settings: list[str]) -> dict[str, dict[str, Any]]:
    """Split `--set` values among methods: `ft.lr=1e-3` for one, `lr=1e-3` for all that have it."""
    chosen: dict[str, list[str]] = {method: [] for method in methods}
    for setting in settings:
        key = setting.partition("=")[0]
        prefix, dot, _ = key.partition(".")
        if dot:
            if prefix not in chosen:
                raise ValueError(f"--set {setting}: method '{prefix}' is not being run")
            chosen[prefix].append(setting.removeprefix(f"{prefix}."))
            continue
        owners = [m for m in methods if key in {name for name, _, _ in config_fields(m)}]
        if not owners:
            raise ValueError(f"--set {setting}: no method among {methods} has a setting '{key}'")
        for owner in owners:
            chosen[owner].append(setting)
    return {method: parse_settings(method, values) for method, values in chosen.items()}


@app.command()
def bench(
    method: Annotated[
        list[str], typer.Option("--method", "-m", help="Method to run; repeat to compare several.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for results.json, results.md, curve.png.")],
    data: Annotated[str, typer.Option(help="Dataset name (see `lledit data list`) or file.")] = (
        "builtin"
    ),
    split: Annotated[str, typer.Option(help="Split of a named dataset.")] = "eval",
    edits: Annotated[int, typer.Option(help="Number of edits N.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Edits per batch B.")] = 10,
    offset: Annotated[int, typer.Option(help="Skip this many records first.")] = 0,
    shuffle: Annotated[
        int | None, typer.Option(help="Shuffle the records with this seed first.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Hugging Face id or local folder; default SmolLM2-135M.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    eval_every: Annotated[
        int | None, typer.Option(help="Also evaluate all edits so far every K batches.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the run.")] = 0,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Method setting KEY=VALUE (or METHOD.KEY=VALUE); repeatable."),
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="Skip malformed records (and count them) instead of failing.")
    ] = False,
    eval_batch_size: Annotated[int, typer.Option(help="Prompts per evaluation forward.")] = 64,
    allow_download: Annotated[
        bool, typer.Option(help="Let --model fetch weights from the Hugging Face Hub.")
    ] = False,
) -> None:
    """Run the lifelong protocol: N edits in batches of B, evaluated on the final model."""
    try:
        if edits < 1:
            raise ValueError(f"--edits must be at least 1, got {edits}")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        methods = list(dict.fromkeys(method))
        for name in methods:
            if name not in METHODS:
                raise UnknownMethodError(
                    f"unknown method '{name}'; available: {', '.join(METHODS)}"
                )
        per_method = _settings_per_method(methods, settings or [])
        dataset = load_edit_dataset(
            data, split, limit=edits, offset=offset, seed=shuffle, skip_invalid=skip_invalid
        )
        if dataset.n_skipped:
            console.print(f"[yellow]skipped {dataset.n_skipped} invalid records[/]")
        if len(dataset.requests) < edits:
            console.print(
                f"[yellow]{dataset.name} has {len(dataset.requests)} usable records; "
                f"running {len(dataset.requests)} edits, not {edits}[/]"
            )
        results = []
        for name in methods:
            handle = load_model(model, device=device, dtype=dtype, allow_download=allow_download)
            editor = make_editor(name, handle, **per_method[name])
            results.append(
                run_lifelong(
                    handle,
                    editor,
                    dataset.requests,
                    batch_size,
                    eval_every=eval_every,
                    style=dataset.style,
                    dataset=dataset.to_dict(),
                    seed=seed,
                    eval_batch_size=eval_batch_size,
                )
            )
            del handle, editor
    except USER_ERRORS as error:
        raise _fail(error) from error

    out.mkdir(parents=True, exist_ok=True)
    if len(results) == 1:
        results[0].save(out / "results.json")
    else:
        for result in results:
            (out / result.method).mkdir(exist_ok=True)
            result.save(out / result.method / "results.json")
    (out / "results.md").write_text(markdown_table(results))
    curve = plot_curves(results, out / "curve.png")
    console.print(console_table(results))
    console.print(f"results in {out}/" + (f" (curve: {curve.name})" if curve else ""))


@app.command("methods")
def list_methods() -> None:
    """The editing methods and their settings (change them with `bench --set KEY=VALUE`)."""
    table = Table(title="editing methods")
    table.add_column("method")
    table.add_column("what it is")
    table.add_column("settings (default)")
    for name, method in METHODS.items():
        fields = ", ".join(f"{field}={default}" for field, _, default in config_fields(name))
        table.add_row(name, method.description, fields or "-")
    console.print(table)


@data_app.command("list")
def data_list() -> None:
    """The named datasets, where their files are, and whether they are intact."""
    table = Table(title="datasets")
    for column in ("name", "split", "records", "sha256", "path"):
        table.add_column(column)
    for info in list_datasets():
        if not info.present:
            status, records = "[red]missing[/]", "-"
        else:
            status = {True: "[green]ok[/]", False: "[red]MISMATCH[/]", None: "n/a"}[info.sha256_ok]
            records = str(info.records)
        table.add_row(info.name, info.split, records, status, str(info.path))
    console.print(table)
