"""TokenDPOTrainer (TDPO1/TDPO2/SparsePO/MaPO) on the tiny model and the sum_pairs preference data.

- The trainer's TDPO1 loss and gradient equal a direct float64 computation from both models' full logits
  (policy ≠ reference), so the gathering (shifts, completion masks, chunked KL from hidden states) is right.
- Reward-only / KL-only / common / independent learned masks, MaPO and TDPO2 all train a few steps with
  finite losses, log their metrics (mask sparsity, decisive vs other, div/forward_kl) and update the masks.
- Mask parameters have their own param group (mask_weight_decay), are saved with each checkpoint and are
  reloaded on resume: a resumed run ends exactly where the uninterrupted run does.
- The recipes load (tiny ones and the GPU one), and bad configs are rejected with the reason.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trainer_args import CPU_TRAINER_ARGS

from fdpo.trainers.token_dpo import MASK_FILE, TokenDPOConfig, TokenDPOTrainer

REPO = Path(__file__).resolve().parents[1]
COMMON = {
    **CPU_TRAINER_ARGS,
    "max_length": 64,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def preference(task_data_dir):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(Path(task_data_dir) / "preference.jsonl"), split="train")


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _trainer(model_dir, data, out, *, ref_model=None, **config) -> TokenDPOTrainer:
    model, tok = _load(model_dir)
    kw = {**COMMON, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "max_steps": 3, **config}
    args = TokenDPOConfig(output_dir=str(out), **kw)
    return TokenDPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok
    )


def _direct_tdpo1(policy, ref, batch, beta: float) -> torch.Tensor:
    """TDPO1 from full logits in float64: r_t, KL_t = Σ_v π_ref (log π_ref − log π), −log σ(β z) averaged."""
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    lp = torch.log_softmax(policy(**kw).logits[:, :-1].double(), dim=-1)
    with torch.no_grad():
        lq = torch.log_softmax(ref(**kw).logits[:, :-1].double(), dim=-1)
    targets = batch["input_ids"][:, 1:].unsqueeze(-1)
    mask = batch["completion_mask"][:, 1:].double()
    r = (lp.gather(-1, targets) - lq.gather(-1, targets)).squeeze(-1) * mask
    kl = (lq.exp() * (lq - lp)).sum(-1) * mask
    rw, rl = r.sum(1).chunk(2)
    kw_, kl_ = kl.sum(1).chunk(2)
    z = rw - rl + kw_ - kl_
    return -torch.log(torch.sigmoid(beta * z)).mean()


def test_trainer_tdpo1_equals_direct_full_logit_computation(tiny_model_dir, preference, tmp_path):
    ref, _ = _load(tiny_model_dir)
    with torch.no_grad():  # a reference different from the policy
        g = torch.Generator().manual_seed(0)
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    trainer = _trainer(
        tiny_model_dir, preference.select(range(8)), tmp_path, ref_model=ref, objective="tdpo1", beta=0.7
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, batch, False)
    head = trainer.model.get_output_embeddings().weight
    (grad,) = torch.autograd.grad(loss, head)
    truth = _direct_tdpo1(trainer.model, trainer.ref_model, batch, 0.7)
    (grad_truth,) = torch.autograd.grad(truth, head)
    assert abs(float(truth.detach()) - math.log(2)) > 1e-3  # policy ≠ reference: not the trivial value
    torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad_truth.double(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mask", ["activations", "sparse"])
def test_one_token_and_empty_completions_stay_finite(tiny_model_dir, preference, tmp_path, mask):
    """A completion cut to one token and a row with no completion token (fully padded) give a finite loss and
    finite gradients (the released MaPO code gives NaN on one-token completions)."""
    trainer = _trainer(tiny_model_dir, preference.select(range(8)), tmp_path, mask=mask)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    cm = batch["completion_mask"]
    first = cm[0].nonzero()[0, 0]
    cm[0, first + 1 :] = 0  # chosen of pair 0: one token
    cm[5] = 0  # rejected of pair 1: no completion token at all
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    assert torch.isfinite(loss)
    params = list(trainer.model.parameters()) + list(
        trainer.token_masks.parameters() if trainer.token_masks is not None else []
    )
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)


VARIANTS = {
    "common": {"mask": "sparse", "mask_mode": "common", "l1_reward": 1e-3, "l1_kl": 1e-3},
    "independent": {"mask": "sparse", "mask_mode": "independent", "l1_reward": 1e-3, "l1_kl": 1e-3},
    "reward_only": {"mask": "sparse", "mask_targets": ["reward"], "l1_reward": 1e-3},
    "kl_only": {"mask": "sparse", "mask_mode": "independent", "mask_targets": ["kl"], "l1_kl": 1e-3},
    "mapo": {"mask": "activations"},
    "tdpo2": {"objective": "tdpo2", "tdpo_alpha": 0.5},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_train(tiny_model_dir, preference, tmp_path, name):
    trainer = _trainer(tiny_model_dir, preference.select(range(12)), tmp_path, **VARIANTS[name])
    before = None
    if trainer.token_masks is not None:
        before = {k: v.clone() for k, v in trainer.token_masks.state_dict().items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    last = logs[-1]
    for key in (
        "rewards/margins",
        "rewards/accuracies",
        "div/forward_kl",
        "kl/chosen",
        "logps/chosen",
        "entropy",
    ):
        assert key in last and math.isfinite(last[key]), key
    if name == "mapo":
        assert {"mask/activations/sparsity", "mask/activations/decisive", "mask/activations/other"} <= set(
            last
        )
    if before is not None:
        targets = VARIANTS[name].get("mask_targets", ["reward", "kl"])
        mode = VARIANTS[name].get("mask_mode", "common")
        names = ["common"] if (mode == "common" and len(targets) == 2) else targets
        for n in names:
            assert {f"mask/{n}/sparsity", f"mask/{n}/mean", f"mask/{n}/decisive", f"mask/{n}/other"} <= set(
                last
            )
        after = trainer.token_masks.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), "mask parameters did not train"
        groups = trainer.optimizer.param_groups
        mask_ids = {id(p) for p in trainer.token_masks.parameters()}
        mask_groups = [g for g in groups if any(id(p) in mask_ids for p in g["params"])]
        assert len(mask_groups) == 1 and mask_groups[0]["weight_decay"] == trainer.args.mask_weight_decay
        assert {id(p) for p in mask_groups[0]["params"]} == mask_ids


@pytest.mark.slow
def test_lora_adapter_with_base_as_reference(tiny_model_dir, preference, tmp_path):
    """peft LoRA, no ref_model: the reference is the base with the adapter disabled (policy = reference at step 1)."""
    from peft import LoraConfig

    model, tok = _load(tiny_model_dir)
    args = TokenDPOConfig(
        output_dir=str(tmp_path),
        mask="sparse",
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        gradient_checkpointing=True,
        **COMMON,
    )
    trainer = TokenDPOTrainer(
        model=model,
        args=args,
        train_dataset=preference.select(range(12)),
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["kl/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logs[-1]["kl/chosen"] > 0  # the adapter moved the policy away from the base


@pytest.mark.slow
def test_resume_reloads_mask_parameters(tiny_model_dir, preference, tmp_path):
    data = preference.select(range(16))
    config = {
        "mask": "sparse",
        "mask_mode": "independent",
        "save_strategy": "steps",
        "save_steps": 2,
        "max_steps": 3,
    }
    full = _trainer(tiny_model_dir, data, tmp_path / "full", **config)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / MASK_FILE).is_file() and (tmp_path / "full" / "checkpoint-3" / MASK_FILE).is_file()

    resumed = _trainer(tiny_model_dir, data, tmp_path / "resumed", **config)
    fresh = {k: v.clone() for k, v in resumed.token_masks.state_dict().items()}
    resumed._load_from_checkpoint(str(ckpt))
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / MASK_FILE))
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved)
    for k, v in resumed.token_masks.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for k, v in resumed.token_masks.state_dict().items():  # same end point as the uninterrupted run
        torch.testing.assert_close(v, full.token_masks.state_dict()[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_learned_mask_moves_onto_decisive_tokens(tiny_sft_dir, preference, tmp_path):
    """SparsePO (common mask) from the SFT model: on held-out pairs, the mean mask on the decisive tokens (where
    chosen and rejected differ, from the data's character spans) vs on the other completion tokens: after 40 steps
    it is higher on the decisive tokens, and the ratio decisive/other grew from its value at initialisation
    (where, with seed 0, the mask is lower on the decisive tokens: ratio ≈ 0.6; after training ≈ 2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = TokenDPOConfig(
        output_dir=str(tmp_path),
        objective="sparsepo",
        mask="sparse",
        mask_mode="common",
        l1_reward=3e-3,
        l1_kl=3e-3,
        beta=0.8,
        learning_rate=3e-5,
        mask_learning_rate=1e-2,
        max_steps=40,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=64,
        prediction_loss_only=True,
        seed=0,
        **{**COMMON, "logging_steps": 40},
    )
    trainer = TokenDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_sft_dir),
        args=args,
        train_dataset=preference.select(range(320)),
        eval_dataset=preference.select(range(1000, 1064)),  # pairs not trained on
        processing_class=AutoTokenizer.from_pretrained(tiny_sft_dir),
    )

    def ratio(metrics):  # scale-free: L1 and weight decay shrink the whole mask
        return metrics["eval_mask/common/decisive"] / metrics["eval_mask/common/other"]

    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_mask/common/decisive"] > after["eval_mask/common/other"], after
    assert ratio(after) > ratio(before), (before, after)


