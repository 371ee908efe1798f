"""Models: the offline tiny model and tokenizer of the embedded default (`fdpo tiny`)."""

from fdpo.models.tiny import build_tiny_model

__all__ = ["build_tiny_model"]
