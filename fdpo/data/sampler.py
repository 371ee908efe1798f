"""The one sampler: K completions per prompt from a causal LM, seeded, in TRL's rollout layout.

Every sample fdpo draws before or outside training goes through :func:`sample_token_ids`: DPH-RL's
presampling (fdpo/data/presample.py, docs/objectives.md §7), D2O's reference samples
(fdpo/data/reference_samples.py, §5) and evaluation (fdpo/eval, through :func:`sample_completions`).
Prompts are left-padded (TRL's layout, :func:`pad_prompt_completion`), each of the ``num_samples``
copies of a prompt is one row, rows are generated in batches of ``batch_size`` under
``torch.manual_seed(seed)`` inside a forked RNG (the caller's RNG state is unchanged afterwards),
and each completion is cut after its first eos token (kept, as TRL keeps it) with a flag saying
whether an eos ended it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

#: one prompt's samples: (token ids up to and including the first eos, whether an eos ended it)
Samples = list[tuple[list[int], bool]]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every eos id the model declares, tokenizer's first (as TRL's GRPOTrainer collects them)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return [i for i in ids if i is not None]


def tokenize_prompts(tokenizer, prompts: list[Any], chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Prompt token ids as TRL's GRPOTrainer makes them: the chat template with the generation prompt
    for conversational prompts, the plain tokenizer for strings."""
    if is_conversational({"prompt": prompts[0]}):
        out = tokenizer.apply_chat_template(
            conversation=prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )
        return [list(ids) for ids in out["input_ids"]]
    return [list(ids) for ids in tokenizer(text=prompts)["input_ids"]]


def render_prompt_ids(tokenizer, prompt: str | list[dict[str, Any]]) -> list[int]:
    """Token ids of a prompt via the chat template with the generation prompt (a str becomes one user turn)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def cut_at_eos(ids: list[int], eos_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The completion up to and including its first eos (TRL keeps the eos), and whether it ended."""
    eos = set(eos_ids)
    for j, t in enumerate(ids):
        if t in eos:
            return ids[: j + 1], True
    return ids, False


def pad_prompt_completion(
    prompts: list[Tensor],
    completions: list[Tensor],
    pad_token_id: int,
    *,
    extras: dict[str, tuple[list[Tensor], float]] | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Left-pad prompts, right-pad completions (TRL's layout); ``extras`` are completion-aligned
    tensors padded on the right with their given value. Returns input_ids, attention_mask,
    completion_width and the padded extras."""
    prompt_ids = pad(prompts, padding_value=pad_token_id, padding_side="left", pad_to_multiple_of=pad_to_multiple_of)
    prompt_mask = pad(
        [torch.ones_like(p, dtype=torch.long) for p in prompts],
        padding_value=0,
        padding_side="left",
        pad_to_multiple_of=pad_to_multiple_of,
    )
    completion_ids = pad(
        completions, padding_value=pad_token_id, padding_side="right", pad_to_multiple_of=pad_to_multiple_of
    )
    completion_attn = pad(
        [torch.ones_like(c, dtype=torch.long) for c in completions],
        padding_value=0,
        padding_side="right",
        pad_to_multiple_of=pad_to_multiple_of,
    )
    out = {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
        "attention_mask": torch.cat([prompt_mask, completion_attn], dim=1),
        "completion_width": completion_ids.size(1),
    }
    for name, (values, fill) in (extras or {}).items():
        out[name] = pad(values, padding_value=fill, padding_side="right", pad_to_multiple_of=pad_to_multiple_of)
    return out


def sample_token_ids(
    model,
    prompt_ids: list[list[int]],
    *,
    generation_config: GenerationConfig,
    num_samples: int,
    batch_size: int,
    seed: int,
    pad_token_id: int,
    eos_ids: Sequence[int],
    progress: str | None = None,
) -> list[Samples]:
    """``num_samples`` completions per prompt (see the module docstring), as token ids cut after the
    first eos and a finished flag; ``progress`` names a tqdm bar (None: no bar)."""
    rows = [i for i in range(len(prompt_ids)) for _ in range(num_samples)]
    out: list[Samples] = [[] for _ in prompt_ids]
    device = next(model.parameters()).device
    starts = range(0, len(rows), batch_size)
    if progress is not None:
        starts = tqdm(starts, total=len(starts), desc=progress, unit="batch", leave=False)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(seed)
            for start in starts:
                chunk = rows[start : start + batch_size]
                prompts = [torch.tensor(prompt_ids[i], dtype=torch.long) for i in chunk]
                padded = pad_prompt_completion(prompts, [p[:0] for p in prompts], pad_token_id)
                width = padded["input_ids"].size(1)
                generated = model.generate(
                    input_ids=padded["input_ids"].to(device),
                    attention_mask=padded["attention_mask"].to(device),
                    generation_config=generation_config,
                )
                for r, i in enumerate(chunk):
                    out[i].append(cut_at_eos(generated[r, width:].tolist(), eos_ids))
    finally:
        model.train(was_training)
    return out


@dataclass
class Completion:
    """One sampled completion: its text (up to, excluding, the first eos) and token ids."""

    text: str
    token_ids: list[int]
    finished: bool  # an eos token ended it (False: it ran out of max_new_tokens)


def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict[str, Any]]],
    *,
    num_samples: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 256,
    seed: int = 0,
) -> list[list[Completion]]:
    """`num_samples` decoded completions per prompt (chat template with the generation prompt; a str
    prompt is one user turn), through :func:`sample_token_ids`.

    Pure ancestral sampling at `temperature` (top-k disabled, nucleus `top_p`; temperature 0 is greedy).
    Each completion ends before its first eos token and is decoded WITHOUT skipping special tokens, so
    a stray role marker inside an answer stays visible to the verifier (and makes it malformed).
    """
    do_sample = do_sample and temperature > 0  # temperature 0 means greedy
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = sorted(set(eos_token_ids(model, tokenizer)))
    gen_config = GenerationConfig(
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    drawn = sample_token_ids(
        model,
        [render_prompt_ids(tokenizer, p) for p in prompts],
        generation_config=gen_config,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        pad_token_id=pad_id,
        eos_ids=eos_ids,
    )
    results: list[list[Completion]] = []
    for per_prompt in drawn:
        row = []
        for ids, finished in per_prompt:
            ids = ids[:-1] if finished else ids  # the text ends before the eos
            row.append(Completion(tokenizer.decode(ids, skip_special_tokens=False), ids, finished))
        results.append(row)
    return results


__all__ = [
    "Completion",
    "Samples",
    "cut_at_eos",
    "eos_token_ids",
    "pad_prompt_completion",
    "render_prompt_ids",
    "sample_completions",
    "sample_token_ids",
]
