"""KL(π ‖ π_ref) per completion token on the policy's own samples: how far a checkpoint moved from a reference.

For completions y ~ π of prompts x (the evaluation samples), the value is

    KL_tok = (1/N) Σ_{(x,y)} Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)),    N = Σ_{(x,y)} |y|,

each position's KL exact over the full vocabulary (fdpo's chunked `full_vocab_divergence` with
`reverse_kl`, D_f(π‖π_ref) = Σ_v π_ref f(π/π_ref), f(u) = u log u; docs/objectives.md §0-1), the prefixes
sampled from π. Its expectation is the sequence-level KL(π ‖ π_ref) per generated token.
The pipeline reports it as `kl_to_<stage>` (e.g. the KL of every later checkpoint to the SFT model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def kl_per_token(
    model,
    ref_model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 64,
) -> float:
    """Mean over completion tokens of the exact per-position KL(π ‖ π_ref) (formula in the module docstring).

    `prompt_ids[i]` / `completion_ids[i]` are the token ids of sample i (prompt rendered as for sampling).
    Both models must share the tokenizer; they run without gradients, left-padded, in batches.
    """
    sums = kl_token_sums(model, ref_model, prompt_ids, completion_ids, pad_id=pad_id, batch_size=batch_size)
    return sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1)


def kl_token_sums(
    model,
    ref_model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 64,
) -> list[tuple[float, int]]:
    """Per sample i: (Σ_t KL(π ‖ π_ref) over its completion positions, its number of completion tokens)."""
    import torch

    from fdpo.divergences import full_vocab_divergence, get_divergence

    kl = get_divergence("reverse_kl")
    device = next(model.parameters()).device
    out = [(0.0, 0)] * len(prompt_ids)
    rows = [i for i in range(len(prompt_ids)) if len(completion_ids[i]) > 0]
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            seqs = [list(prompt_ids[i]) + list(completion_ids[i]) for i in chunk]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            # mask[r, p] = 1 where the logits at position p predict a completion token
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for r, (i, s) in enumerate(zip(chunk, seqs)):
                off = width - len(s)
                input_ids[r, off:] = torch.tensor(s)
                attention[r, off:] = 1
                first = off + len(prompt_ids[i])
                mask[r, first - 1 : width - 1] = True
            kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
            logits = model(**kwargs).logits.float()
            ref_logits = ref_model(**kwargs).logits.float()
            per_pos = full_vocab_divergence(logits, ref_logits, kl, mask=mask.to(device))
            per_row = torch.where(mask.to(device), per_pos.double(), 0.0).sum(dim=1).cpu()
            for r, i in enumerate(chunk):
                out[i] = (float(per_row[r]), len(completion_ids[i]))
    return out
