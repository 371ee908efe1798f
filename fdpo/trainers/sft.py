"""`FSFTTrainer`: TRL's SFTTrainer with fdpo's safety rails.

Loss (plain SFT): mean negative log-likelihood of the completion tokens,
L = −(1/N) Σ_t log π(y_t | x, y_<t), exactly TRL's `SFTTrainer` loss. The f-divergence regulariser
(γ·D_f(π‖π_ref), "Implicit Reward as the Bridge", 2025) plugs in here as a loss from
`fdpo.losses`; this class only gathers tensors and checks that every term stays finite.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from fdpo.trainers.guards import check_finite_terms


@dataclass
class FSFTConfig(SFTConfig):
    """Configuration of `FSFTTrainer`: every field of `trl.SFTConfig`."""


class FSFTTrainer(SFTTrainer):
    """Supervised fine-tuning; stops with the step and term named if the loss goes non-finite."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if isinstance(result, tuple) else result
        if model.training:
            check_finite_terms({"nll": loss}, step=self.state.global_step + 1)
        return result
