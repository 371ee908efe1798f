"""Pure loss functions: tensors in → (loss, metrics) out; no Trainer, no model (docs/architecture.md)."""

from fdpo.losses.chi2 import chi2_penalty, chi2_terms
from fdpo.losses.d2o import d2o_loss
from fdpo.losses.disco import disco_kl, disco_loss, disco_scores
from fdpo.losses.fdpg import FDPGState, fdpg_loss

__all__ = [
    "FDPGState",
    "chi2_penalty",
    "chi2_terms",
    "d2o_loss",
    "disco_kl",
    "disco_loss",
    "disco_scores",
    "fdpg_loss",
]
