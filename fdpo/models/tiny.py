"""`build_tiny_model`: the offline tiny model and tokenizer of fdpo's embedded default.

A small decoder-only model from transformers' own classes (`LlamaForCausalLM` or
`Qwen2ForCausalLM`, randomly initialised from `seed`) and a byte-level BPE tokenizer trained on
the synthetic task's text (`fdpo.models.tokenizer`), both written with `save_pretrained` so that
`AutoModelForCausalLM.from_pretrained(out_dir)` / `AutoTokenizer.from_pretrained(out_dir)` load
them exactly like a hub model. Nothing is downloaded.

Default shape: hidden 128, 4 layers, 4 heads, MLP 384, tied embeddings, vocab ≈ 315 for
`sum_pairs` → about 0.9M parameters; a 2-core CPU trains it on the task in about a minute.

Deterministic: the same arguments give byte-identical weight and tokenizer files. The global torch
RNG state is restored afterwards. `fdpo_tiny.json` (written last, so it marks a complete build)
records the arguments and the parameter count.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fdpo.models.tokenizer import train_tokenizer

ARCHS = ("llama", "qwen2")
MARKER = "fdpo_tiny.json"


def _config(arch: str, tokenizer, **shape: Any):
    from transformers import LlamaConfig, Qwen2Config

    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["num_layers"],
        "num_attention_heads": shape["num_heads"],
        "num_key_value_heads": shape["num_kv_heads"],
        "max_position_embeddings": shape["max_position_embeddings"],
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(use_sliding_window=False, **common)


def _corpus(task: str | Sequence[str]) -> list[str]:
    from fdpo.data.tasks import get_task

    names = [task] if isinstance(task, str) else list(task)
    return [text for name in names for text in get_task(name).corpus()]


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    task: str | Sequence[str] = "sum_pairs",
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 384,
    max_position_embeddings: int = 256,
    vocab_size: int = 512,
) -> Path:
    """Build, save and return `out_dir` holding the tiny model, its tokenizer and `fdpo_tiny.json`.

    `task` names the synthetic task(s) whose text trains the tokenizer (any text still round-trips:
    the tokenizer is byte-level). `vocab_size` caps the BPE vocabulary; the model's embedding
    matrix has exactly `len(tokenizer)` rows.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"tiny model: unknown arch {arch!r}; choose one of {ARCHS}")
    if hidden_size % num_heads:
        raise ValueError(f"tiny model: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)

    tokenizer = train_tokenizer(_corpus(task), vocab_size=vocab_size, model_max_length=max_position_embeddings)
    shape = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads or num_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
    }
    config = _config(arch, tokenizer, **shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=32,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    num_params = sum(p.numel() for p in model.parameters())
    meta = {
        "arch": arch,
        "seed": seed,
        "task": task if isinstance(task, str) else list(task),
        "num_parameters": num_params,
        "vocab_size": len(tokenizer),
        **shape,
    }
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out
