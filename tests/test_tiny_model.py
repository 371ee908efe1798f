"""The offline tiny model and tokenizer: save/load round trip, determinism, chat template, TRL compatibility."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fdpo.data.tasks import read_jsonl
from fdpo.models.tiny import MARKER, build_tiny_model
from fdpo.models.tokenizer import BOS, EOS, PAD

SMALL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_round_trip_same_logits(tiny_model_dir, tmp_path):
    model, tok = _load(tiny_model_dir)
    ids = tok("Write two numbers that add up to 27. 12+15", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "again")
    tok.save_pretrained(tmp_path / "again")
    model2, tok2 = _load(tmp_path / "again")
    with torch.no_grad():
        after = model2(ids).logits
    assert torch.equal(before, after)
    assert tok2("7+5")["input_ids"] == tok("7+5")["input_ids"]
    assert type(model2).__name__ == "LlamaForCausalLM"


def test_metadata_and_size(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    meta = json.loads((tiny_model_dir / MARKER).read_text())
    n_params = sum(p.numel() for p in model.parameters())
    assert meta["num_parameters"] == n_params
    assert 100_000 < n_params < 5_000_000
    assert meta["arch"] == "llama" and meta["seed"] == 0 and meta["task"] == "sum_pairs"
    assert model.config.vocab_size == len(tok) == meta["vocab_size"]
    assert model.config.tie_word_embeddings


def test_special_token_ids_consistent(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == (PAD, EOS, BOS)
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3
    for cfg in (model.config, model.generation_config):
        assert cfg.pad_token_id == tok.pad_token_id
        assert cfg.eos_token_id == tok.eos_token_id
        assert cfg.bos_token_id == tok.bos_token_id


def test_build_is_deterministic_for_a_seed(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3, **SMALL)
    b = build_tiny_model(tmp_path / "b", seed=3, **SMALL)
    c = build_tiny_model(tmp_path / "c", seed=4, **SMALL)
    files = sorted(p.name for p in a.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files and MARKER in files
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=7, **SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_qwen2_arch_loads_with_the_same_tokenizer(tmp_path):
    """AutoTokenizer picks its own Qwen2Tokenizer for qwen2 dirs; it must behave exactly like ours."""
    llama = build_tiny_model(tmp_path / "l", arch="llama", **SMALL)
    path = build_tiny_model(tmp_path / "q", arch="qwen2", **SMALL)
    model, tok = _load(path)
    ref = AutoTokenizer.from_pretrained(llama)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (path / "tokenizer.json").read_bytes() == (llama / "tokenizer.json").read_bytes()
    assert len(tok) == len(ref) == model.config.vocab_size and tok.unk_token is None
    msgs = [{"role": "user", "content": "Split 17 into two numbers."}, {"role": "assistant", "content": "9+8"}]
    for text in ("Write two numbers that add up to 27.", "héllo  wörld\n 12+150 ✓"):
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (ref.pad_token_id, ref.eos_token_id, ref.bos_token_id)
    out = model(tok("3+4", return_tensors="pt")["input_ids"])
    assert out.logits.shape[-1] == len(tok)


def test_unknown_arch_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arch 'gpt9'"):
        build_tiny_model(tmp_path / "x", arch="gpt9")


@pytest.mark.parametrize(
    "text",
    ["Write two numbers that add up to 27.", "12+15", "  7 + 5 \n", "héllo wörld ✓", "Zebra 1234567890 ?!", ""],
)
def test_tokenizer_round_trip(tiny_model_dir, text):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids  # nothing added silently


def test_digits_are_single_tokens(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = tok.convert_ids_to_tokens(tok("12+150 and 9876")["input_ids"])
    assert [t for t in tokens if any(ch.isdigit() for ch in t)] == list("12150") + list("9876")


def test_chat_template_prefix_eos_and_generation_prompt(tiny_model_dir, task_data_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assistant_id = tok.convert_tokens_to_ids("<|assistant|>")
    for row in read_jsonl(task_data_dir / "sft.jsonl")[:20]:
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)
        p_ids, f_ids = list(prompt["input_ids"]), list(full["input_ids"])
        assert f_ids[: len(p_ids)] == p_ids  # rendered prompt is a token prefix of prompt + completion
        assert p_ids[0] == tok.bos_token_id and p_ids[-1] == assistant_id
        assert f_ids[-1] == tok.eos_token_id
        assert tok.decode(f_ids[len(p_ids) :]) == row["completion"][0]["content"] + EOS
        no_gen = tok.apply_chat_template(row["prompt"], tokenize=True, return_dict=True)["input_ids"]
        assert list(no_gen) == p_ids[:-1]


def test_chat_template_renders_roles_and_rejects_unknown(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|bos|><|system|>S<|end|><|user|>U<|end|><|assistant|>A<|end|>"
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_answer_and_eos(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "user", "content": "Split 7 into two numbers."}, {"role": "assistant", "content": "3+4"}]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "3+4" + EOS


def test_trl_sft_tokenization_masks_exactly_the_completion(tiny_model_dir, task_data_dir, tmp_path):
    """TRL's own SFT preprocessing: the completion mask covers the answer and the eos, nothing else."""
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    ds = load_dataset("json", data_files=str(task_data_dir / "sft.jsonl"), split="train").select(range(16))
    model, tok = _load(tiny_model_dir)
    args = SFTConfig(output_dir=str(tmp_path), max_length=64, report_to=[], use_cpu=True, max_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    for raw, row in zip(ds, trainer.train_dataset):
        answer = [lab for lab in row["labels"] if lab != -100]  # TRL turns the completion mask into labels
        assert tok.decode(answer) == raw["completion"][0]["content"] + EOS
