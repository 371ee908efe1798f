"""FDPOTrainer: TRL's DPOTrainer with fdpo's f-DPO loss.

- `_compute_loss` equals TRL 1.16's on the same per-token log-probs (incl. ld_alpha, WPO weighting, mixed losses).
- Short training runs on a tiny Llama: precomputed reference log-probs, a reference reloaded from disk with
  gradient checkpointing, a peft LoRA adapter (reference = base with the adapter disabled) with and without
  precompute; finite losses and the logged metric names.
- The recipes in recipes/tiny/dpo/dpo_*.yaml load, and one runs through `fdpo.train.run_training`.
- End to end: f-DPO (JS) raises chosen-over-rejected likelihood accuracy on held-out pairs.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from dpo_fixtures import (
    LOSS_METRICS,
    FakePolicy,
    fake_batch,
    tiny_model,
    tiny_preference_dataset,
    tiny_tokenizer,
)
from trainer_args import CPU_TRAINER_ARGS

from fdpo.losses.fdpo_loss import FDPOScore
from fdpo.trainers.dpo import FDPOConfig, FDPOTrainer
from fdpo.trainers.guards import NonFiniteGradientCallback

REPO = Path(__file__).resolve().parents[1]
COMMON = {
    **CPU_TRAINER_ARGS,
    "max_length": 16,
}
FDPO_METRICS = LOSS_METRICS | {
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "num_tokens",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rule_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """Preference pairs with a learnable rule: the chosen answer is an even digit, the rejected an odd one."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"w{rng.randrange(18)} w{rng.randrange(18)} :",
            "chosen": f" {rng.choice('02468')}",
            "rejected": f" {rng.choice('13579')}",
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama and its tokenizer saved with save_pretrained (TRL reloads the reference from this path)."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tok = tiny_tokenizer()
    tiny_model(tok, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _train(tiny_dir: Path, out: Path, *, steps: int = 3, peft: bool = False, **config) -> list[dict]:
    from datasets import Dataset

    model, tok = _load(tiny_dir)
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
    args = FDPOConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        **COMMON,
        **config,
    )
    trainer = FDPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rule_pairs(16, seed=1)),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[NonFiniteGradientCallback()],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps
    for h in logs:
        assert math.isfinite(h["loss"]), h
        missing = FDPO_METRICS - set(h)
        assert not missing, missing
        div = [k for k in h if k.startswith("div/")]
        assert div == [f"div/{trainer.f_dpo_score.label}"], div
        assert math.isfinite(h[div[0]])
    return logs


def test_trains_with_precomputed_reference(tiny_dir, tmp_path):
    logs = _train(tiny_dir, tmp_path, divergence="js", precompute_ref_log_probs=True)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # π = π_ref before the first update
    assert logs[-1]["rewards/margins"] > 0


def test_trains_with_reference_from_disk_and_gradient_checkpointing(tiny_dir, tmp_path):
    logs = _train(tiny_dir, tmp_path, divergence="forward_kl", beta=0.05, gradient_checkpointing=True)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("precompute", [False, True])
def test_trains_lora_adapter_against_base(tiny_dir, tmp_path, precompute):
    logs = _train(
        tiny_dir,
        tmp_path,
        peft=True,
        divergence="alpha",
        alpha=0.3,
        gradient_checkpointing=True,
        precompute_ref_log_probs=precompute,
        loss_type=["sigmoid", "ipo"],
        loss_weights=[1.0, 0.1],
    )
    # a fresh LoRA adapter is zero: the policy equals the base, which is the reference (adapter disabled)
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert logs[-1]["rewards/margins"] > 0


# ---------------------------------------------------------------------------------------------------------------
# the trainer's loss path vs TRL's, live


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    from trl import DPOConfig, DPOTrainer

    tok = tiny_tokenizer()
    kw = {
        "report_to": "none",
        "bf16": False,
        "use_cpu": True,
        "precompute_ref_log_probs": True,
        "per_device_train_batch_size": 2,
    }
    trl = DPOTrainer(
        model=tiny_model(tok),
        args=DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), **kw),
        train_dataset=tiny_preference_dataset(),
        processing_class=tok,
    )
    ours = FDPOTrainer(
        model=tiny_model(tok),
        args=FDPOConfig(output_dir=str(tmp_path_factory.mktemp("fdpo")), **kw),
        train_dataset=tiny_preference_dataset(),
        processing_class=tok,
    )
    trl.model.train()
    ours.model.train()
    return trl, ours


