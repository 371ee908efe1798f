"""Completions sampled once from a frozen reference, cached on disk with what they depend on.

D2O (docs/objectives.md §5) trains on K samples per prompt drawn ONCE from the frozen reference π_ref.
They are generated before training and written beside the run as JSONL (one row per distinct prompt:
``{"prompt": ..., "samples": [K texts], "finished": [K bools]}``) plus a ``.meta.json`` sidecar that
records everything the samples depend on:

- the sampling settings (K, temperature, top-p, max_new_tokens, seed),
- the fingerprint of the tokenizer (vocabulary, tokenizer model, chat template, special tokens) and of
  the reference weights (sha256 over the state dict, adapter weights excluded): the sample store's
  (fdpo/data/sample_store.py), the same that DPH-RL's rehearsal store records,
- a fingerprint of the ordered distinct prompts,
- the sha256 of the JSONL file itself.

They are drawn with fdpo's one sampler (fdpo/data/sampler.py). On load every field is compared with
the current run (the store's `fingerprint_differences`): any difference (other settings, another
tokenizer or reference, other prompts, an edited or truncated file) is a :class:`StaleSampleCacheError`
naming the fields, unless ``regenerate=True``, which overwrites the cache. The sidecar is written
last, atomically, so a run killed while sampling leaves a cache without sidecar, which is
regenerated (with a warning) instead of being trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fdpo.data import sampler
from fdpo.data.sample_store import (
    StaleSamplesError,
    fingerprint_differences,
    model_fingerprint,
    sha256_file,
    tokenizer_fingerprint,
    write_text_atomic,
)

logger = logging.getLogger("fdpo")

FORMAT_VERSION = 2  # 2: the sample store's tokenizer fingerprint (a mapping of named fields)

#: a cache exists but was made for other settings, tokenizer, reference or prompts: the sample
#: store's one error (fdpo/data/sample_store.py), under the name this cache has always raised
StaleSampleCacheError = StaleSamplesError


@dataclass(frozen=True)
class SamplingSettings:
    """How the reference samples are drawn (recorded in the cache's sidecar)."""

    num_samples: int
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be ≥ 1, got {self.num_samples}")
        if not self.temperature > 0:
            raise ValueError(
                f"sampling temperature must be > 0 (samples of π_ref, not greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")


def prompt_key(prompt: Any) -> str:
    """A canonical string for a prompt (a string or a list of chat messages)."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _sha(parts: Sequence[str | bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.hexdigest()


def prompts_fingerprint(keys: Sequence[str]) -> str:
    return _sha(list(keys))


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def _expected_meta(settings: SamplingSettings, tok_fp: dict[str, Any], ref_fp: str, prompts_fp: str) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "sampling": asdict(settings),
        "tokenizer_fingerprint": tok_fp,
        "reference_fingerprint": ref_fp,
        "prompts_fingerprint": prompts_fp,
    }


def _differences(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [
        f"{name}: cache {str(stored)[:16]!s} vs run {str(now)[:16]!s}" if name.endswith("_fingerprint")
        else f"{name}: cache {stored!r} vs run {now!r}"
        for name, stored, now in fingerprint_differences({k: recorded.get(k) for k in expected}, expected)
    ]


def read_reference_samples(path: Path) -> dict[str, list[str]]:
    """{prompt_key: [K completions]} from a cache file (no validation; see load_or_generate_reference_samples)."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                out[prompt_key(row["prompt"])] = list(row["samples"])
    return out


def load_or_generate_reference_samples(
    model,
    tokenizer,
    prompts: Sequence[Any],
    settings: SamplingSettings,
    path: str | Path,
    *,
    regenerate: bool = False,
    allow_generate: bool = True,
    batch_size: int = 64,
) -> dict[str, list[str]]:
    """K completions per distinct prompt of `prompts`, from the cache at `path` or sampled from `model` now.

    `model` must be the frozen reference (call before any training step). Returns {prompt_key: [K texts]}.
    Raises StaleSampleCacheError when a complete cache at `path` does not match (see the module docstring)
    and `regenerate` is False; RuntimeError when sampling is needed but `allow_generate` is False.
    """
    path = Path(path)
    keys: list[str] = []
    distinct: list[Any] = []
    seen: set[str] = set()
    for p in prompts:
        k = prompt_key(p)
        if k not in seen:
            seen.add(k)
            keys.append(k)
            distinct.append(p)
    expected = _expected_meta(
        settings, tokenizer_fingerprint(tokenizer), model_fingerprint(model), prompts_fingerprint(keys)
    )
    mpath = meta_path(path)
    if path.is_file() and mpath.is_file() and not regenerate:
        recorded = json.loads(mpath.read_text())
        diffs = _differences(recorded, expected)
        if recorded.get("file_sha256") != sha256_file(path):
            diffs.append("file_sha256: the sample file was modified or truncated after it was written")
        if diffs:
            raise StaleSampleCacheError(
                f"the reference-sample cache {path} does not match this run: " + "; ".join(diffs) + ". "
                "Delete it, point `samples_path` elsewhere, or set `regenerate_samples: true` to sample again."
            )
        samples = read_reference_samples(path)
        logger.info("D2O: reusing %d×%d reference samples from %s", len(samples), settings.num_samples, path)
        return samples
    if path.is_file() and not mpath.is_file() and not regenerate:
        logger.warning("reference-sample cache %s has no sidecar (interrupted run?): sampling again", path)
    if not allow_generate:
        raise RuntimeError(
            f"no valid reference-sample cache at {path}, and the model is no longer the reference (training has "
            "started), so the samples cannot be drawn now. Pass this dataset at trainer construction instead."
        )
    start = time.time()
    drawn = sampler.sample_completions(
        model,
        tokenizer,
        distinct,
        num_samples=settings.num_samples,
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        batch_size=batch_size,
        seed=settings.seed,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if mpath.exists():
        mpath.unlink()
    tmp = path.with_name(path.name + ".tmp")
    unfinished = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for p, comps in zip(distinct, drawn):
            unfinished += sum(not c.finished for c in comps)
            row = {"prompt": p, "samples": [c.text for c in comps], "finished": [c.finished for c in comps]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    meta = {
        **expected,
        "file_sha256": sha256_file(path),
        "num_prompts": len(distinct),
        "unfinished_samples": unfinished,
        "reference_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", ""),
        "seconds": round(time.time() - start, 2),
        "created_unix": time.time(),
    }
    write_text_atomic(mpath, json.dumps(meta, indent=2, sort_keys=True))
    total = len(distinct) * settings.num_samples
    if unfinished:
        logger.warning(
            "D2O: %d of %d reference samples hit max_new_tokens=%d without an end of sequence; raise "
            "`sample_max_new_tokens` if that is not intended",
            unfinished,
            total,
            settings.max_new_tokens,
        )
    logger.info("D2O: sampled %d×%d reference completions into %s", len(distinct), settings.num_samples, path)
    return {k: [c.text for c in comps] for k, comps in zip(keys, drawn)}
