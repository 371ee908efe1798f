"""Loading a recipe's dataset from a local file/directory or the hub, and checking its columns.

Local files go through `datasets.load_dataset` with the builder their extension names (json for
.json/.jsonl, parquet, csv); a directory goes through `load_dataset(dir)`, which infers format and
splits from the file names. Anything else is taken as a hub name. Required columns are checked
before training: a missing column, or a row whose required value is empty or of the wrong form, is
an error naming the file, the row and the column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fdpo.errors import RecipeError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# roles the chat templates of the common model families render; anything else is a typo in the data
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")


def _check_text_file(path: Path, *, key: str) -> str:
    """The UTF-8 text of a local data file; non-UTF-8 bytes and an empty file name the file (and line)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError(
            f"{key}: {path}, line {line}, column {column}: byte {raw[exc.start]:#04x} is not UTF-8. "
            "Re-save the file as UTF-8."
        ) from exc
    if not text.strip():
        raise RecipeError(f"{key}: {path} is empty. Write the data there (e.g. `fdpo data sum_pairs DIR`).")
    return text


def _check_json_lines(path: Path, text: str, *, key: str) -> None:
    """Every non-blank line of a JSON Lines file must be one JSON object; a `.json` may also be one document."""
    bad = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad = (number, exc.colno, exc.msg)
            break
        if not isinstance(row, dict):
            bad = (number, 1, f"expected a JSON object per line, got {type(row).__name__}")
            break
    if bad is None:
        return
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)  # a single JSON document (a list of rows, or {"data": [...]}) is fine too
            return
        except json.JSONDecodeError:
            pass
    number, column, msg = bad
    raise RecipeError(f"{key}: {path}, line {number}, column {column}: not valid JSON Lines ({msg}). Fix that line.")


def check_local_file(name: str | Path, *, key: str) -> Path:
    """Check a local data file before `datasets` reads it: it exists, is UTF-8, not empty, and (JSON) parses."""
    path = Path(name).expanduser()
    if not path.exists():
        raise RecipeError(
            f"{key}: {path} does not exist. Build the synthetic data with `fdpo data sum_pairs DIR` "
            "or point the key at an existing file."
        )
    if path.is_dir():
        return path
    if path.suffix.lower() in (".json", ".jsonl", ".csv"):
        text = _check_text_file(path, key=key)
        if path.suffix.lower() != ".csv":
            _check_json_lines(path, text, key=key)
    elif path.stat().st_size == 0:
        raise RecipeError(f"{key}: {path} is empty. Write the data there (e.g. `fdpo data sum_pairs DIR`).")
    return path


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
        check_local_file(path, key=key)
        try:
            return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
        except Exception as exc:  # datasets' own errors (mixed column types, bad parquet): name the file
            raise RecipeError(
                f"{key}: could not read {path} as {builder} ({type(exc).__name__}: {_cause(exc)[:300]}). "
                "Check that every row has the same columns with the same types."
            ) from exc
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


def _cause(exc: BaseException) -> str:
    """The innermost message of a chained exception (datasets wraps the parser's error)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc)


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
        if msg["role"] not in CHAT_ROLES:
            return f"message {i} has role {msg['role']!r}; chat roles are {list(CHAT_ROLES)}"
        if msg["content"] is None or (isinstance(msg["content"], str) and not msg["content"].strip()
                                      and not msg.get("tool_calls")):
            return f"message {i} ({msg['role']}) has empty content"
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
