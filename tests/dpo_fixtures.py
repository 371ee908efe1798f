"""Shared pieces of the f-DPO loss and trainer tests: a stand-in for the fused-head model, a collated
preference batch with chosen per-token log-probs, and a tiny word-level tokenizer, model and dataset.
Fixtures, not oracles (the oracles are in tests/truth.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

#: what fdpo_loss reports besides div/<label> (the trainer adds TRL's own metrics to these)
LOSS_METRICS = {
    "scores/chosen",
    "scores/rejected",
    "scores/margins",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
}


class FakePolicy:
    """Stands in for the fused-head model: returns the given per-token log-probs (zero off the completion)."""

    def __init__(self, per_token_logps: torch.Tensor):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        p = self.per_token_logps
        return SimpleNamespace(
            log_probs=p,
            entropy=torch.zeros_like(p.detach()),
            mean_logits=torch.zeros_like(p.detach()),
            is_top1=torch.zeros(p.shape, dtype=torch.bool),
            log_sum_sq_probs=torch.full_like(p.detach(), -0.5),
        )


def fake_batch(n_pairs: int, seq: int, seed: int, low: float = -4.0, high: float = 4.0):
    """A collated preference batch ([chosen; rejected]) with per-token log-probs and precomputed reference sums."""
    g = torch.Generator().manual_seed(seed)
    prompt = 3
    lengths = torch.randint(1, seq - prompt + 1, (2 * n_pairs,), generator=g)
    pos = torch.arange(seq)
    completion_mask = ((pos >= prompt) & (pos < prompt + lengths[:, None])).long()
    attention_mask = (pos < prompt + lengths[:, None]).long()
    input_ids = torch.randint(3, 30, (2 * n_pairs, seq), generator=g) * attention_mask
    shift = completion_mask[:, 1:].double()
    per_token = -torch.rand(2 * n_pairs, seq - 1, generator=g, dtype=torch.float64) * 3 * shift
    logr = low + (high - low) * torch.rand(2 * n_pairs, generator=g, dtype=torch.float64)
    ref = per_token.sum(dim=1) - logr
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:n_pairs].float(),
        "ref_rejected_logps": ref[n_pairs:].float(),
    }
    return inputs, per_token.float()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>", ":"] + [str(i) for i in range(10)] + [f"w{i}" for i in range(18)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def tiny_preference_dataset(n: int = 4):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["1 2 :"] * n, "chosen": [" 4"] * n, "rejected": [" 5"] * n})
