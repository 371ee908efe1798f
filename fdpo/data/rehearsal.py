"""The DPH-RL rehearsal store: its on-disk format, the tokenizer fingerprint, and `RehearsalBuffer`.

`fdpo presample RECIPE` (fdpo/data/presample.py) writes one directory, by default
``<output_dir>/dph/``, atomically (it is complete or absent):

- ``manifest.json``: format/version, generation settings (temperature, top_p, top_k, min_p,
  repetition_penalty, max_completion_length, generation_kwargs, n, seed, batch size), model path,
  dataset, reward functions, the tokenizer fingerprint (:func:`tokenizer_fingerprint`), counts,
  the D_pef fraction, and the sha256 and size of every other file.
- ``rehearsal.safetensors``: the correct samples of the D_pef prompts, ragged, as flat tensors plus
  offsets (sample i's prompt is ``prompt_ids[prompt_offsets[i]:prompt_offsets[i+1]]``):
  ``prompt_ids`` int32, ``prompt_offsets`` int64 (N+1), ``completion_ids`` int32 (the completion up
  to and including its first eos, as TRL's GRPOTrainer keeps it), ``completion_offsets`` int64
  (N+1), ``completion_mask`` int8 (aligned with ``completion_ids``), ``ref_logps`` float32
  (aligned: log π_ref(y_t | x, y_<t) of the logits divided by the sampling temperature, from a
  teacher-forced forward), ``sample_prompt_row`` int64 (N, the first training-data row of the
  sample's prompt), ``sample_reward`` float32 (N); per row of the training data: ``prompt_group``
  int64 (identical rows form one prompt, sampled once, on one side of the split),
  ``prompt_num_correct`` int64 (of its prompt's n samples) and ``prompt_in_pef`` int8;
  ``pef_rows``/``exp_rows`` int64 (the split, as row indices).
- ``d_exp.jsonl`` / ``d_pef.jsonl``: the training-data rows (every column, unchanged) of D_exp (the
  prompts RL trains on) and of D_pef.

`RehearsalBuffer` opens the directory, checks the fingerprint and the temperature against training
(refusing a mismatch with an error naming the file and the field), and yields padded
`RehearsalBatch` es laid out as TRL's GRPOTrainer lays out rollouts (prompt left-padded, completion
right-padded, ``logits_to_keep`` = completion width), in a deterministic, resumable order.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fdpo.data.sample_store import (
    StaleSamplesError,
    fingerprint_differences,
    load_tensors_checked,
    sha256_file,
    short_repr,
    tokenizer_fingerprint,
    write_store_dir,
)
from fdpo.data.sampler import pad_prompt_completion
from fdpo.errors import RecipeError

logger = logging.getLogger("fdpo")

FORMAT = "fdpo-dph-rehearsal"
FORMAT_VERSION = 1
DEFAULT_SUBDIR = "dph"
MANIFEST = "manifest.json"
SAMPLES = "rehearsal.safetensors"
D_EXP = "d_exp.jsonl"
D_PEF = "d_pef.jsonl"

#: manifest["generation"] keys compared with training and only warned about: they change which samples
#: were drawn, not log π_ref (the temperature, which changes log π_ref, is refused on mismatch).
SOFT_GENERATION_KEYS = ("top_p", "top_k", "min_p", "repetition_penalty", "max_completion_length")


#: file a trainer may write into each checkpoint with `RehearsalBuffer.save_state`
STATE_FILE = "rehearsal_state.json"

#: the stored samples do not belong to this training run (tokenizer/template/temperature): the sample
#: store's one error (fdpo/data/sample_store.py), under the name this store has always raised
RehearsalMismatchError = StaleSamplesError

_RERUN = "rerun `fdpo presample`"


def dph_dir(output_dir: str | os.PathLike) -> Path:
    """The default rehearsal directory of a run: ``<output_dir>/dph``."""
    return Path(output_dir) / DEFAULT_SUBDIR


def write_rehearsal_dir(
    out_dir: str | os.PathLike,
    manifest: dict[str, Any],
    tensors: dict[str, Tensor],
    extra_files: dict[str, Callable[[Path], None]],
) -> Path:
    """Write the store atomically (fdpo/data/sample_store.py's `write_store_dir`): the tensors, the
    ``extra_files`` ({file name: writer(path)}, e.g. the D_exp/D_pef JSONL files), then the manifest
    with every file's sha256. A crash leaves the old store or none, never a half one."""
    return write_store_dir(
        out_dir,
        {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION},
        tensors,
        extra_files,
        tensors_file=SAMPLES,
        manifest_file=MANIFEST,
        metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
    )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a rehearsal store (``path`` = the directory or its manifest.json)."""
    path = Path(path)
    directory = path.parent if path.name == MANIFEST else path
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise RecipeError(
            f"{directory}: no DPH-RL rehearsal store here ({MANIFEST} missing). Run `fdpo presample RECIPE` "
            "first (it writes <output_dir>/dph), or point the rehearsal key at the directory it wrote."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{manifest_path}: not valid JSON ({exc}); {_RERUN}.") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise RecipeError(
            f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}; {_RERUN} with this fdpo."
        )
    return manifest


def load_rehearsal_tensors(directory: str | os.PathLike, *, verify: bool = True) -> tuple[dict, dict[str, Tensor]]:
    """(manifest, tensors) of a store; with ``verify`` the tensor file's sha256 is checked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    expected = manifest["files"].get(SAMPLES, {}).get("sha256")
    return manifest, load_tensors_checked(directory / SAMPLES, expected, verify=verify, fix=_RERUN)


# ---------------------------------------------------------------------------------------------
# The buffer
# ---------------------------------------------------------------------------------------------


@dataclass
class RehearsalBatch:
    """A padded batch of stored samples, in TRL GRPOTrainer's rollout layout.

    ``input_ids``/``attention_mask``: (B, P + C), prompt left-padded to P, completion right-padded
    to C = ``logits_to_keep``; ``completion_mask`` and ``ref_logps``: (B, C), ``ref_logps`` is 0 on
    padding; ``indices``: (B,) sample indices in the store. The policy's per-token log-probs of the
    completion at the sampling temperature are, as in TRL,
    ``trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep)``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    ref_logps: Tensor
    logits_to_keep: int
    indices: Tensor

    def to(self, device: torch.device | str) -> RehearsalBatch:
        return RehearsalBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device),
            ref_logps=self.ref_logps.to(device),
            logits_to_keep=self.logits_to_keep,
            indices=self.indices.to(device),
        )


class RehearsalBuffer:
    """Stored D_pef samples of `fdpo presample`, served as padded batches for the rehearsal loss.

    Refuses (``RehearsalMismatchError`` naming the file and the field) a store whose tokenizer
    fingerprint or sampling temperature differs from training; warns when another generation setting
    (top_p, top_k, min_p, repetition_penalty, max_completion_length) or the model path differs.

    Order: epoch e visits every sample once in ``randperm(N)`` drawn from a generator seeded with
    (seed, e) (or in stored order with ``shuffle=False``); batches run across epoch boundaries, so
    every batch is full. With ``world_size`` > 1, each step takes ``batch_size × world_size``
    samples from the stream and process ``rank`` gets its slice; all ranks share one state.
    ``state_dict()``/``load_state_dict()`` resume the stream exactly.

    Args:
        path: the store directory (``<output_dir>/dph``) or its manifest.json.
        tokenizer: the training tokenizer (processing_class).
        temperature: the training config's sampling temperature.
        batch_size: samples per batch and process.
        chat_template, chat_template_kwargs: as the trainer renders prompts (None: the tokenizer's).
        generation: the training config's other generation settings ({key: value}) to compare.
        model_name_or_path: the training model, compared with the stored one (warning only).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        tokenizer,
        temperature: float,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        generation: dict[str, Any] | None = None,
        model_name_or_path: str | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        path = Path(path)
        self.path = path.parent if path.name == MANIFEST else path
        if batch_size < 1:
            raise ValueError(f"rehearsal batch_size must be ≥ 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        manifest = read_manifest(self.path)
        self._check(manifest, tokenizer, temperature, chat_template, chat_template_kwargs, generation,
                    model_name_or_path)
        manifest, tensors = load_rehearsal_tensors(self.path)
        self.manifest = manifest
        self.num_samples = int(tensors["sample_prompt_row"].numel())
        if self.num_samples == 0:
            raise RecipeError(
                f"{self.path / SAMPLES}: no stored D_pef samples (no prompt was solved in at least "
                f"pef_threshold = {manifest.get('pef_threshold')} of n = {manifest.get('generation', {}).get('n')} "
                "samples). Lower `pef_threshold` and rerun `fdpo presample`, or train without rehearsal."
            )
        self._prompt_ids = tensors["prompt_ids"].long()
        self._prompt_off = tensors["prompt_offsets"].long()
        self._completion_ids = tensors["completion_ids"].long()
        self._completion_off = tensors["completion_offsets"].long()
        self._completion_mask = tensors["completion_mask"].long()
        self._ref_logps = tensors["ref_logps"].float()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.pad_to_multiple_of = pad_to_multiple_of
        self._samples_sha256 = manifest["files"][SAMPLES]["sha256"]
        self._epoch = 0
        self._cursor = 0
        self._perm: Tensor | None = None

    # -- checks ------------------------------------------------------------------------------

    def _check(self, manifest, tokenizer, temperature, chat_template, chat_template_kwargs, generation, model):
        where = self.path / MANIFEST
        current = tokenizer_fingerprint(
            tokenizer, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs
        )
        diffs = fingerprint_differences(manifest.get("tokenizer", {}), current, "tokenizer.")
        gen = manifest.get("generation", {})
        stored_t = gen.get("temperature")
        if stored_t is None or not math.isclose(float(stored_t), float(temperature), rel_tol=0, abs_tol=1e-12):
            diffs.append(("generation.temperature", stored_t, temperature))
        if diffs:
            field, stored, now = diffs[0]
            more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
            raise RehearsalMismatchError(
                f"{where}: field '{field}' of the stored DPH-RL rehearsal samples is {short_repr(stored)}, but "
                f"training uses {short_repr(now)}{more}. The stored token ids and log π_ref are only valid with the "
                "same tokenizer, chat template and sampling temperature: rerun `fdpo presample RECIPE` with the "
                "training settings, or point the rehearsal key at a matching store."
            )
        for key, value in (generation or {}).items():
            if key in gen and gen[key] != value:
                logger.warning("%s: stored generation.%s = %r but training uses %r (samples were drawn with the "
                               "stored setting)", where, key, gen[key], value)
        if model is not None and manifest.get("model_name_or_path") not in (None, str(model)):
            logger.warning("%s: samples were drawn from %r, training starts from %r; log π_ref belongs to the "
                           "former", where, manifest.get("model_name_or_path"), str(model))

    # -- order ---------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
        return torch.randperm(self.num_samples, generator=g)

    def _take(self, k: int) -> Tensor:
        out = []
        while k > 0:
            if self._perm is None:
                self._perm = self._permutation(self._epoch)
            n = min(k, self.num_samples - self._cursor)
            out.append(self._perm[self._cursor : self._cursor + n])
            self._cursor += n
            k -= n
            if self._cursor == self.num_samples:
                self._epoch += 1
                self._cursor = 0
                self._perm = None
        return torch.cat(out)

    def next_indices(self) -> Tensor:
        """The sample indices of this process's next batch (advances the shared stream)."""
        step = self._take(self.batch_size * self.world_size)
        return step[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batch(self, indices: Tensor) -> RehearsalBatch:
        """The padded batch of the given sample indices."""
        prompts, completions, masks, logps = [], [], [], []
        for i in indices.tolist():
            p0, p1 = int(self._prompt_off[i]), int(self._prompt_off[i + 1])
            c0, c1 = int(self._completion_off[i]), int(self._completion_off[i + 1])
            prompts.append(self._prompt_ids[p0:p1])
            completions.append(self._completion_ids[c0:c1])
            masks.append(self._completion_mask[c0:c1])
            logps.append(self._ref_logps[c0:c1])
        padded = pad_prompt_completion(
            prompts,
            completions,
            self.pad_token_id,
            extras={"completion_mask": (masks, 0), "ref_logps": (logps, 0.0)},
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return RehearsalBatch(
            input_ids=padded["input_ids"],
            attention_mask=padded["attention_mask"],
            completion_mask=padded["completion_mask"],
            ref_logps=padded["ref_logps"],
            logits_to_keep=padded["completion_width"],
            indices=indices.clone(),
        )

    def next_batch(self, device: torch.device | str | None = None) -> RehearsalBatch:
        """This process's next batch (moved to ``device`` if given)."""
        out = self.batch(self.next_indices())
        return out if device is None else out.to(device)

    def __iter__(self) -> Iterator[RehearsalBatch]:
        while True:
            yield self.next_batch()

    def __len__(self) -> int:
        return self.num_samples

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "cursor": self._cursor,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "samples_sha256": self._samples_sha256,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("samples_sha256", "num_samples", "seed", "shuffle"):
            if state.get(key) != getattr(self, "_" + key if key == "samples_sha256" else key):
                raise RehearsalMismatchError(
                    f"{self.path}: cannot resume the rehearsal stream: saved '{key}' = {state.get(key)!r}, "
                    f"this buffer has {getattr(self, '_' + key if key == 'samples_sha256' else key)!r}."
                )
        self._epoch = int(state["epoch"])
        self._cursor = int(state["cursor"])
        self._perm = None

    def save_state(self, checkpoint_dir: str | os.PathLike) -> Path:
        """Write ``state_dict()`` as JSON into a checkpoint directory (``rehearsal_state.json``)."""
        path = Path(checkpoint_dir) / STATE_FILE
        path.write_text(json.dumps(self.state_dict(), indent=2, sort_keys=True) + "\n")
        return path

    def load_state(self, checkpoint_dir: str | os.PathLike) -> bool:
        """Resume from a checkpoint's ``rehearsal_state.json``; False (state unchanged) if it has none."""
        path = Path(checkpoint_dir) / STATE_FILE
        if not path.is_file():
            return False
        self.load_state_dict(json.loads(path.read_text()))
        return True



__all__ = [
    "D_EXP",
    "D_PEF",
    "MANIFEST",
    "SAMPLES",
    "STATE_FILE",
    "RehearsalBatch",
    "RehearsalBuffer",
    "RehearsalMismatchError",
    "dph_dir",
    "load_rehearsal_tensors",
    "pad_prompt_completion",
    "read_manifest",
    "sha256_file",
    "tokenizer_fingerprint",
    "write_rehearsal_dir",
]
