"""Loading a recipe's dataset from a local file/directory or the hub, and checking its columns.

Local files go through `datasets.load_dataset` with the builder their extension names (json for
.json/.jsonl, parquet, csv); a directory goes through `load_dataset(dir)`, which infers format and
splits from the file names. Anything else is taken as a hub name. Required columns are checked
before training: a missing column, or a row whose required value is empty or of the wrong form, is
an error naming the file, the row and the column.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fdpo.errors import RecipeError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_any_dataset(name: str, *, config: str | None = None, split: str = "train", key: str = "dataset_name"):
    """Load split `split` of `name` (local path or hub name) as a `datasets.Dataset`."""
    import datasets

    path = Path(name).expanduser()
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise RecipeError(
                f"{key}: {path} has extension '{path.suffix}'; supported local formats are "
                f"{sorted(BUILDERS)} (or a directory of them)."
            )
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    if path.is_dir():
        try:
            loaded = datasets.load_dataset(str(path), config)
        except Exception as exc:
            raise RecipeError(f"{key}: could not read the directory {path} as a dataset: {exc}") from exc
        if split not in loaded:
            raise RecipeError(f"{key}: {path} has splits {list(loaded)}, not '{split}'. Set the split key.")
        return loaded[split]
    looks_local = name.startswith((".", "/", "~")) or Path(name).suffix.lower() in BUILDERS
    if looks_local:
        raise RecipeError(
            f"{key}: {name} does not exist. Build the synthetic data with `fdpo data sum_pairs DIR` "
            "or point the key at an existing file."
        )
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise RecipeError(
            f"{key}: '{name}' is not a local path, so it was looked up on the Hugging Face hub, which "
            f"failed ({type(exc).__name__}: {str(exc)[:300]}). If this machine is offline, download the "
            "dataset elsewhere and point the key at the local file or directory."
        ) from exc


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, Sequence):
        return len(value) == 0
    return False


def _message_problem(value: Any) -> str | None:
    """None if `value` is a plain string or a well-formed list of {role, content} messages."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        return f"expected a string or a list of messages, got {type(value).__name__}"
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            return f"message {i} is not a mapping with 'role' and 'content'"
        if msg["content"] is None:
            return f"message {i} has no content"
    return None


def check_columns(
    dataset,
    required: Sequence[str],
    *,
    source: str,
    text_columns: Sequence[str] = (),
    max_rows: int | None = None,
) -> None:
    """Raise a `RecipeError` naming source, row and column if `dataset` lacks what a trainer needs.

    `required`: columns that must exist and be non-empty in every row. `text_columns`: the subset
    that must be a string or a list of chat messages.
    """
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise RecipeError(
            f"{source}: missing column(s) {missing}; the file has {dataset.column_names}. "
            f"This trainer needs {list(required)}: rename the columns or pick another trainer."
        )
    n = len(dataset) if max_rows is None else min(len(dataset), max_rows)
    if len(dataset) == 0:
        raise RecipeError(f"{source}: the dataset is empty.")
    columns = dataset.select_columns(list(required))[:n]
    for col in required:
        for row, value in enumerate(columns[col]):
            if _is_empty(value):
                raise RecipeError(f"{source}: row {row}, column '{col}' is empty. Fix or drop that row.")
            if col in text_columns:
                problem = _message_problem(value)
                if problem:
                    raise RecipeError(f"{source}: row {row}, column '{col}': {problem}.")
