"""Distillation (docs/objectives.md §9): student π_θ in the π slot, teacher p in the π_ref slot.

- the pure loss equals float64 direct sums (value and gradient) for every registry divergence and BD-KD;
- TRL's GKD `generalized_jsd_loss` is the oracle for generalized_jsd (TRL beta = 1 − β), forward and reverse KL;
- λ = 1 trains on student samples (the batch the loss sees is what the student generated), λ = 0 on the data;
- end to end: the student moves toward the SFT teacher (KL(teacher‖student) on held-out data decreases).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from truth import ENTRY_PARAMS, bdkd_closed_form, divergence_closed_form, token_mean_divergence

from fdpo.divergences import available_divergences, get_divergence
from fdpo.losses.distill import distill_loss, resolve_distill_objective
from fdpo.recipe import load_recipe
from fdpo.trainers.distill import FDistillConfig, FDistillTrainer

REPO = Path(__file__).resolve().parents[1]
COMMON = {
    "report_to": "none", "bf16": False, "use_cpu": True, "save_strategy": "no", "logging_steps": 1,
    "dataloader_num_workers": 0, "disable_tqdm": True, "max_length": 32, "per_device_train_batch_size": 4,
    "seed": 0, "max_new_tokens": 4,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(seed=0, shape=(2, 6, 13)):
    gen = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    t = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(shape[:-1], generator=gen) > 0.3
    return s, t, mask


@pytest.mark.parametrize("name", [*available_divergences(), "bdkd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_equals_float64_direct_sum(name, temperature):
    s, t, mask = _logits()
    params = ENTRY_PARAMS.get(name, {})
    obj = resolve_distill_objective(name, params)
    loss, metrics = distill_loss(s, t, mask, obj, temperature=temperature, chunk_size=4)
    s2 = s.detach().clone().requires_grad_()
    logp, logq = (s2 / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    d = bdkd_closed_form(logp, logq) if name == "bdkd" else divergence_closed_form(name, params, logp, logq)
    truth = (d * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, truth, rtol=1e-9, atol=1e-12)
    assert metrics[f"div/{obj.label}"].item() == pytest.approx(truth.item(), rel=1e-9)
    if name == "total_variation":
        return
    loss.backward()
    truth.backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-7, atol=1e-10)


def test_bdkd_weights_follow_the_entropy_gap():
    s, t, mask = _logits(seed=3)
    sharp_teacher = 8 * t  # a confident teacher: the student is the less confident one → mostly reverse KL
    _, m = distill_loss(s.detach(), sharp_teacher, mask, "bdkd")
    assert m["bdkd/w_reverse"] > 0.5 and m["entropy/student"] > m["entropy/teacher"]
    _, m = distill_loss(8 * s.detach(), t, mask, "bdkd")  # an over-confident student → mostly forward KL
    assert m["bdkd/w_reverse"] < 0.5


@pytest.mark.parametrize("trl_beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_trl_gkd(trl_beta):
    from trl.experimental.gkd import GKDTrainer

    s, t, mask = _logits(seed=1)
    labels = torch.where(mask, 1, -100)
    trl = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=trl_beta)
    name = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(trl_beta, f"generalized_jsd({1 - trl_beta})")
    ours, _ = distill_loss(s, t, mask, get_divergence(name))
    torch.testing.assert_close(ours, trl, rtol=1e-9, atol=1e-12)


def test_config_divergence_and_trl_beta(tmp_path):
    kw = {"output_dir": str(tmp_path), "report_to": "none", "bf16": False, "use_cpu": True}
    default = FDistillConfig(**kw)  # GKD's default: generalised JSD with TRL beta 0.5
    assert (default.divergence, default.divergence_params) == ("generalized_jsd", {"beta": 0.5})
    cfg = FDistillConfig(**kw, divergence="gjsd", divergence_params={"beta": 0.2})
    assert (cfg.divergence, cfg.divergence_params) == ("generalized_jsd", {"beta": 0.2})
    assert FDistillConfig(**kw, divergence="bd-kd").divergence == "bdkd"
    assert FDistillConfig(**kw, divergence="tv").divergence == "total_variation"
    cfg = FDistillConfig(**kw, beta=0.3)  # TRL's GKD beta b is fdpo's generalized_jsd(1 − b)
    assert (cfg.divergence, cfg.divergence_params) == ("generalized_jsd", {"beta": pytest.approx(0.7)})
    assert FDistillConfig(**kw, beta=0.0).divergence == "forward_kl"
    assert FDistillConfig(**kw, beta=1.0).divergence == "reverse_kl"
    with pytest.raises(ValueError, match=r"(?s)'beta'.*'divergence'"):
        FDistillConfig(**kw, beta=0.3, divergence="forward_kl")
    with pytest.raises(ValueError, match="unknown divergence"):
        FDistillConfig(**kw, divergence="forwardkl_")


def _sft_rows(task_data_dir, n):
    return [json.loads(x) for x in (Path(task_data_dir) / "sft.jsonl").read_text().splitlines()[:n]]


@pytest.mark.parametrize("lmbda", [1.0, 0.0])
def test_lambda_one_trains_on_student_samples(tiny_model_dir, task_data_dir, tmp_path, lmbda):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    generated: list[torch.Tensor] = []
    original_generate = student.generate

    def counting_generate(*args, **kwargs):
        out = original_generate(*args, **kwargs)
        generated.append(out.sequences.clone())
        return out

    student.generate = counting_generate
    steps = 2
    trainer = FDistillTrainer(
        model=student, teacher_model=str(tiny_model_dir), processing_class=tok,
        args=FDistillConfig(output_dir=str(tmp_path), lmbda=lmbda, max_steps=steps, **COMMON),
        train_dataset=Dataset.from_list(_sft_rows(task_data_dir, 16)),
    )
    seen: list[torch.Tensor] = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        seen.append(inputs["input_ids"].clone())
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps and all(math.isfinite(h["loss"]) for h in logs)
    assert [h["on_policy"] for h in logs] == [lmbda] * steps
    if lmbda == 1.0:
        assert len(generated) == steps  # one student generation per step
        for batch, sample in zip(seen, generated):
            assert torch.equal(batch, sample)  # the loss saw exactly the student's samples
    else:
        assert generated == []


def _kl_teacher_student(student_dir, teacher_dir, rows, tok) -> float:
    """Token mean of KL(teacher ‖ student) over the completions of `rows`, float64 (independent of fdpo)."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    return token_mean_divergence(student, teacher, rows, tok, "forward_kl")


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["forward_kl", "bdkd"])
def test_student_moves_toward_the_teacher(tiny_model_dir, tiny_sft_dir, task_data_dir, tmp_path, divergence):
    from transformers import AutoTokenizer

    from fdpo.train import run_training

    out = tmp_path / "student"
    recipe = load_recipe(REPO / "recipes" / "tiny" / "distill" / "distill_forward_kl.yaml", {
        "model_name_or_path": str(tiny_model_dir), "teacher_model_name_or_path": str(tiny_sft_dir),
        "dataset_name": str(Path(task_data_dir) / "sft.jsonl"), "output_dir": str(out), "divergence": divergence,
        "max_steps": 15, "per_device_train_batch_size": 16, "save_strategy": "no", "logging_steps": 5,
    })
    metrics = run_training(recipe)
    assert metrics["global_step"] == 15
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(x) for x in (Path(task_data_dir) / "sft.jsonl").read_text().splitlines()[-24:]]
    before = _kl_teacher_student(tiny_model_dir, tiny_sft_dir, rows, tok)
    after = _kl_teacher_student(out, tiny_sft_dir, rows, tok)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize(("divergence", "params"), [("forward_kl", {}), ("generalized_jsd", {"beta": 0.2}),
                                                    ("bdkd", {})])
