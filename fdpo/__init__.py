"""fdpo: divergence-regularised post-training on the Hugging Face stack.

The divergence that ties a policy to its reference model is a choice: every objective takes its
regulariser from one registry of f-divergences (`fdpo.divergences`).
"""

__version__ = "0.1.0"
