"""Edit requests and the datasets they come from."""

from lledit.data.datasets import (
    DatasetInfo,
    UnknownDatasetError,
    data_dir,
    list_datasets,
    load_dataset,
)
from lledit.data.loaders import (
    FORMATS,
    DataFileError,
    EditDataset,
    detect_format,
    load_file,
    read_records,
)
from lledit.data.request import EditRequest, InvalidEditError

__all__ = [
    "FORMATS",
    "DataFileError",
    "DatasetInfo",
    "EditDataset",
    "EditRequest",
    "InvalidEditError",
    "UnknownDatasetError",
    "data_dir",
    "detect_format",
    "list_datasets",
    "load_dataset",
    "load_file",
    "read_records",
]
