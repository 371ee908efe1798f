"""Checking a local model directory before anything loads it.

`from_pretrained` on a broken directory fails deep inside transformers or safetensors, often without
naming the file. fdpo reads the cheap facts first: the directory exists, `config.json` parses, a
tokenizer is there, and every `*.safetensors` file is whole (its 8-byte header length, its JSON
header, and a size equal to header + the last tensor's end offset, as the safetensors format lays
it out). Each problem is a `RecipeError` naming the file and the fix. Hub names are not checked here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from fdpo.errors import RecipeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
FIX = "rebuild it (e.g. `fdpo tiny DIR`) or point at the directory `save_pretrained` wrote"


def looks_local(name: str) -> bool:
    """A path rather than a hub name `org/model`: it exists, starts like a path, or has more than one '/'."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def check_safetensors(path: Path, *, where: str) -> None:
    """Raise a `RecipeError` naming `path` if it is empty, truncated or not a safetensors file."""
    size = path.stat().st_size
    problem = None
    if size == 0:
        problem = "is empty (0 bytes)"
    elif size < 8:
        problem = f"is {size} bytes, shorter than a safetensors header"
    else:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if 8 + header_len > size:
                problem = "is not a safetensors file (garbage or truncated header)"
            else:
                try:
                    header = json.loads(fh.read(header_len))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    header = None
                if not isinstance(header, dict):
                    problem = "is not a safetensors file (its header is not JSON)"
                else:
                    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                            and "data_offsets" in v]
                    expected = 8 + header_len + max(ends, default=0)
                    if size < expected:
                        problem = f"is truncated ({size} bytes; its header describes {expected})"
    if problem:
        raise RecipeError(f"{where}: the weights file {path} {problem}: {FIX}.")


def check_model_dir(name: str | Path, *, where: str, need_tokenizer: bool = True) -> None:
    """Check that local model directory `name` holds a config, weights (whole) and, if asked, a tokenizer."""
    name = str(name)
    if not looks_local(name):
        return  # a hub name: from_pretrained reports its own errors (wrapped by the caller)
    path = Path(name).expanduser()
    if not path.exists():
        raise RecipeError(f"{where}: the model directory {path} does not exist: {FIX}.")
    if not path.is_dir():
        raise RecipeError(f"{where}: {path} is a file, not a model directory: {FIX}.")
    config = path / "config.json"
    adapter = path / "adapter_config.json"
    if not config.is_file() and not adapter.is_file():
        raise RecipeError(f"{where}: {path} has no config.json, so it is not a model directory: {FIX}.")
    for meta in (config, adapter):
        if meta.is_file():
            try:
                json.loads(meta.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RecipeError(f"{where}: {meta} is not valid JSON ({exc}): {FIX}.") from exc
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise RecipeError(f"{where}: {path} has no weights (none of {list(WEIGHT_FILES)}): {FIX}.")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights, where=where)
    if need_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise RecipeError(
            f"{where}: {path} has no tokenizer (none of {list(TOKENIZER_FILES)}): save the tokenizer with "
            "`tokenizer.save_pretrained(DIR)` next to the model, or rebuild it with `fdpo tiny DIR`."
        )