def test_config_rejects_what_token_objectives_cannot_do():
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        TokenDPOConfig(output_dir="/tmp/x", objective="tdpo1", precompute_ref_log_probs=True, **COMMON)
    with pytest.raises(ValueError, match="loss_type"):
        TokenDPOConfig(output_dir="/tmp/x", objective="sparsepo", loss_type=["hinge"], **COMMON)
    with pytest.raises(ValueError, match="mask_targets"):
        TokenDPOConfig(output_dir="/tmp/x", mask_targets=["rewards"], **COMMON)
    with pytest.raises(ValueError, match="objective"):
        TokenDPOConfig(output_dir="/tmp/x", objective="sparse_po", **COMMON)
    with pytest.raises(ValueError, match="uses no token mask"):
        TokenDPOConfig(output_dir="/tmp/x", objective="tdpo1", mask="sparse", **COMMON)
    assert TokenDPOConfig(output_dir="/tmp/x", objective="tdpo2", **COMMON).mask == "none"
    assert TokenDPOConfig(output_dir="/tmp/x", **COMMON).mask == "sparse"


TOKEN_RECIPES = {
    "sparsepo_common.yaml": {"objective": "sparsepo", "mask": "sparse", "mask_mode": "common"},
    "sparsepo_independent.yaml": {"objective": "sparsepo", "mask": "sparse", "mask_mode": "independent"},
    "mapo.yaml": {"objective": "sparsepo", "mask": "activations"},
    "tdpo2.yaml": {"objective": "tdpo2", "mask": "none"},
}


