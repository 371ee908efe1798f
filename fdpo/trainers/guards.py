"""Stop training, with a message naming the step and the term, when anything goes non-finite.

docs/architecture.md: never let a loss go NaN silently. Losses in fdpo return their terms by name; trainers
pass them through `check_finite_terms` before backward, and `NonFiniteGradientCallback` checks
the gradients before each optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import TrainerCallback

from fdpo.errors import UserError


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
        if model is None:
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
