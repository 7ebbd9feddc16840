"""The `lledit` command. It parses arguments and calls the public API, nothing more."""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from lledit import progress
from lledit.data import DataFileError, InvalidEditError, UnknownDatasetError, list_datasets
from lledit.data import load_dataset as load_edit_dataset
from lledit.data.request import EditRequest
from lledit.edit import NonFiniteUpdateError
from lledit.eval import console_table, markdown_table, plot_curves, run_lifelong
from lledit.eval.general import (
    TASKS,
    GeneralConfig,
    GeneralDataError,
    GeneralSuite,
    load_general,
    score_general,
)
from lledit.eval.lifelong import SCORINGS
from lledit.eval.report import (
    comparison_markdown,
    load_runs,
    plot_comparison,
    plot_retention_by_age,
)
from lledit.export import export_journal
from lledit.hypernet import CheckpointError, HypernetTrainConfig, distributed
from lledit.hypernet.training import HypernetTrainer
from lledit.journal import SNAPSHOT_EVERY, UNDONE, Journal, JournaledModel, JournalError
from lledit.methods import (
    METHODS,
    UnknownMethodError,
    config_fields,
    editor_share,
    make_editor,
    method_class,
    parse_settings,
    train_config_class,
)
from lledit.model import ModelLoadError, load_model
from lledit.server import serve as run_server

app = typer.Typer(help="Lifelong knowledge editing of language models.", no_args_is_help=True)
data_app = typer.Typer(help="Benchmark data: what is available.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# Tables are wider than the 80 columns rich assumes when output goes to a file or pipe.
console = Console(width=None if sys.stdout.isatty() else 120)
logger = logging.getLogger("lledit")

ModelOption = Annotated[
    str | None, typer.Option(help="Hugging Face id or local folder; default SmolLM2-135M.")
]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")]
DeviceMapOption = Annotated[
    str | None,
    typer.Option(
        help="Split a model too large for one device across the GPUs: 'auto' (accelerate's "
        "device map, also 'balanced', 'sequential'); replaces --device."
    ),
]
DtypeOption = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
SettingsOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Method setting KEY=VALUE (or METHOD.KEY=VALUE); repeatable."),
]
SkipInvalidOption = Annotated[
    bool, typer.Option(help="Skip malformed records (and count them) instead of failing.")
]
DownloadOption = Annotated[
    bool, typer.Option(help="Let --model fetch weights from the Hugging Face Hub.")
]
JournalOption = Annotated[Path, typer.Option("--journal", help="The journal database (J.db).")]
SnapshotOption = Annotated[
    int, typer.Option(help="Snapshot the edited weights every N batches (bounds replay time).")
]
GeneralItemsOption = Annotated[int, typer.Option(help="Scored items per general task.")]
GeneralShotsOption = Annotated[int, typer.Option(help="Worked examples before each general item.")]

USER_ERRORS = (
    DataFileError,
    InvalidEditError,
    UnknownDatasetError,
    UnknownMethodError,
    ModelLoadError,
    JournalError,
    NonFiniteUpdateError,
    CheckpointError,
    GeneralDataError,
    FileNotFoundError,
    ValueError,
)


class ProgressBars:
    """Draws the library's progress tasks as rich bars; a finished inner task's bar goes away."""

    def __init__(self, console: Console) -> None:
        self._bars = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._running: list[TaskID] = []

    def start(self, description: str, total: int | None, completed: int) -> TaskID:
        if not self._running:
            for old in self._bars.task_ids:
                self._bars.remove_task(old)
            self._bars.start()
        bar = self._bars.add_task(description, total=total, completed=completed, status="")
        self._running.append(bar)
        return bar

    def update(self, handle: object, completed: int, status: str) -> None:
        self._bars.update(handle, completed=completed, status=status)  # type: ignore[arg-type]

    def stop(self, handle: object) -> None:
        self._running.remove(handle)  # type: ignore[arg-type]
        if self._running:
            self._bars.remove_task(handle)  # type: ignore[arg-type]
        else:
            self._bars.stop()


@app.callback()
def main(
    context: typer.Context, verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    context.with_resource(progress.reporting(ProgressBars(console)))


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


def _general_suite(tasks: str, items: int, shots: int) -> GeneralSuite:
    """The general-ability items for a comma-separated task list ("all" for every task)."""
    names = list(TASKS) if tasks.strip() == "all" else [t.strip() for t in tasks.split(",")]
    return load_general(GeneralConfig(tasks=tuple(n for n in names if n), items=items, shots=shots))


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
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    device_map: DeviceMapOption = None,
    dtype: DtypeOption = "float32",
    eval_every: Annotated[
        int | None, typer.Option(help="Also evaluate all edits so far every K batches.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the run.")] = 0,
    settings: SettingsOption = None,
    skip_invalid: SkipInvalidOption = False,
    eval_batch_size: Annotated[int, typer.Option(help="Prompts per evaluation forward.")] = 64,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Trained network (from `lledit train`) for mend, malmen or rledit."),
    ] = None,
    allow_download: DownloadOption = False,
    stats_corpus: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Text for MEMIT/AlphaEdit key statistics (default: sampled from the model). "
            "Same as --set stats_corpus=FILE.",
        ),
    ] = None,
    stats_samples: Annotated[
        int | None,
        typer.Option(help="Keys those statistics average over. Same as --set stats_samples=N."),
    ] = None,
    scoring: Annotated[
        str,
        typer.Option(
            help="teacher (targets fed to the model), answer (the model's own greedy "
            "answers) or both."
        ),
    ] = "both",
    append_eos: Annotated[
        bool, typer.Option(help="Edit each target followed by EOS, so the model learns to stop.")
    ] = False,
    chat_template: Annotated[
        bool, typer.Option(help="Ask every prompt through the model's chat template.")
    ] = False,
    general: Annotated[
        str | None,
        typer.Option(
            help=f"General tasks scored before and after editing: comma-separated among "
            f"{', '.join(TASKS)}, or 'all'."
        ),
    ] = None,
    general_items: GeneralItemsOption = GeneralConfig.items,
    general_shots: GeneralShotsOption = GeneralConfig.shots,
) -> None:
    """Run the lifelong protocol: N edits in batches of B, evaluated on the final model."""
    try:
        if scoring not in SCORINGS:
            raise ValueError(f"--scoring must be one of {', '.join(SCORINGS)}, not {scoring!r}")
        if edits < 1:
            raise ValueError(f"--edits must be at least 1, got {edits}")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        methods = list(dict.fromkeys(method))
        for name in methods:
            method_class(name)
        settings = list(settings or [])
        if checkpoint is not None:
            trained = [m for m in methods if "checkpoint" in {f for f, _, _ in config_fields(m)}]
            if len(trained) != 1:
                raise ValueError(
                    f"--checkpoint needs exactly one trained method among {methods}; "
                    "with several, give each its own: --set rledit.checkpoint=DIR"
                )
            settings.append(f"{trained[0]}.checkpoint={checkpoint}")
        if stats_corpus is not None:
            settings.append(f"stats_corpus={stats_corpus}")
        if stats_samples is not None:
            settings.append(f"stats_samples={stats_samples}")
        per_method = _settings_per_method(methods, settings)
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
        suite = None if general is None else _general_suite(general, general_items, general_shots)
        results: list = []
        for name in methods:
            handle = load_model(
                model,
                device=device,
                dtype=dtype,
                allow_download=allow_download,
                device_map=device_map,
                editor_share=editor_share(name, **per_method[name]),
            )
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
                    scoring=scoring,
                    append_eos=append_eos,
                    chat_template=chat_template,
                    general=suite,
                    general_before=results[0].general.get("before") if results else None,
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


@app.command()
def train(
    method: Annotated[str, typer.Option("--method", "-m", help="mend, malmen or rledit.")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder (written, or read with --resume).")],
    data: Annotated[str, typer.Option(help="Training dataset name or file.")] = "zsre",
    split: Annotated[str, typer.Option(help="Split of a named dataset.")] = "train",
    trajectory_length: Annotated[
        int | None, typer.Option(help="T: batches edited in sequence per trajectory.")
    ] = None,
    backtrack_depth: Annotated[
        int | None, typer.Option(help="D: recent batches judged after each edit.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Edits per batch.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N records.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --out.")] = False,
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            help="Train on this many processes on this machine (torchrun); the global batch "
            "is --set trajectories_per_step=K, split evenly across them.",
        ),
    ] = 1,
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    device_map: DeviceMapOption = None,
    settings: SettingsOption = None,
    skip_invalid: SkipInvalidOption = False,
    allow_download: DownloadOption = False,
) -> None:
    """Train a hypernetwork editor; checkpoints and a validation report go to --out."""
    try:
        config_class = train_config_class(method)
        overrides = parse_settings(method, settings or [], config_class)
        flags = {
            "trajectory_length": trajectory_length,
            "backtrack_depth": backtrack_depth,
            "steps": steps,
            "batch_size": batch_size,
        }
        overrides.update({key: value for key, value in flags.items() if value is not None})
        config = config_class(**overrides)
        if (out / "checkpoint.json").exists() and not resume:
            raise ValueError(
                f"{out} already holds a checkpoint; pass --resume or choose another --out"
            )
        if nproc > 1 and distributed.launched_by_torchrun():
            raise ValueError("--nproc starts torchrun itself; under torchrun leave it out")
        if device_map is not None and (nproc > 1 or distributed.launched_by_torchrun()):
            raise ValueError(
                "--device-map splits one model over the GPUs; with several "
                "processes, each holds its own copy on its own device"
            )
        if config.trajectories_per_step % nproc:
            raise ValueError(
                f"--nproc {nproc} must divide trajectories_per_step "
                f"({config.trajectories_per_step}): each process runs an equal share"
            )
        dataset = load_edit_dataset(data, split, limit=limit, skip_invalid=skip_invalid)
        arguments = (method, config, dataset.requests, dataset.to_dict(), out)
        options = (model, device, device_map, allow_download, resume)
        if nproc > 1:
            outcome = distributed.launch(nproc, _train_process, *arguments, *options)[0]
        else:
            outcome = _train_process(*arguments, *options)
    except (*USER_ERRORS, ChildFailedError) as error:
        raise _fail(error) from error
    if outcome is None:
        return
    report = outcome["report"]
    if report:
        summary = ", ".join(f"{k} {v:.3f}" for k, v in report["metrics"].items())
        console.print(f"validation on {report['n_edits']} held-out edits: {summary}")
    console.print(
        f"checkpoint in {out}/ ({outcome['steps_done']} steps, {outcome['elapsed_s']:.0f} s)"
    )


def _train_process(
    method: str,
    config: HypernetTrainConfig,
    requests: list[EditRequest],
    data_info: dict[str, Any],
    out: Path,
    model: str | None,
    device: str,
    device_map: str | None,
    allow_download: bool,
    resume: bool,
) -> dict[str, Any] | None:
    """Train as this process's part of the run: alone, or one of torchrun's
    processes (the main one shows progress, validates and reports; the others
    return None)."""
    ranks, device = distributed.start(device)
    try:
        with progress.reporting(ProgressBars(console) if ranks.main else None):
            handle = load_model(
                model, device=device, allow_download=allow_download, device_map=device_map
            )
            trainer = HypernetTrainer(
                handle, method_class(method), config, requests, out, data_info
            )
            if resume:
                trainer.resume()
            trainer.train()
            if not ranks.main:
                return None
            report = trainer.validate()
        return {"report": report, "steps_done": trainer.steps_done, "elapsed_s": trainer.elapsed_s}
    finally:
        distributed.stop()


@app.command("general")
def general_command(
    tasks: Annotated[
        str, typer.Option(help=f"Comma-separated among {', '.join(TASKS)}, or 'all'.")
    ] = "all",
    model: ModelOption = None,
    journal: Annotated[
        Path | None, typer.Option(help="Score the model as this journal left it.")
    ] = None,
    device: DeviceOption = "cpu",
    device_map: DeviceMapOption = None,
    dtype: DtypeOption = "float32",
    items: GeneralItemsOption = GeneralConfig.items,
    shots: GeneralShotsOption = GeneralConfig.shots,
    out: Annotated[Path | None, typer.Option(help="Also write the scores to this JSON.")] = None,
    allow_download: DownloadOption = False,
) -> None:
    """Score general abilities (accuracy per task, perplexity) of a model or an edited one."""
    try:
        suite = _general_suite(tasks, items, shots)
        handle = load_model(
            model, device=device, dtype=dtype, allow_download=allow_download, device_map=device_map
        )
        if journal is not None:
            with _existing_journal(journal) as opened:
                JournaledModel(handle, opened)
        scores = score_general(handle, suite)
    except USER_ERRORS as error:
        raise _fail(error) from error
    table = Table(title=f"general abilities · {handle.name}" + (f" · {journal}" if journal else ""))
    for column in ("task", "accuracy", "chance", "correct option log-lik.", "items"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, task in scores["tasks"].items():
        chance = f"{task['chance']:.2f}" + ("" if task["above_chance"] else " (at chance)")
        table.add_row(
            name,
            f"{task['accuracy']:.3f}",
            chance,
            f"{task['correct_logprob']:.3f}",
            str(task["items"]),
        )
    console.print(table)
    if "perplexity" in scores:
        console.print(f"perplexity on {len(suite.sentences)} sentences: {scores['perplexity']:.2f}")
    if out is not None:
        out.write_text(json.dumps(scores, indent=2) + "\n")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (or results.json files).")],
    out: Annotated[Path, typer.Option(help="Folder for report.md and the plots.")],
) -> None:
    """Compare finished runs: one Markdown table per data set, general abilities, plots."""
    try:
        results = load_runs(runs)
    except USER_ERRORS as error:
        raise _fail(error) from error
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(comparison_markdown(results))
    written = [plot_comparison(results, out / "comparison.png")]
    written.append(plot_retention_by_age(results, out / "retention_by_age.png"))
    written.append(plot_curves(results, out / "curves.png"))
    console.print(console_table(results))
    names = ", ".join(path.name for path in written if path is not None)
    console.print(f"report of {len(results)} runs in {out}/ (report.md, {names})")


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


def _existing_journal(path: Path) -> Journal:
    if not path.is_file():
        raise FileNotFoundError(f"no journal at {path}")
    return Journal(path)


def _open_journaled(
    journal: Path,
    method: str,
    model: str | None,
    device: str,
    device_map: str | None,
    dtype: str,
    settings: list[str] | None,
    allow_download: bool,
    snapshot_every: int,
) -> JournaledModel:
    """The base model brought to the journal's state, with an editor for new batches."""
    overrides = parse_settings(method, settings or [])
    handle = load_model(
        model,
        device=device,
        dtype=dtype,
        allow_download=allow_download,
        device_map=device_map,
        editor_share=editor_share(method, **overrides),
    )
    editor = make_editor(method, handle, **overrides)
    opened = Journal(journal)
    try:
        return JournaledModel(handle, opened, editor, snapshot_every=snapshot_every)
    except BaseException:
        opened.close()
        raise


@app.command()
def edit(
    file: Annotated[Path, typer.Argument(help="Edit requests in any supported format.")],
    journal: JournalOption,
    method: Annotated[str, typer.Option("--method", "-m", help="Editing method.")],
    batch_size: Annotated[int, typer.Option(help="Edits per batch.")] = 10,
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    device_map: DeviceMapOption = None,
    dtype: DtypeOption = "float32",
    settings: SettingsOption = None,
    skip_invalid: SkipInvalidOption = False,
    allow_download: DownloadOption = False,
    snapshot_every: SnapshotOption = SNAPSHOT_EVERY,
) -> None:
    """Apply the edits in FILE batch by batch; each batch is journaled before the next."""
    try:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        requests = load_edit_dataset(str(file), skip_invalid=skip_invalid).requests
        edited = _open_journaled(
            journal,
            method,
            model,
            device,
            device_map,
            dtype,
            settings,
            allow_download,
            snapshot_every,
        )
        batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
        with edited.journal, progress.task(f"{method}: editing", total=len(batches)) as task:
            for batch in batches:
                record = edited.apply(batch)
                logger.info("batch %d applied (edits %s)", record.id, list(record.edit_ids))
                task.advance()
    except USER_ERRORS as error:
        raise _fail(error) from error
    console.print(f"{len(requests)} edits in {len(batches)} batches journaled in {journal}")


