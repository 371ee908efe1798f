"""f-regularised SFT (docs/objectives.md §2): NLL + γ·D_f(π‖π_ref) per completion token.

- the pure loss: value and gradient against float64 direct sums over the vocabulary, for every registry entry;
- γ = 0 is exactly TRL's SFTTrainer loss and gradient on the same batch (TRL as oracle); γ > 0 with the
  reference = the starting model is TRL's loss and gradient at step 0 too (D = 0 and ∇D = 0 at π = π_ref),
  with one policy forward;
- the trainer's divergence term equals a float64 direct sum on the two models' own (unfused) logits;
- training with γ > 0 stays closer (KL) to the starting model than γ = 0 on data that pulls away.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from trainer_args import CPU_TRAINER_ARGS
from truth import ENTRY_PARAMS, divergence_closed_form, token_mean_divergence

from fdpo.divergences import available_divergences, get_divergence
from fdpo.losses.fsft_loss import fsft_loss
from fdpo.trainers.sft import FSFTConfig, FSFTTrainer

COMMON = {
    **CPU_TRAINER_ARGS,
    "max_length": 32,
    "per_device_train_batch_size": 8,
    "seed": 0,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", available_divergences())
def test_pure_loss_value_and_gradient_match_float64(name):
    gen = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 5, 8, 11
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ref_hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    ref_weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) > 0.3
    nll = torch.tensor(1.25, dtype=torch.float64)
    div = get_divergence(name, **ENTRY_PARAMS.get(name, {}))
    gamma, n_items = 0.7, 13
    loss, metrics = fsft_loss(
        nll, hidden, weight, ref_hidden, ref_weight, mask, div, coef=gamma, num_items_in_batch=n_items,
        log_kl_to_start=True, chunk_size=3,
    )
    # truth: float64 direct sums, autograd through them
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp = (h2 @ w2.T).log_softmax(-1)
    logq = (ref_hidden @ ref_weight.T).log_softmax(-1)
    d = divergence_closed_form(name, ENTRY_PARAMS.get(name, {}), logp, logq)
    truth = nll + gamma * (d * mask).sum() / n_items
    torch.testing.assert_close(loss, truth, rtol=1e-9, atol=1e-12)
    assert metrics[f"div/{div.label}"].item() == pytest.approx((d * mask).sum().item() / mask.sum().item(), rel=1e-9)
    kl = divergence_closed_form("reverse_kl", {}, logp, logq)
    assert metrics["kl_to_start"].item() == pytest.approx((kl * mask).sum().item() / mask.sum().item(), rel=1e-9)
    if name == "total_variation":
        return  # |·| has no gradient at ties; values only
    loss.backward()
    truth.backward()
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-7, atol=1e-10)


def test_config_canonical_name_lr_scale_and_no_sampled_estimator(tmp_path):
    cfg = FSFTConfig(output_dir=str(tmp_path), divergence="alpha(0.25)", learning_rate=1e-3, lr_scale=0.1,
                     report_to="none", bf16=False, use_cpu=True)
    assert (cfg.divergence, cfg.alpha, cfg.divergence_params) == ("alpha", 0.25, None)
    assert cfg.learning_rate == pytest.approx(1e-4) and cfg.base_learning_rate == pytest.approx(1e-3)
    cfg = FSFTConfig(output_dir=str(tmp_path), divergence="jsd_beta", divergence_params={"beta": 0.3},
                     report_to="none", bf16=False, use_cpu=True)
    assert (cfg.divergence, cfg.divergence_params) == ("generalized_jsd", {"beta": 0.3})
    with pytest.raises(ValueError, match="demonstrations are neither"):
        FSFTConfig(output_dir=str(tmp_path), divergence_estimator="sampled", report_to="none", bf16=False)
    with pytest.raises(ValueError, match="unknown divergence"):
        FSFTConfig(output_dir=str(tmp_path), divergence="kll", report_to="none", bf16=False)
    with pytest.raises(ValueError, match="lr_scale"):
        FSFTConfig(output_dir=str(tmp_path), lr_scale=0.0, report_to="none", bf16=False)


# ------------------------------------------------------------------------------------------------
# the trainer on the tiny model
# ------------------------------------------------------------------------------------------------


def _dataset(task_data_dir: Path, n: int = 32, completion=None):
    from datasets import Dataset

    rows = [json.loads(line) for line in (Path(task_data_dir) / "sft.jsonl").read_text().splitlines()[:n]]
    if completion is not None:
        for row in rows:
            row["completion"] = [{"role": "assistant", "content": completion}]
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _fsft(model, tok, ds, out, **cfg) -> FSFTTrainer:
    trainer = FSFTTrainer(model=model, args=FSFTConfig(output_dir=str(out), **{**COMMON, **cfg}), train_dataset=ds,
                          processing_class=tok)
    trainer.model.train()  # as inside `train()`: metrics go to the "train" bucket
    return trainer


@pytest.mark.parametrize("num_items", [None, 57])
def test_gamma_zero_and_gamma_at_start_equal_trl_sft(tiny_model_dir, task_data_dir, tmp_path, num_items):
    from trl import SFTConfig, SFTTrainer

    model, tok = _load(tiny_model_dir)
    ds = _dataset(task_data_dir)
    trl_trainer = SFTTrainer(model=copy.deepcopy(model), args=SFTConfig(output_dir=str(tmp_path / "trl"), **COMMON),
                             train_dataset=ds, processing_class=tok)
    trl_trainer.model.train()
    batch = _batch(trl_trainer)
    n = None if num_items is None else torch.tensor(num_items)
    trl_loss = trl_trainer.compute_loss(trl_trainer.model, dict(batch), num_items_in_batch=n)
    trl_loss.backward()
    trl_grads = _grads(trl_trainer.model)

    plain = _fsft(copy.deepcopy(model), tok, ds, tmp_path / "g0")
    assert plain.ref_model is None and not plain.uses_reference  # γ = 0 loads no reference
    loss0 = plain.compute_loss(plain.model, dict(batch), num_items_in_batch=n)
    assert torch.equal(loss0, trl_loss)
    loss0.backward()
    for name, g in _grads(plain.model).items():
        assert torch.equal(g, trl_grads[name]), name

    # γ > 0, reference = the starting model (reloaded from its path): at π = π_ref, D = 0 and ∇D = 0
    reg = _fsft(copy.deepcopy(model), tok, ds, tmp_path / "g1", divergence="js", divergence_coef=2.0)
    assert reg.ref_model is not None and reg.ref_is_start and reg.log_kl_to_start
    calls = {"policy": 0, "ref": 0}
    reg._policy_lm().base_model.register_forward_pre_hook(lambda *a: calls.__setitem__("policy", calls["policy"] + 1))
    reg.ref_model.base_model.register_forward_pre_hook(lambda *a: calls.__setitem__("ref", calls["ref"] + 1))
    loss1 = reg.compute_loss(reg.model, dict(batch), num_items_in_batch=n)
    assert calls == {"policy": 1, "ref": 1}  # one policy forward, one reference forward
    torch.testing.assert_close(loss1, trl_loss, rtol=0, atol=1e-7)
    loss1.backward()
    for name, g in _grads(reg.model).items():
        torch.testing.assert_close(g, trl_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert reg._metrics["train"]["div/js"][-1] == pytest.approx(0.0, abs=1e-7)
    assert reg._metrics["train"]["kl_to_start"][-1] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(("divergence", "params"), [("reverse_kl", {}), ("alpha", {"alpha": 0.3}),
                                                    ("total_variation", {})])
def test_trainer_divergence_term_equals_float64_direct_sum(tiny_model_dir, task_data_dir, tmp_path, divergence,
                                                           params):
    model, tok = _load(tiny_model_dir)
    ref, _ = _load(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # the policy drifts from its start; the reference is reloaded from the path
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gamma = 0.5
    trainer = _fsft(model, tok, _dataset(task_data_dir), tmp_path, divergence=divergence, divergence_coef=gamma,
                    divergence_params=params or None)
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    # truth: the models' own (unfused) logits, float64 sums over the vocabulary
    with torch.no_grad():
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logp = model(**kw).logits[:, :-1].double().log_softmax(-1)
        logq = ref(**kw).logits[:, :-1].double().log_softmax(-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    d = divergence_closed_form(divergence, params, logp, logq)[mask]
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    label = get_divergence(divergence, **params).label
    assert metrics[f"div/{label}"] == pytest.approx(d.mean().item(), rel=1e-4)
    assert metrics["nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert metrics["kl_to_start"] == pytest.approx(divergence_closed_form("reverse_kl", {}, logp, logq)[mask].mean().item(),
                                                   rel=1e-4)
    assert loss.item() == pytest.approx((nll + gamma * d).mean().item(), rel=1e-5)
    assert d.mean().item() > 1e-3  # the check is not vacuous


def _kl_to(model_dir, start_dir, ds_rows, tok) -> float:
    """Token mean of KL(π‖π_start) in float64 over the completions of `ds_rows` (independent of fdpo)."""
    return token_mean_divergence(_load(model_dir)[0], _load(start_dir)[0], ds_rows, tok, "reverse_kl")


@pytest.mark.slow
def test_gamma_keeps_the_policy_closer_to_the_start(tiny_sft_dir, task_data_dir, tmp_path):
    """Fine-tune the SFT model on data that pulls away (every answer '1+1'): KL to the start after N steps
    is smaller with γ > 0 than with γ = 0, same data, seed and steps."""
    _, tok = _load(tiny_sft_dir)
    pull = _dataset(task_data_dir, n=128, completion="1+1")
    # held-out prompts with valid answers (the chosen side of the held-out preference pairs)
    rows = [json.loads(x) for x in (Path(task_data_dir) / "preference_eval.jsonl").read_text().splitlines()[:24]]
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    kls = {}
    for gamma in (0.0, 4.0):
        model, _ = _load(tiny_sft_dir)
        out = tmp_path / f"gamma{gamma}"
        trainer = _fsft(model, tok, pull, out, divergence="reverse_kl", divergence_coef=gamma, max_steps=12,
                        learning_rate=1e-3, warmup_steps=0, per_device_train_batch_size=16)
        trainer.train()
        trainer.save_model(str(out))
        kls[gamma] = _kl_to(out, tiny_sft_dir, rows, tok)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert all(math.isfinite(h["loss"]) for h in logs)
        if gamma > 0:
            assert "kl_to_start" in logs[-1] and "div/reverse_kl" in logs[-1]
    assert kls[0.0] > 0.3, kls  # the data does pull away (seen: 1.5)
    assert kls[4.0] < 0.5 * kls[0.0], kls  # seen: 0.17


def test_lora_reference_is_the_base_with_the_adapter_disabled(tiny_model_dir, task_data_dir, tmp_path):
    """Under LoRA no reference copy is loaded; the divergence is to the base model (adapter off), with
    gradient checkpointing on."""
    from peft import LoraConfig

    model, tok = _load(tiny_model_dir)
    trainer = FSFTTrainer(
        model=model, processing_class=tok, train_dataset=_dataset(task_data_dir),
        args=FSFTConfig(output_dir=str(tmp_path), divergence="forward_kl", divergence_coef=0.5, max_steps=3,
                        learning_rate=5e-2, gradient_checkpointing=True, **COMMON),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None and trainer.log_kl_to_start
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["div/forward_kl"] == pytest.approx(0.0, abs=1e-7)  # LoRA starts as the identity
    assert logs[-1]["div/forward_kl"] > 1e-5 and logs[-1]["kl_to_start"] > 1e-5
    # the regulariser at the trained adapter equals a float64 direct sum against the adapter-disabled base
    trainer.model.train()
    batch = _batch(trainer)
    trainer.compute_loss(trainer.model, dict(batch))
    value = trainer._metrics["train"]["div/forward_kl"][-1]
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logp = trainer.model(**kw).logits[:, :-1].double().log_softmax(-1)
        with trainer.model.disable_adapter():
            logq = trainer.model(**kw).logits[:, :-1].double().log_softmax(-1)
    mask = batch["labels"][:, 1:] != -100
    truth = divergence_closed_form("forward_kl", {}, logp, logq)[mask].mean().item()
    assert truth > 1e-5 and value == pytest.approx(truth, rel=1e-4)


def test_pure_loss_with_zero_coef_logs_without_a_gradient_path():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 6, generator=gen, requires_grad=True)
    weight = torch.randn(9, 6, generator=gen, requires_grad=True)
    nll = (hidden.sum() * 0 + 0.5)
    loss, metrics = fsft_loss(nll, hidden, weight, torch.randn(1, 4, 6, generator=gen), torch.randn(9, 6, generator=gen),
                              torch.ones(1, 4, dtype=torch.bool), "js", coef=0.0, log_kl_to_start=True)
    assert loss is nll and metrics["div/js"] > 0 and metrics["kl_to_start"] > 0


@pytest.mark.slow
def test_two_process_cpu_matches_one_process_with_the_regulariser(tiny_model_dir, task_data_dir, tmp_path):
    """accelerate launch, 2 processes (gloo): the regularised loss (NLL + γ·D, TRL's token normalisation and
    world-size scaling) equals the one-process loss at every step."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(Path(task_data_dir) / "sft.jsonl"),
            "--max_steps", "3", "--warmup_steps", "0", "--logging_steps", "1", "--save_strategy", "no",
            "--divergence", "js", "--divergence_coef", "1.0", "--learning_rate", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    runs = {
        1: [sys.executable, "-m", "fdpo", "train", str(repo / "recipes" / "tiny" / "sft" / "sft.yaml"), *args,
            "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8"],
        2: [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(repo / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "29561",
            "-m", "fdpo", "train", str(repo / "recipes" / "tiny" / "sft" / "sft.yaml"), *args,
            "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "4"],
    }
    losses = {}
    for world, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = tmp_path / ("one" if world == 1 else "two")
        info = json.loads((out / "fdpo_run_complete.json").read_text())
        assert info["world_size"] == world
        losses[world] = {h["step"]: h["loss"] for h in info["log_history"] if "loss" in h}
        logged = [h for h in info["log_history"] if "loss" in h]
        assert logged[0]["div/js"] == pytest.approx(0.0, abs=1e-7) and logged[-1]["div/js"] > 0  # not vacuous
    assert sorted(losses[1]) == sorted(losses[2]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert losses[2][step] == pytest.approx(losses[1][step], rel=1e-4), losses
