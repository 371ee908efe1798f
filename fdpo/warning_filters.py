"""Warnings that fdpo cannot prevent, filtered narrowly (message + category + module) while fdpo trains.

What fdpo can prevent it prevents at the source instead (`fdpo.recipe.load`: `dataloader_pin_memory`
off without an accelerator, transformers' current `activation_checkpointing` name for TRL's default).
What remains here is emitted by a dependency's own code on fdpo's default path, whatever the recipe:

- TRL 1.16's `trl.models.utils` helpers (`disable_gradient_checkpointing`, used by TRL's DPO and GRPO
  trainers around every reference / old-policy forward, and `unwrap_model_for_generation`, around every
  GRPO generation) still call transformers 5's deprecated `is_gradient_checkpointing`,
  `gradient_checkpointing_disable` and `gradient_checkpointing_enable` aliases: a FutureWarning from
  `transformers.modeling_utils` per call, addressed to TRL, not to the user.

Each filter names the exact message, the category and the emitting module, so any other warning,
including the same deprecation raised from a user's own code path in another module, still shows.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (message regex matched at the start of the message, category, module regex of the warning's origin)
UNPREVENTABLE: tuple[tuple[str, type[Warning], str], ...] = (
    (
        r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is "
        r"deprecated and will be removed in v6\. Use `(is_activation_checkpointing|activation_checkpointing_enable|"
        r"activation_checkpointing_disable)` instead\.",
        FutureWarning,
        r"transformers\.modeling_utils\Z",
    ),
)


@contextmanager
def unpreventable_warnings_filtered() -> Iterator[None]:
    """Ignore the `UNPREVENTABLE` warnings inside the block; the previous filters are restored after it."""
    with warnings.catch_warnings():
        for message, category, module in UNPREVENTABLE:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield
