"""Batched sampling of completions for evaluation (left padding, chat template with generation prompt)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Completion:
    """One sampled completion: its text (up to, excluding, the first eos) and token ids."""

    text: str
    token_ids: list[int]
    finished: bool  # an eos token ended it (False: it ran out of max_new_tokens)


def render_prompt_ids(tokenizer, prompt: str | list[dict[str, Any]]) -> list[int]:
    """Token ids of a prompt via the chat template with the generation prompt (a str becomes one user turn)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return {i for i in ids if i is not None}


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
    """`num_samples` completions per prompt, sampled with `model.generate` in left-padded batches.

    Pure ancestral sampling at `temperature` (top-k disabled, nucleus `top_p`; temperature 0 is greedy). Each completion is
    cut at its first eos token and decoded WITHOUT skipping special tokens, so a stray role marker
    inside an answer stays visible to the verifier (and makes it malformed). Seeded from `seed`;
    the global torch RNG state is restored afterwards.
    """
    import torch
    from transformers import GenerationConfig

    do_sample = do_sample and temperature > 0  # temperature 0 means greedy
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    gen_config = GenerationConfig(
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(eos_ids),
        pad_token_id=pad_id,
    )
    prompt_ids = [render_prompt_ids(tokenizer, p) for p in prompts]
    rows = [i for i in range(len(prompts)) for _ in range(num_samples)]
    results: list[list[Completion]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                width = max(len(prompt_ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, i in enumerate(chunk):
                    ids = prompt_ids[i]
                    input_ids[r, width - len(ids) :] = torch.tensor(ids)
                    attention[r, width - len(ids) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=gen_config,
                )
                for r, i in enumerate(chunk):
                    new = out[r, width:].tolist()
                    cut = next((j for j, t in enumerate(new) if t in eos_ids), None)
                    ids = new if cut is None else new[:cut]
                    text = tokenizer.decode(ids, skip_special_tokens=False)
                    results[i].append(Completion(text=text, token_ids=ids, finished=cut is not None))
    finally:
        model.train(was_training)
    return results
