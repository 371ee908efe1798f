"""Batched sampling of completions for evaluation: fdpo's one sampler (fdpo/data/sampler.py), re-exported."""

from fdpo.data.sampler import Completion, render_prompt_ids, sample_completions

__all__ = ["Completion", "render_prompt_ids", "sample_completions"]