def test_trainer_loss_equals_direct_sum_on_full_logits(tiny_model_dir, task_data_dir, tmp_path, divergence, params):
    """The trainer's loss (positions from the first completion token on) is the token mean of the divergence
    computed in float64 from the two models' full logits."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = FDistillTrainer(
        model=student, teacher_model=teacher, processing_class=tok,
        args=FDistillConfig(output_dir=str(tmp_path), lmbda=0.0, divergence=divergence,
                            divergence_params=params or None, **{**COMMON, "per_device_train_batch_size": 8}),
        train_dataset=Dataset.from_list(_sft_rows(task_data_dir, 16)),
    )
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logp = student(**kw).logits[:, :-1].double().log_softmax(-1)
        logq = teacher(**kw).logits[:, :-1].double().log_softmax(-1)
    mask = batch["labels"][:, 1:] != -100
    d = bdkd_closed_form(logp, logq) if divergence == "bdkd" else divergence_closed_form(divergence, params, logp, logq)
    truth = d[mask].mean().item()
    assert truth > 1e-3 and loss.item() == pytest.approx(truth, rel=1e-5)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes" / "tiny" / "distill").glob("*.yaml")))
def test_distill_recipes_validate(name):
    from fdpo.errors import RecipeError

    recipe = load_recipe(REPO / "recipes" / "tiny" / "distill" / name)
    args = recipe.training_args
    assert isinstance(args, FDistillConfig) and args.teacher_model_name_or_path == "runs/tiny/sft"
    resolve_distill_objective(args.divergence, args.divergence_kwargs())
    with pytest.raises(RecipeError, match="'lmbda'"):
        load_recipe(REPO / "recipes" / "tiny" / "distill" / name, {"lambda": 0.5})
