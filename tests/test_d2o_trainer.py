"""FD2OTrainer (D2O, docs/objectives.md §5) and its cache of reference samples.

- The sample cache: reused when everything matches; a different sampling setting, tokenizer, reference,
  prompt set or an edited file is detected (StaleSampleCacheError naming the field); an interrupted cache
  (no sidecar) is regenerated; `regenerate` overwrites.
- The collator's row layout, and the reference log-probs the trainer precomputes against a direct
  Hugging Face forward written here; the first loss is log 2 (π = π_ref, so z = 0).
- End to end on the tiny task (slow): from the SFT checkpoint, D2O lowers the negatives' likelihood
  relative to the reference while fresh samples of the reference keep theirs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trainer_args import CPU_TRAINER_ARGS

from fdpo.data import reference_samples as rs
from fdpo.data.reference_samples import (
    SamplingSettings,
    StaleSampleCacheError,
    load_or_generate_reference_samples,
)
from fdpo.trainers.d2o import DataCollatorForD2O, FD2OConfig, FD2OTrainer

REPO = Path(__file__).resolve().parents[1]
COMMON = {
    **CPU_TRAINER_ARGS,
    "max_length": 48,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _negatives(task_data_dir: Path, n: int) -> list[dict]:
    with open(task_data_dir / "negatives.jsonl") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def direct_seq_logp(model, tok, prompt: list[dict], completion: list[dict]) -> float:
    """log π(completion | prompt) by one plain forward: log-softmax of the logits, summed over completion tokens."""
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    return float(sum(logp[t, targets[t]] for t in range(n - 1, len(full) - 1)))


# ---------------------------------------------------------------------------------------------------------------
# the cache


def test_sample_cache_reuse_and_stale_detection(tiny_model_dir, tmp_path, monkeypatch):
    model, tok = _load(tiny_model_dir)
    prompts = [
        [{"role": "user", "content": "Which two numbers add up to 3?"}],
        [{"role": "user", "content": "Find two numbers that sum to 7."}],
        [{"role": "user", "content": "Which two numbers add up to 3?"}],  # duplicate: sampled once
    ]
    settings = SamplingSettings(num_samples=2, max_new_tokens=4, seed=1)
    path = tmp_path / "samples.jsonl"
    first = load_or_generate_reference_samples(model, tok, prompts, settings, path)
    assert len(first) == 2 and all(len(v) == 2 for v in first.values())
    meta = json.loads(rs.meta_path(path).read_text())
    assert meta["sampling"]["num_samples"] == 2 and meta["num_prompts"] == 2

    calls = []
    import fdpo.data.sampler as sampling  # looked up at call time by the cache

    original = sampling.sample_completions

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(sampling, "sample_completions", counting)
    assert load_or_generate_reference_samples(model, tok, prompts, settings, path) == first
    assert calls == []  # reused, not sampled again

    def stale(match, *, m=model, t=tok, p=prompts, s=settings):
        with pytest.raises(StaleSampleCacheError, match=match):
            load_or_generate_reference_samples(m, t, p, s, path)

    stale(
        "sampling.temperature", s=SamplingSettings(num_samples=2, max_new_tokens=4, seed=1, temperature=0.7)
    )
    stale("sampling.num_samples", s=SamplingSettings(num_samples=3, max_new_tokens=4, seed=1))
    stale("prompts_fingerprint", p=prompts[:1])
    _, other_tok = _load(tiny_model_dir)
    other_tok.chat_template = other_tok.chat_template + " "
    stale("tokenizer_fingerprint", t=other_tok)
    other_model, _ = _load(tiny_model_dir)
    with torch.no_grad():
        next(other_model.parameters()).add_(1e-3)
    stale("reference_fingerprint", m=other_model)

    text = path.read_text()
    path.write_text(text.replace('"samples": ["', '"samples": ["x', 1))
    stale("file_sha256")
    assert calls == []

    # regenerate overwrites; a cache without sidecar (interrupted) is sampled again
    load_or_generate_reference_samples(model, tok, prompts, settings, path, regenerate=True)
    assert len(calls) == 1
    assert load_or_generate_reference_samples(model, tok, prompts, settings, path) == first  # same seed
    rs.meta_path(path).unlink()
    load_or_generate_reference_samples(model, tok, prompts, settings, path)
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match="no longer the reference"):
        load_or_generate_reference_samples(
            model, tok, prompts, settings, tmp_path / "none.jsonl", allow_generate=False
        )


def test_collator_layout():
    examples = [
        {
            "prompt_ids": [1, 2],
            "sample_ids": [[3], [4, 5]],
            "rejected_ids": [6, 7, 8],
            "ref_chosen_logps": [-1.0, -2.0],
            "ref_rejected_logps": -3.0,
        },
        {
            "prompt_ids": [9],
            "sample_ids": [[10, 11], [12]],
            "rejected_ids": [13],
            "ref_chosen_logps": [-4.0, -5.0],
            "ref_rejected_logps": -6.0,
        },
    ]
    out = DataCollatorForD2O(pad_token_id=0)(examples)
    expected_rows = [[1, 2, 3], [1, 2, 4, 5], [9, 10, 11], [9, 12], [1, 2, 6, 7, 8], [9, 13]]
    for row, exp in zip(out["input_ids"].tolist(), expected_rows):
        assert row[: len(exp)] == exp and all(t == 0 for t in row[len(exp) :])
    assert out["completion_mask"][1].tolist() == [0, 0, 1, 1, 0]
    assert out["completion_mask"][4].tolist() == [0, 0, 1, 1, 1]
    assert out["attention_mask"][3].tolist() == [1, 1, 0, 0, 0]
    assert out["ref_samples_logps"].tolist() == [[-1.0, -2.0], [-4.0, -5.0]]
    assert out["ref_rejected_logps"].tolist() == [-3.0, -6.0]


# ---------------------------------------------------------------------------------------------------------------
# the trainer


def _trainer(model_dir: Path, data: list[dict], out: Path, **config) -> FD2OTrainer:
    from datasets import Dataset

    model, tok = _load(model_dir)
    args = FD2OConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_reference_samples=2,
        sample_max_new_tokens=8,
        **{**COMMON, **config},
    )
    return FD2OTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)


@pytest.mark.parametrize("precompute", [True, False])
def test_reference_logps_and_first_loss(tiny_model_dir, task_data_dir, tmp_path, precompute):
    data = _negatives(task_data_dir, 8)
    trainer = _trainer(
        tiny_model_dir, data, tmp_path / "out", precompute_ref_log_probs=precompute, max_steps=1
    )
    samples = rs.read_reference_samples(tmp_path / "out" / "d2o_reference_samples.train.jsonl")
    ref, tok = _load(tiny_model_dir)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ref_s, ref_l = trainer.compute_ref_log_probs(trainer.model, batch)
    assert ref_s.shape == (4, 2) and ref_l.shape == (4,)
    for i in range(4):
        row = data[i]
        texts = samples[rs.prompt_key(row["prompt"])]
        expect_l = direct_seq_logp(ref, tok, row["prompt"], row["rejected"])
        assert ref_l[i].item() == pytest.approx(expect_l, abs=1e-4)
        for k, text in enumerate(texts):
            expect = direct_seq_logp(ref, tok, row["prompt"], [{"role": "assistant", "content": text}])
            assert ref_s[i, k].item() == pytest.approx(expect, abs=1e-4)
        if precompute:
            stored = trainer.train_dataset[i]
            assert stored["ref_chosen_logps"] == pytest.approx(ref_s[i].tolist(), abs=1e-4)
            assert stored["ref_rejected_logps"] == pytest.approx(ref_l[i].item(), abs=1e-4)
    if precompute:
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-4)  # π = π_ref: z = 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())


def test_lora_adapter_reference_is_base(tiny_model_dir, task_data_dir, tmp_path):
    """LoRA: the reference is the base with the adapter disabled (online, with gradient checkpointing); the
    base's fingerprint is the same with the adapter injected, so the sample cache stays valid."""
    from datasets import Dataset
    from peft import LoraConfig

    model, tok = _load(tiny_model_dir)
    before = rs.model_fingerprint(model)
    args = FD2OConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_reference_samples=2,
        sample_max_new_tokens=8,
        max_steps=2,
        learning_rate=1e-2,
        precompute_ref_log_probs=False,
        gradient_checkpointing=True,
        **COMMON,
    )
    trainer = FD2OTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_negatives(task_data_dir, 8)),
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert rs.model_fingerprint(trainer.model) == before
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)  # adapter B = 0: π = π_ref
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert logs[1]["d2o/margin"] != 0.0  # the adapter moved the policy away from the (adapter-off) reference