@pytest.mark.parametrize("name", list(TOKEN_RECIPES))
def test_tiny_token_recipes_load(name):
    from fdpo.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "tiny" / "token_dpo" / name)
    assert recipe.recipe_args.trainer == "token_dpo"
    cfg = recipe.training_args
    assert isinstance(cfg, TokenDPOConfig) and not cfg.precompute_ref_log_probs
    for key, value in TOKEN_RECIPES[name].items():
        assert getattr(cfg, key) == value, key
    assert recipe.model_args.model_name_or_path == "runs/tiny/sft"


def test_gpu_sparsepo_recipe_loads_without_a_model():
    from fdpo.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "qwen2.5-0.5b" / "token_dpo" / "sparsepo.yaml")
    cfg = recipe.training_args
    assert recipe.recipe_args.trainer == "token_dpo"
    assert cfg.objective == "sparsepo" and cfg.mask == "sparse" and not cfg.precompute_ref_log_probs
    assert recipe.model_args.dtype == "bfloat16"
    text = (REPO / "recipes" / "qwen2.5-0.5b" / "token_dpo" / "sparsepo.yaml").read_text()
    config = text.split("--config_file ")[1].split()[0]
    assert "accelerate launch" in text and (REPO / config).is_file(), config


@pytest.mark.slow
def test_recipe_runs_and_resumes_through_run_training(tiny_model_dir, task_data_dir, tmp_path):
    """`fdpo train recipes/tiny/token_dpo/sparsepo_independent.yaml`: 2 steps with a checkpoint, then a rerun with more
    steps resumes from it (mask parameters included) and the final output holds the mask file."""
    from fdpo.recipe import load_recipe
    from fdpo.train import run_training

    overrides = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(Path(task_data_dir) / "preference.jsonl"),
        "eval_dataset_name": None,
        "eval_strategy": "no",
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
    }
    path = REPO / "recipes" / "tiny" / "token_dpo" / "sparsepo_independent.yaml"
    first = run_training(load_recipe(path, overrides))
    assert first["global_step"] == 2 and (tmp_path / "out" / "checkpoint-2" / MASK_FILE).is_file()
    second = run_training(load_recipe(path, {**overrides, "max_steps": 3}), resume=True)
    assert second["global_step"] == 3
    assert second["resumed_from"] is not None and second["resumed_from"].endswith("checkpoint-2")
    assert (tmp_path / "out" / MASK_FILE).is_file()
    assert any("mask/reward/sparsity" in h for h in second["log_history"])
