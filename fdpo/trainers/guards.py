"""Stop training, with a message naming the step and the term, when anything goes non-finite.

docs/architecture.md: never let a loss go NaN silently. Losses in fdpo return their terms by name; trainers
pass them through `check_finite_terms` before backward, and `NonFiniteGradientCallback` checks
the gradients before each optimizer step. Both are on by default; a config with
`stop_on_non_finite: false` (the `NonFiniteStop` field every fdpo config has) lets a run continue
where TRL would let it continue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from fdpo.errors import UserError


@dataclass
class NonFiniteStop:
    """Config mixin: the switch of the non-finite stop (on by default)."""

    stop_on_non_finite: bool = field(
        default=True,
        metadata={
            "help": "Stop training with the step and the term named when a loss term or a gradient is NaN/inf "
            "(default). `false` lets the run continue as TRL would (the optimizer then applies what it gets)."
        },
    )


def stops_on_non_finite(args: Any) -> bool:
    """Whether the non-finite stop is on for these training arguments (plain TRL/transformers ones: yes)."""
    return bool(getattr(args, "stop_on_non_finite", True))


def add_non_finite_stop(trainer: Any) -> None:
    """Attach `NonFiniteGradientCallback` to `trainer` (once) when its args keep the stop on."""
    if stops_on_non_finite(trainer.args) and not any(
        isinstance(cb, NonFiniteGradientCallback) for cb in trainer.callback_handler.callbacks
    ):
        trainer.add_callback(NonFiniteGradientCallback())


def check_finite_if_enabled(args: Any, terms: Mapping[str, torch.Tensor | float], *, step: int) -> None:
    """`check_finite_terms` unless `args.stop_on_non_finite` is false."""
    if stops_on_non_finite(args):
        check_finite_terms(terms, step=step)


class NonFiniteError(UserError, RuntimeError):
    """Training produced a NaN or an infinity (the CLI reports it without a traceback, exit code 2)."""


def check_finite_terms(terms: Mapping[str, torch.Tensor | float], *, step: int) -> None:
    """Raise `NonFiniteError` naming `step` and the first non-finite term in `terms`."""
    for name, value in terms.items():
        tensor = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if not bool(torch.isfinite(tensor.detach()).all()):
            raise NonFiniteError(
                f"step {step}: the loss term '{name}' is not finite ({tensor.detach().float().flatten()[:4].tolist()}). "
                "Lower the learning rate or the divergence coefficient, check the data for empty completions, "
                "or use bf16/fp32 instead of fp16."
            )


class NonFiniteGradientCallback(TrainerCallback):
    """Before each optimizer step, stop if any parameter gradient is NaN/inf (names the parameter)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or not stops_on_non_finite(args):
            return
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm([g for _, g in grads])
        total = torch.stack([n.float() for n in norms]).sum()
        if bool(torch.isfinite(total)):
            return
        bad = next(name for (name, _), norm in zip(grads, norms) if not bool(torch.isfinite(norm)))
        clipping = args.max_grad_norm is not None and args.max_grad_norm > 0
        fix = "Lower the learning rate or the divergence coefficient"
        fix += " (gradient clipping, max_grad_norm, is on but cannot repair a NaN/inf)." if clipping else (
            ", or enable gradient clipping (max_grad_norm: 1.0)."
        )
        raise NonFiniteError(f"step {state.global_step + 1}: the gradient of '{bad}' is not finite. {fix}")
