"""Named datasets: the benchmark files in the shared data directory and the built-in sample.

The benchmark files are never part of the repository; they are found through
`LLEDIT_DATA_DIR` (default `../shared/data` beside the repository root), and
their expected sha256 says whether a file is the published one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lledit.data.loaders import EditDataset, load_file, read_records

BUILTIN = "builtin"


class UnknownDatasetError(ValueError):
    """Neither a known dataset name nor an existing file."""


@dataclass(frozen=True)
class _KnownFile:
    relpath: str
    sha256: str | None = None
    records: int | None = None


# From the data directory's MANIFEST.md.
_KNOWN: dict[str, dict[str, _KnownFile]] = {
    "zsre": {
        "eval": _KnownFile(
            "zsre/zsre_mend_eval_portability_gpt4.json",
            "0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9",
            1037,
        ),
        "train": _KnownFile(
            "zsre/zsre_mend_train_10000_mzsre.json",
            "86f1d06ad075dc806fd046cc292b866726ff981fdf2c14a7d933fa12dd5c5010",
            10000,
        ),
        "train-1k": _KnownFile(
            "zsre/zsre_mend_train-1k.json",
            "09dbb446f4afa1e500e051806430d286ef260fa6dd89e3590a9756f8b060a229",
            1000,
        ),
    },
    "counterfact": {
        "eval": _KnownFile(
            "counterfact/counterfact-edit.json",
            "20c225e6299b3c5b2c569bd9103aa212806e0d1e6e0c307de5c379773979b967",
            10000,
        ),
        "train": _KnownFile(
            "counterfact/counterfact-train.json",
            "bb40e12c7b740d6859e521674cf438f063c7c3e444bc1b449e74cdd0900772d0",
            10000,
        ),
        "preview": _KnownFile(
            "counterfact/cf_preview.json",
            "305fcef4d008743a01d19a6c4677d70a1bb4181d5cc71fd5a1fc51b598c69745",
            7,
        ),
    },
    "knowedit": {
        "train": _KnownFile(
            "knowedit/wiki_counterfact_train_cf.json",
            "acdc01922afab1d4122249a2c22ad8c1e0e86506dd7a28eec698f22d175ebf9d",
            1428,
        ),
    },
    BUILTIN: {
        "train": _KnownFile("train.jsonl"),
        "eval": _KnownFile("eval.jsonl"),
    },
}


@dataclass(frozen=True)
class DatasetInfo:
    """One split of a named dataset: where it is expected and whether it is the published file."""

    name: str
    split: str
    path: str
    present: bool
    records: int | None
    expected_records: int | None
    sha256_ok: bool | None


def data_dir() -> Path:
    """Where the benchmark files are: `LLEDIT_DATA_DIR`, else `../shared/data` beside the repo."""
    configured = os.environ.get("LLEDIT_DATA_DIR")
    if configured:
        return Path(configured).expanduser()
    repo_root = Path(__file__).resolve().parents[3]
    return repo_root.parent / "shared" / "data"


def _path_of(name: str, split: str) -> Path:
    relpath = _KNOWN[name][split].relpath
    if name == BUILTIN:
        # The sample ships inside the package, so it is found wherever lledit is installed.
        return Path(str(resources.files("lledit.data") / "builtin" / relpath))
    return data_dir() / relpath


def _split_path(name: str, split: str) -> Path:
    splits = _KNOWN[name]
    if split not in splits:
        raise ValueError(
            f"dataset {name!r} has no split {split!r}; its splits: {', '.join(splits)}"
        )
    path = _path_of(name, split)
    if path.is_file():
        return path
    if name == BUILTIN:
        raise FileNotFoundError(f"the built-in sample file is missing from the package: {path}")
    raise FileNotFoundError(
        f"{name}/{split}: {path} not found; looked in the data directory {data_dir()} "
        "(set LLEDIT_DATA_DIR to the folder that holds the benchmark files)"
    )


def load_dataset(
    name_or_path: str | Path,
    split: str = "eval",
    *,
    format: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    seed: int | None = None,
    skip_invalid: bool = False,
) -> EditDataset:
    """A named dataset's split (e.g. "zsre", "eval"), or any data file by path."""
    key = str(name_or_path)
    if key in _KNOWN:
        path, name = _split_path(key, split), f"{key}/{split}"
    else:
        path, name = Path(name_or_path).expanduser(), None
        if not path.is_file():
            raise UnknownDatasetError(
                f"unknown dataset {key!r}: not a known name ({', '.join(_KNOWN)}) "
                "and not an existing file"
            )
    return load_file(
        path,
        name=name,
        format=format,
        limit=limit,
        offset=offset,
        seed=seed,
        skip_invalid=skip_invalid,
    )


def list_datasets() -> list[DatasetInfo]:
    """Every known split, whether its file is present, and whether it matches the manifest."""
    infos = []
    for name, splits in _KNOWN.items():
        for split, known in splits.items():
            path = _path_of(name, split)
            present = path.is_file()
            sha256_ok = None
            if present and known.sha256 is not None:
                sha256_ok = _sha256_of_file(path) == known.sha256
            infos.append(
                DatasetInfo(
                    name=name,
                    split=split,
                    path=str(path),
                    present=present,
                    records=len(read_records(path)) if present else None,
                    expected_records=known.records,
                    sha256_ok=sha256_ok,
                )
            )
    return infos


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