@app.command()
def history(journal: JournalOption) -> None:
    """Every batch in the journal: status, method, edits."""
    try:
        with _existing_journal(journal) as opened:
            batches = opened.batches()
    except USER_ERRORS as error:
        raise _fail(error) from error
    table = Table(title=str(journal))
    for column in ("batch", "status", "method", "edits", "written", "model"):
        table.add_column(column)
    colours = {"applied": "green", "undone": "yellow", "failed": "red"}
    for batch in batches:
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch.created_at))
        edit_ids = f"{batch.edit_ids[0]}-{batch.edit_ids[-1]}" if batch.edit_ids else "-"
        status = f"[{colours[batch.status]}]{batch.status}[/]"
        table.add_row(str(batch.id), status, batch.method, edit_ids, written, batch.model)
    console.print(table)


@app.command()
def undo(
    batch_id: Annotated[int, typer.Argument(help="The batch to undo (see `lledit history`).")],
    journal: JournalOption,
) -> None:
    """Undo one applied batch; the model is rebuilt without it whenever it is next loaded."""
    try:
        with _existing_journal(journal) as opened:
            record = opened.set_status(batch_id, UNDONE)
    except USER_ERRORS as error:
        raise _fail(error) from error
    console.print(f"batch {record.id} undone ({len(record.edit_ids)} edits)")


@app.command()
def export(
    journal: JournalOption,
    out: Annotated[Path, typer.Option(help="Folder for the edited model (Hugging Face format).")],
    model: Annotated[
        str | None, typer.Option(help="Base model; default: the one the journal was written for.")
    ] = None,
    dtype: DtypeOption = "float32",
) -> None:
    """Write the edited model to a folder.

    Weight editors give a Hugging Face folder (safetensors) that needs no
    lledit. The memory editors' edits (ELDER, GRACE, MEMOIR) are routed per
    sequence, which plain transformers cannot do: they give an lledit folder
    that `lledit.load_edited(OUT)` opens.
    """
    try:
        with _existing_journal(journal) as opened:
            plain = export_journal(opened, out, model=model, dtype=dtype)
    except USER_ERRORS as error:
        raise _fail(error) from error
    if plain:
        console.print(f"edited model written to {out}/")
    else:
        console.print(
            f"edited model written to {out}/ as an lledit folder: its edits are routed per "
            "sequence, which plain transformers cannot do; load it with "
            f"lledit.load_edited('{out}')"
        )


@app.command()
def serve(
    journal: JournalOption,
    method: Annotated[str, typer.Option("--method", "-m", help="Editing method.")],
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    device_map: DeviceMapOption = None,
    dtype: DtypeOption = "float32",
    settings: SettingsOption = None,
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the bearer token clients must send.")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most edits in one POST.")] = 64,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 1_000_000,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Another name clients may reach the service by (Host header)."),
    ] = None,
    max_concurrent_reads: Annotated[
        int, typer.Option(help="Generate/score requests at once; more get 503.")
    ] = 4,
    insecure_no_token: Annotated[
        bool, typer.Option(help="Serve a non-loopback address without a token (unsafe).")
    ] = False,
    allow_download: DownloadOption = False,
    snapshot_every: SnapshotOption = SNAPSHOT_EVERY,
) -> None:
    """Serve the journaled model over HTTP: edit, undo, generate, score."""
    logging.getLogger("lledit.server").setLevel(logging.INFO)  # say where it listens
    try:
        token = None
        if token_file is not None:
            token = token_file.read_text().strip()
            if not token:
                raise ValueError(f"the token file {token_file} is empty")
        if token is None and not _is_loopback(host) and not insecure_no_token:
            raise ValueError(
                f"--host {host} lets other machines edit the model: give --token-file, "
                "or --insecure-no-token if that is really what you want"
            )
        edited = _open_journaled(
            journal,
            method,
            model,
            device,
            device_map,
            dtype,
            settings,
            allow_download,
            snapshot_every,
        )
    except USER_ERRORS as error:
        raise _fail(error) from error
    run_server(
        edited,
        host=host,
        port=port,
        token=token,
        max_batch_size=max_batch_size,
        max_body_bytes=max_body_bytes,
        allowed_hosts=_allowed_hosts(host, allowed_host or []),
        max_concurrent_reads=max_concurrent_reads,
    )


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """Loopback names, the bound address unless it is a wildcard, and `extra`."""
    wildcard = host in ("0.0.0.0", "::", "")
    return [*LOOPBACK_NAMES, *([] if wildcard else [host]), *extra]


if __name__ == "__main__":
    app()
