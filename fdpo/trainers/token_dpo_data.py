"""Decisive-token marks for token-level DPO data: the collator column and the span → token mapping.

A preference row may carry ``chosen_decisive_spans`` / ``rejected_decisive_spans`` (character spans of the
completion text that decide the preference, written by fdpo's synthetic tasks). `TokenDPOTrainer` turns them
into per-token flags (`decisive_token_flags`) and `DecisiveCollator` aligns the flags with ``input_ids``, so
SparsePO's masks can be logged on decisive vs other tokens (``mask/<name>/decisive``, ``mask/<name>/other``).
"""

from __future__ import annotations

from typing import Any

import torch

DECISIVE_COLUMNS = ("chosen_decisive", "rejected_decisive")


class DecisiveCollator:
    """TRL's preference collator plus ``decisive_mask`` (2B, T): 1 on completion tokens the data marks as
    decisive (columns ``chosen_decisive`` / ``rejected_decisive``, per completion token), aligned with
    ``input_ids`` (same truncation and right padding)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.inner(examples)
        if not examples or DECISIVE_COLUMNS[0] not in examples[0]:
            return out
        rows = [[0] * len(e["prompt_ids"]) + list(e["chosen_decisive"]) for e in examples]
        rows += [[0] * len(e["prompt_ids"]) + list(e["rejected_decisive"]) for e in examples]
        max_length = getattr(self.inner, "max_length", None)
        if max_length is not None:
            keep_end = getattr(self.inner, "truncation_mode", "keep_start") == "keep_end"
            rows = [r[-max_length:] if keep_end else r[:max_length] for r in rows]
        width = out["input_ids"].shape[1]
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            mask[i, : len(r)] = torch.tensor(r[:width], dtype=torch.long)
        out["decisive_mask"] = mask
        return out


def content(message: Any) -> str:
    if isinstance(message, str):
        return message
    return "".join(m["content"] for m in message if m.get("role") == "assistant")


def decisive_token_flags(
    tokenizer: Any, completion_ids: list[int], content: str, spans: list[list[int]]
) -> list[int]:
    """1 for each completion token whose decoded characters overlap a decisive ``[start, end)`` span of
    ``content`` (the completion text); all 0 when the content cannot be located in the decoded tokens."""
    decoded = [tokenizer.decode(completion_ids[:k]) for k in range(len(completion_ids) + 1)]
    offset = decoded[-1].find(content)
    if offset < 0 or not spans:
        return [0] * len(completion_ids)
    flags = []
    for k in range(len(completion_ids)):
        a, b = len(decoded[k]), len(decoded[k + 1])
        flags.append(int(any(a < offset + e and b > offset + s for s, e in spans)))
    return flags
