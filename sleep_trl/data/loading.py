"""Dataset loading shared by the jobs: local files and folders, or a Hub dataset (TRL's `dataset_name`)."""

from __future__ import annotations

from pathlib import Path

from datasets import DatasetDict, load_dataset, load_from_disk

from ..errors import SleepTrlError

_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_named_dataset(name: str, split: str = "train", config: str | None = None):
    """`name` is a local data file (json/jsonl/csv/parquet), a folder saved with `save_to_disk`, or a Hub dataset."""
    path = Path(name)
    if path.suffix in _FILE_FORMATS and path.exists():
        if path.stat().st_size == 0 or not path.read_bytes().strip():
            raise SleepTrlError(f"`dataset_name` {name!r} is an empty file: give it at least one row.")
        data = load_dataset(_FILE_FORMATS[path.suffix], data_files=str(path), split="train")
        if len(data) == 0:
            raise SleepTrlError(f"`dataset_name` {name!r} holds no rows.")
        return data
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        data = load_from_disk(str(path))
        return data[split] if isinstance(data, DatasetDict) else data
    if path.suffix in _FILE_FORMATS:
        raise SleepTrlError(f"`dataset_name` points to {name!r}, which does not exist.")
    return load_dataset(name, name=config, split=split)