def test_config_and_recipe():
    from fdpo.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "tiny" / "d2o" / "d2o.yaml")
    cfg = recipe.training_args
    assert recipe.recipe_args.trainer == "d2o" and isinstance(cfg, FD2OConfig)
    assert (cfg.beta, cfg.d2o_alpha, cfg.num_reference_samples, cfg.precompute_ref_log_probs) == (
        0.1,
        0.1,
        4,
        True,
    )
    with pytest.raises(ValueError, match="loss_type"):
        FD2OConfig(
            output_dir="x", loss_type="hinge", **{k: v for k, v in COMMON.items() if k != "max_length"}
        )
    with pytest.raises(ValueError, match="temperature"):
        FD2OConfig(
            output_dir="x", sample_temperature=0.0, **{k: v for k, v in COMMON.items() if k != "max_length"}
        )


@pytest.mark.slow
def test_d2o_lowers_negatives_and_keeps_self_samples(tiny_sft_dir, task_data_dir, tmp_path):
    from fdpo.eval.sampling import sample_completions
    from fdpo.recipe import load_recipe
    from fdpo.train import run_training

    out = tmp_path / "d2o"
    overrides = {
        "model_name_or_path": str(tiny_sft_dir),
        "dataset_name": str(task_data_dir / "negatives.jsonl"),
        "output_dir": str(out),
        "max_steps": 30,
        "learning_rate": 2e-4,
        "warmup_steps": 3,
        "logging_steps": 10,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    metrics = run_training(load_recipe(REPO / "recipes" / "tiny" / "d2o" / "d2o.yaml", overrides))
    assert metrics["global_step"] == 30
    ref, tok = _load(tiny_sft_dir)
    pol, _ = _load(out)
    ref.eval()
    pol.eval()
    rows = _negatives(task_data_dir, 48)
    neg = [
        direct_seq_logp(pol, tok, r["prompt"], r["rejected"])
        - direct_seq_logp(ref, tok, r["prompt"], r["rejected"])
        for r in rows
    ]
    prompts = [r["prompt"] for r in rows[:16]]
    fresh = sample_completions(
        ref, tok, prompts, num_samples=3, max_new_tokens=16, seed=12345
    )  # not the cached ones
    own = []
    for p, comps in zip(prompts, fresh):
        for c in comps:
            msg = [{"role": "assistant", "content": c.text}]
            own.append(direct_seq_logp(pol, tok, p, msg) - direct_seq_logp(ref, tok, p, msg))
    mean_neg, mean_own = sum(neg) / len(neg), sum(own) / len(own)
    assert mean_neg < -0.3, (mean_neg, mean_own)  # the negatives lost likelihood relative to the reference
    assert mean_own > -0.25, (mean_neg, mean_own)  # the reference's own samples kept theirs
    assert mean_own - mean_neg > 0.3