CASES = [
    # (fdpo divergence, params, TRL f_divergence_type, TRL coef a = 1 − α, loss types, weights, extra)
    ("js", {}, "js_divergence", 0.5, ["hinge"], [1.0], {}),
    ("alpha", {"alpha": 0.3}, "alpha_divergence", 0.7, ["sigmoid", "ipo"], [0.7, 0.3], {}),
    ("forward_kl", {}, "forward_kl", 0.5, ["robust"], [1.0], {"ld_alpha": 0.5}),
    # WPO weighting with hinge is not compared: TRL 1.16 scales the ReLU output in place and its backward fails
    ("reverse_kl", {}, "reverse_kl", 0.5, ["sigmoid", "robust"], [1.0, 1.0], {"use_weighting": True}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_trainer_loss_equals_trl_trainer_loss(trainers, case):
    trl, ours = trainers
    name, params, f_type, coef, loss_types, weights, extra = case
    ours.f_dpo_score = FDPOScore(name, **params)
    trl.f_divergence_type, trl.f_alpha_divergence_coef = f_type, coef
    for t in (trl, ours):
        t.loss_types, t.loss_weights, t.beta, t.label_smoothing = loss_types, weights, 0.4, 0.1
        t.ld_alpha, t.use_weighting = extra.get("ld_alpha"), extra.get("use_weighting", False)
        t._metrics["train"].clear()
    inputs, per_token = fake_batch(6, 10, seed=len(name))
    results = []
    for t in (trl, ours):
        leaf = per_token.clone().requires_grad_(True)
        loss = t._compute_loss(FakePolicy(leaf), inputs, False)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=2e-4, atol=1e-7)
    theirs, mine = trl._metrics["train"], ours._metrics["train"]
    for key in theirs:  # every metric TRL logs, fdpo logs with the same value
        assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    assert f"div/{ours.f_dpo_score.label}" in mine and "scores/margins" in mine


def test_non_finite_loss_stops_with_step_and_term(trainers):
    from fdpo.trainers.guards import NonFiniteError

    _, ours = trainers
    ours.f_dpo_score = FDPOScore("js")
    ours.loss_types, ours.loss_weights, ours.ld_alpha, ours.use_weighting = ["sigmoid"], [1.0], None, False
    inputs, per_token = fake_batch(2, 8, seed=0)
    per_token[0, -1] = float("nan")
    with pytest.raises(NonFiniteError, match="step 1: the loss term 'f_dpo_sigmoid'"):
        ours._compute_loss(FakePolicy(per_token), inputs, False)


# ---------------------------------------------------------------------------------------------------------------
# recipes


DPO_RECIPES = sorted((REPO / "recipes" / "tiny" / "dpo").glob("*.yaml"))


def test_dpo_recipes_load():
    from fdpo.recipe import load_recipe

    assert any(p.name == "dpo_js.yaml" for p in DPO_RECIPES)
    for path in DPO_RECIPES:
        recipe = load_recipe(path)
        assert recipe.recipe_args.trainer == "dpo"
        assert isinstance(recipe.training_args, FDPOConfig)
        assert path.stem.removeprefix("dpo_").startswith(recipe.training_args.divergence), path


def test_dpo_recipe_runs_through_run_training(tiny_dir, tmp_path):
    from fdpo.recipe import load_recipe
    from fdpo.train import run_training

    data = tmp_path / "preference.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rule_pairs(8, seed=2)))
    overrides = {
        "model_name_or_path": str(tiny_dir),
        "dataset_name": str(data),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_dataset_name": None,
        "eval_strategy": "no",
    }
    metrics = run_training(load_recipe(REPO / "recipes" / "tiny" / "dpo" / "dpo_js.yaml", overrides))
    assert metrics["global_step"] == 2
    assert any("div/js" in h for h in metrics["log_history"])


def test_trains_on_the_task_preference_data(request, tmp_path):
    """The tiny pipeline's own model and conversational preference data (conftest fixtures, when present)."""
    from datasets import load_dataset

    try:
        model_dir = request.getfixturevalue("tiny_model_dir")
        data_dir = request.getfixturevalue("task_data_dir")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py provides no tiny_model_dir / task_data_dir fixtures")
    data = Path(data_dir) / "preference.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} does not exist")
    model, tok = _load(Path(model_dir))
    args = FDPOConfig(
        output_dir=str(tmp_path),
        divergence="js",
        max_steps=2,
        per_device_train_batch_size=4,
        precompute_ref_log_probs=True,
        **{**COMMON, "max_length": 64},
    )
    train = load_dataset("json", data_files=str(data), split="train").select(range(16))
    trainer = FDPOTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and "div/js" in h for h in logs)


# ---------------------------------------------------------------------------------------------------------------
# end to end


def _preference_accuracy(model, tok, pairs) -> float:
    """Share of pairs with log π(chosen | prompt) > log π(rejected | prompt) (completion tokens only)."""

    def completion_logp(prompt: str, completion: str) -> float:
        p = tok(prompt)["input_ids"]
        full = tok(prompt + completion + tok.eos_token)["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        return float(logp[torch.arange(len(targets)), targets][len(p) - 1 :].sum())

    model.eval()
    wins = [
        completion_logp(r["prompt"], r["chosen"]) > completion_logp(r["prompt"], r["rejected"]) for r in pairs
    ]
    return sum(wins) / len(wins)


def test_fdpo_raises_held_out_preference_accuracy(tiny_dir, tmp_path):
    from datasets import Dataset

    model, tok = _load(tiny_dir)
    held_out = rule_pairs(64, seed=123)
    before = _preference_accuracy(model, tok, held_out)
    args = FDPOConfig(
        output_dir=str(tmp_path),
        divergence="js",
        beta=0.1,
        max_steps=25,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        precompute_ref_log_probs=True,
        **{**COMMON, "logging_steps": 25},
    )
    trainer = FDPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rule_pairs(200, seed=7)), processing_class=tok
    )
    trainer.train()
    after = _preference_accuracy(trainer.model, tok, held_out)
    assert after >= 0.9 and after > before + 0.2, (before, after)
