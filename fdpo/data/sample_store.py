"""fdpo's store of samples drawn before training: one fingerprint, one comparison, atomic files.

Two stores use it: DPH-RL's rehearsal store (fdpo/data/rehearsal.py, written by `fdpo presample`,
docs/objectives.md §7) and D2O's reference samples (fdpo/data/reference_samples.py, §5). Stored token
ids, texts and log π_ref are only valid for the run that drew them, so each store records

- the tokenizer (:func:`tokenizer_fingerprint`: vocabulary, tokenizer model, chat template and its
  kwargs, special tokens),
- the weights they were drawn from (:func:`model_fingerprint`, PEFT adapters excluded),
- the sampling settings (a flat mapping),

and on load compares each field with the current run (:func:`fingerprint_differences`): a stored
value that differs is a :class:`StaleSamplesError` naming the field. Files are written to a temporary
name, fsynced and renamed into place, the manifest last (:func:`write_store_dir`,
:func:`write_text_atomic`), so a crash leaves the old store or none, never a half one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fdpo.errors import RecipeError


class StaleSamplesError(RecipeError):
    """Stored samples were drawn for another tokenizer, template, reference, prompts or settings
    (also raised as ``RehearsalMismatchError`` and ``StaleSampleCacheError``, the stores' names for it)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The fingerprint
# ---------------------------------------------------------------------------------------------


def tokenizer_fingerprint(
    tokenizer, *, chat_template: str | None = None, chat_template_kwargs: dict | None = None
) -> dict[str, Any]:
    """What must be equal for stored token ids and log-probs to mean the same thing in training.

    - ``vocab_sha256`` (and ``vocab_size``): token ↔ id map;
    - ``tokenizer_model_sha256``: the fast tokenizer's model (merges), normaliser, pre-tokenizer and
      added tokens (absent for slow tokenizers);
    - ``chat_template_sha256``: the template used to render prompts (``chat_template`` if given, as
      TRL's GRPOTrainer may override it, else the tokenizer's), plus ``chat_template_kwargs``;
    - ``special_tokens``: bos/eos/pad/unk tokens and ids, and every special token with its id.
    """
    vocab = tokenizer.get_vocab()
    out: dict[str, Any] = {
        "vocab_size": len(vocab),
        "vocab_sha256": sha256_json(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        out["tokenizer_model_sha256"] = sha256_json(
            {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
        )
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    out["chat_template_sha256"] = None if template is None else sha256_json(template)
    out["chat_template_kwargs"] = dict(chat_template_kwargs or {})
    special = {}
    for name in ("bos", "eos", "pad", "unk"):
        special[f"{name}_token"] = getattr(tokenizer, f"{name}_token", None)
        special[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id", None)
    special["all"] = sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    out["special_tokens"] = json.loads(json.dumps(special))  # tuples → lists, as after a JSON round trip
    return out


def model_fingerprint(model) -> str:
    """sha256 over the sorted state dict (names, dtypes, bytes); PEFT adapter weights are excluded and PEFT's
    renaming undone, so the base model hashes the same with or without a LoRA adapter (the reference is the base)."""
    h = hashlib.sha256()
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        # the same weights under PEFT wrapping: base_model.model.<name>, <module>.base_layer.weight
        state[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = tensor
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.to(torch.float32)
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint_differences(
    stored: Mapping[str, Any], current: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """(dotted field name, stored, current) for every field of ``current`` (nested mappings recursed)
    whose stored value differs. A ``tokenizer_model_sha256`` present on one side only is skipped (a
    slow tokenizer has none; the vocabulary hash still guards the ids)."""
    diffs = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if key == "tokenizer_model_sha256" and (key not in stored or key not in current):
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append((f"{prefix}{key}", a, b))
    return diffs


def short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` gets ``text`` complete or not at all (written to a sibling temp file, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_store_dir(
    out_dir: str | os.PathLike,
    manifest: dict[str, Any],
    tensors: dict[str, Tensor],
    extra_files: dict[str, Callable[[Path], None]],
    *,
    tensors_file: str,
    manifest_file: str,
    metadata: dict[str, str],
) -> Path:
    """Write a store directory atomically: everything goes to a hidden sibling temp directory, each file
    is fsynced, the manifest (with every file's sha256 and size under ``files``) is written last, then
    the directory is renamed into place (replacing an older store).

    ``extra_files``: {file name: writer(path)} (e.g. JSONL files); ``metadata``: the safetensors header's.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / tensors_file), metadata=metadata)
        for name, writer in extra_files.items():
            writer(tmp / name)
        files = {}
        for path in sorted(tmp.iterdir()):
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        with open(tmp / manifest_file, "w") as fh:
            json.dump({**manifest, "files": files}, fh, indent=2, sort_keys=True, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_tensors_checked(path: Path, expected_sha256: str | None, *, verify: bool, fix: str) -> dict[str, Tensor]:
    """The tensors of a store file; with ``verify`` its sha256 must be the manifest's (``fix``: what to do)."""
    if not path.is_file():
        raise RecipeError(f"{path}: missing; the store is incomplete, {fix}.")
    if verify and sha256_file(path) != expected_sha256:
        raise StaleSamplesError(f"{path}: sha256 differs from the one in its manifest (file changed or corrupt); {fix}.")
    return load_file(str(path))


__all__ = [
    "StaleSamplesError",
    "fingerprint_differences",
    "fsync_dir",
    "load_tensors_checked",
    "model_fingerprint",
    "sha256_bytes",
    "sha256_file",
    "sha256_json",
    "short_repr",
    "tokenizer_fingerprint",
    "write_store_dir",
    "write_text_atomic",
]
