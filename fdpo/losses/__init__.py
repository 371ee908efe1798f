"""Pure loss functions: tensors in → (loss, metrics) out; no Trainer, no model (DESIGN.md layers)."""

from fdpo.losses.disco import disco_kl, disco_loss, disco_scores

__all__ = ["disco_kl", "disco_loss", "disco_scores"]
