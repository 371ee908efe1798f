"""fdpo's trainers as drop-in replacements of their TRL 1.16 parents (issue 10), on the tiny model.

The oracle is TRL itself: its trainer is built beside fdpo's on the same weights, the same batch and the same
seed, and the two losses and parameter gradients are compared. Covered, per trainer:
- DPO: no `args` (TRL's default config), a plain `DPOConfig`, TRL's `f_divergence_type` /
  `f_alpha_divergence_coef` (α = 1 − a) and conflicts with fdpo's keys, every TRL loss_type and a weighted
  list with reverse KL == TRL (loss and gradients), TRL's f-divergences on the difference-based types == TRL,
  the clear error for a log-ratio type with another divergence, the non-finite stop switch.
"""

from __future__ import annotations

import copy
import logging
import zlib
from pathlib import Path

import pytest
import torch
from dpo_fixtures import tiny_model, tiny_tokenizer
from trainer_args import CPU_TRAINER_ARGS

from fdpo.losses.fdpo_loss import LOG_RATIO_LOSS_TYPES, LOSS_TYPES, SCORE_LOSS_TYPES
from fdpo.trainers.dpo import FDPOConfig, FDPOTrainer
from fdpo.trainers.guards import NonFiniteError, NonFiniteGradientCallback

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRL_DPO_LOSS_TYPES = (  # TRL 1.16's list (DPOConfig.loss_type help), written out independently of fdpo's
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny Llama and its tokenizer, saved (TRL reloads the reference model from this path)."""
    out = tmp_path_factory.mktemp("dropin_tiny")
    tok = tiny_tokenizer()
    tiny_model(tok, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _policy(tiny_dir: Path, seed: int = 1):
    """The saved model with every weight moved a little (seeded): the policy differs from its reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_loss_and_grads(trl_trainer, ours, batch, what: str) -> None:
    results = []
    for trainer in (trl_trainer, ours):
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, copy.deepcopy(batch))
        loss.backward()
        results.append((loss.detach(), _grads(trainer.model)))
    (trl_loss, trl_grads), (loss, grads) = results
    assert torch.isfinite(trl_loss), what
    torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what} loss: {m}")
    assert grads.keys() == trl_grads.keys(), what
    for name in grads:
        torch.testing.assert_close(
            grads[name], trl_grads[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{what} grad {n}: {m}"
        )


# ---------------------------------------------------------------------------------------------------------------
# DPO


def _pairs(n: int = 8):
    from datasets import Dataset

    rows = [
        {"prompt": f"w{i} w{(3 * i) % 18} :", "chosen": f" {(2 * i) % 10} {i % 7}", "rejected": f" {(2 * i + 1) % 10}"}
        for i in range(n)
    ]
    return Dataset.from_list(rows)


@pytest.mark.parametrize("loss_type", LOG_RATIO_LOSS_TYPES)
def test_log_ratio_loss_types_refuse_other_divergences(loss_type):
    with pytest.raises(ValueError, match=f"(?s)loss_type.*{loss_type}.*divergence.*jeffreys.*log Z"):
        FDPOConfig(output_dir="unused", loss_type=[loss_type], divergence="jeffreys", **CPU_TRAINER_ARGS)
    with pytest.raises(ValueError, match=f"(?s)loss_type.*{loss_type}.*js"):  # TRL's name, translated first
        FDPOConfig(output_dir="unused", loss_type=loss_type, f_divergence_type="js_divergence", **CPU_TRAINER_ARGS)


def test_trl_divergence_names_are_translated(caplog):
    kw = {"output_dir": "unused", **CPU_TRAINER_ARGS}
    assert FDPOConfig(f_divergence_type="js_divergence", **kw).divergence == "js"
    assert FDPOConfig(f_divergence_type="forward_kl", **kw).divergence == "forward_kl"
    with caplog.at_level(logging.INFO, logger="fdpo"):
        config = FDPOConfig(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7, **kw)
    assert (config.divergence, config.alpha) == ("alpha", pytest.approx(0.3))
    assert "alpha = 1 − a" in caplog.text
    # TRL's default coefficient 0.5 is α = 0.5; a = 1 is TRL's reverse-KL limit
    assert FDPOConfig(f_divergence_type="alpha_divergence", **kw).alpha == pytest.approx(0.5)
    assert FDPOConfig(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0, **kw).divergence == (
        "reverse_kl"
    )
    # agreeing keys are fine; the coefficient alone only matters for the alpha divergence (as in TRL)
    assert FDPOConfig(divergence="js", f_divergence_type="js_divergence", **kw).divergence == "js"
    assert FDPOConfig(divergence="alpha", alpha=0.3, f_alpha_divergence_coef=0.7, **kw).alpha == pytest.approx(0.3)
    assert FDPOConfig(divergence="alpha", f_alpha_divergence_coef=0.8, **kw).alpha == pytest.approx(0.2)
    assert FDPOConfig(f_alpha_divergence_coef=0.8, **kw).divergence == "reverse_kl"


def test_conflicting_trl_and_fdpo_divergence_keys_name_both():
    kw = {"output_dir": "unused", **CPU_TRAINER_ARGS}
    with pytest.raises(ValueError, match=r"(?s)'f_divergence_type'.*'divergence'"):
        FDPOConfig(f_divergence_type="js_divergence", divergence="forward_kl", **kw)
    with pytest.raises(ValueError, match=r"(?s)'f_alpha_divergence_coef'.*'alpha'"):
        FDPOConfig(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7, alpha=0.5, **kw)
    with pytest.raises(ValueError, match="f_divergence_type"):
        FDPOConfig(f_divergence_type="chi_squared", **kw)


@pytest.fixture(scope="module")
def dpo_pair(tiny_dir, tmp_path_factory):
    """TRL's DPOTrainer and FDPOTrainer on identical policies, references (from disk) and data; one batch."""
    from trl import DPOConfig, DPOTrainer

    kw = {**CPU_TRAINER_ARGS, "per_device_train_batch_size": 8, "max_length": 16, "label_smoothing": 0.1}
    trl_trainer = DPOTrainer(
        model=_policy(tiny_dir),
        args=DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl_dpo")), **kw),
        train_dataset=_pairs(),
        processing_class=_tokenizer(tiny_dir),
    )
    ours = FDPOTrainer(
        model=_policy(tiny_dir),
        args=FDPOConfig(output_dir=str(tmp_path_factory.mktemp("fdpo_dpo")), **kw),
        train_dataset=_pairs(),
        processing_class=_tokenizer(tiny_dir),
    )
    batch = next(iter(trl_trainer.get_train_dataloader()))
    for t in (trl_trainer, ours):
        t.model.train()
    return trl_trainer, ours, batch


def test_fdpo_config_takes_every_trl_loss_type():
    assert set(LOSS_TYPES) == set(TRL_DPO_LOSS_TYPES)
    assert set(SCORE_LOSS_TYPES) == {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
    for loss_type in TRL_DPO_LOSS_TYPES:  # TRL's scalar form is accepted and becomes TRL's list
        config = FDPOConfig(output_dir="unused", loss_type=loss_type, label_smoothing=0.1, **CPU_TRAINER_ARGS)
        assert config.loss_type == [loss_type]
    config = FDPOConfig(output_dir="unused", loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2], **CPU_TRAINER_ARGS)
    assert (config.loss_type, config.loss_weights) == (["sigmoid", "sft"], [0.8, 0.2])


def _set_losses(trainers, loss_types, weights, f_type="reverse_kl", coef=0.5):
    from fdpo.losses.fdpo_loss import FDPOScore
    from fdpo.trainers.dpo import TRL_F_DIVERGENCES

    trl_trainer, ours = trainers
    trl_trainer.f_divergence_type, trl_trainer.f_alpha_divergence_coef = f_type, coef
    name = TRL_F_DIVERGENCES[f_type]
    ours.f_dpo_score = FDPOScore(name, **({"alpha": 1 - coef} if name == "alpha" else {}))
    for t in trainers:
        t.loss_types, t.loss_weights = list(loss_types), list(weights)


@pytest.mark.parametrize("loss_type", TRL_DPO_LOSS_TYPES)
def test_every_dpo_loss_type_with_reverse_kl_equals_trl(dpo_pair, loss_type):
    trl_trainer, ours, batch = dpo_pair
    _set_losses((trl_trainer, ours), [loss_type], [1.0])
    _assert_same_loss_and_grads(trl_trainer, ours, batch, loss_type)


def test_weighted_list_of_loss_types_equals_trl(dpo_pair):
    trl_trainer, ours, batch = dpo_pair
    _set_losses((trl_trainer, ours), ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])  # MPO
    _assert_same_loss_and_grads(trl_trainer, ours, batch, "MPO mix")


@pytest.mark.parametrize(
    ("f_type", "coef"), [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)]
)
def test_trl_f_divergences_on_difference_types_equal_trl(dpo_pair, f_type, coef):
    trl_trainer, ours, batch = dpo_pair
    for loss_type in SCORE_LOSS_TYPES:
        _set_losses((trl_trainer, ours), [loss_type], [1.0], f_type, coef)
        _assert_same_loss_and_grads(trl_trainer, ours, batch, f"{f_type} {loss_type}")


def _public_fields(config) -> dict:
    values = config.to_dict()
    for key in ("output_dir", "logging_dir", "run_name"):
        values.pop(key, None)
    return values


@pytest.fixture
def parent_defaults(tmp_path, monkeypatch):
    """Where TRL's default configs can be built on this CPU machine: TRL defaults to bf16, which transformers
    refuses without a bf16 GPU unless told the device has one; the run directory goes under tmp_path."""
    import transformers.training_args as training_args

    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("parent_defaults")
def test_dpo_without_args_builds_trls_default(tiny_dir):
    from trl import DPOTrainer

    theirs = DPOTrainer(model=_policy(tiny_dir), train_dataset=_pairs(), processing_class=_tokenizer(tiny_dir))
    ours = FDPOTrainer(model=_policy(tiny_dir), train_dataset=_pairs(), processing_class=_tokenizer(tiny_dir))
    assert isinstance(ours.args, FDPOConfig)
    assert ours.args.output_dir == theirs.args.output_dir and ours.args.output_dir.endswith("-DPO")
    mine = _public_fields(ours.args)
    for key, value in _public_fields(theirs.args).items():  # every TRL field with TRL's default
        assert mine[key] == value, key
    assert ours.args.divergence == "reverse_kl" and ours.args.stop_on_non_finite
    assert any(isinstance(cb, NonFiniteGradientCallback) for cb in ours.callback_handler.callbacks)


def test_dpo_accepts_a_plain_dpo_config(tiny_dir, tmp_path):
    from trl import DPOConfig

    args = DPOConfig(
        output_dir=str(tmp_path), loss_type="sigmoid", f_divergence_type="js_divergence", beta=0.3, **CPU_TRAINER_ARGS
    )
    trainer = FDPOTrainer(_policy(tiny_dir), None, args, train_dataset=_pairs(), processing_class=_tokenizer(tiny_dir))
    assert isinstance(trainer.args, FDPOConfig)
    assert (trainer.args.divergence, trainer.args.beta, trainer.args.loss_type) == ("js", 0.3, ["sigmoid"])
    assert trainer.f_dpo_score.label == "js"


def test_non_finite_stop_is_on_by_default_and_can_be_switched_off(dpo_pair):
    _, ours, batch = dpo_pair
    _set_losses((dpo_pair[0], ours), ["sigmoid"], [1.0])
    bad = copy.deepcopy(batch)
    n_pairs = bad["input_ids"].shape[0] // 2
    bad["ref_chosen_logps"] = torch.full((n_pairs,), float("nan"))
    bad["ref_rejected_logps"] = torch.zeros(n_pairs)
    ours.precompute_ref_logps = True
    try:
        with pytest.raises(NonFiniteError, match="step 1: the loss term 'f_dpo_sigmoid'"):
            ours.compute_loss(ours.model, copy.deepcopy(bad))
        ours.args.stop_on_non_finite = False
        loss = ours.compute_loss(ours.model, copy.deepcopy(bad))
        assert torch.isnan(loss)
    finally:
        ours.precompute_ref_logps = False
        ours.args.stop_on_non_finite = True


# ---------------------------------------------------------------------------------------------------------------
# GRPO


def test_grpo_beta_is_translated(caplog):
    from fdpo.trainers.grpo_config import FGRPOConfig

    kw = {"output_dir": "unused", **CPU_TRAINER_ARGS}
    with caplog.at_level(logging.INFO, logger="fdpo"):
        config = FGRPOConfig(beta=0.04, **kw)  # TRL's default bias correction
    assert (config.divergence_coef, config.estimator, config.beta) == (0.04, "k3_ratio", 0.0)
    assert "estimator = 'k3_ratio'" in caplog.text
    config = FGRPOConfig(beta=0.04, use_bias_correction_kl=False, **kw)
    assert (config.divergence_coef, config.estimator, config.beta) == (0.04, "k3", 0.0)
    assert FGRPOConfig(beta=0.04, estimator="k3_plus", **kw).estimator == "k3_plus"
    assert FGRPOConfig(beta=0.04, divergence_coef=0.04, **kw).divergence_coef == 0.04
    assert FGRPOConfig(**kw).reward_funcs is None  # no silent default reward
    assert FGRPOConfig("run-dir", **CPU_TRAINER_ARGS).output_dir == "run-dir"  # positional output_dir, as TRL


def test_grpo_conflicting_keys_name_both():
    from fdpo.trainers.grpo_config import FGRPOConfig

    kw = {"output_dir": "unused", **CPU_TRAINER_ARGS}
    with pytest.raises(ValueError, match=r"(?s)'beta'.*'divergence_coef'"):
        FGRPOConfig(beta=0.04, divergence_coef=0.1, **kw)
    with pytest.raises(ValueError, match=r"(?s)'beta'.*'divergence'"):
        FGRPOConfig(beta=0.04, divergence="js", **kw)
    with pytest.raises(ValueError, match=r"(?s)'use_bias_correction_kl'.*'estimator'"):
        FGRPOConfig(beta=0.04, use_bias_correction_kl=False, estimator="k2", **kw)


GRPO_ARGS = {
    **CPU_TRAINER_ARGS, "max_steps": 3, "per_device_train_batch_size": 8, "num_generations": 4,
    "max_completion_length": 6, "learning_rate": 3e-3, "seed": 0,
}


def parity_reward(prompts, completions, **kwargs):
    """A deterministic 0/1 reward of the completion text (an untrained model gets non-zero advantages)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(zlib.crc32(t.encode()) % 2) for t in texts]


def _grpo_data(task_data_dir: Path, n: int = 16):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(task_data_dir / "rl.jsonl"), split="train").select(range(n))


def test_grpo_without_reward_raises_trls_error(tiny_model_dir, task_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from fdpo.trainers.grpo_config import FGRPOConfig
    from fdpo.trainers.grpo_trainer import FGRPOTrainer

    messages = []
    for config_cls, trainer_cls in ((GRPOConfig, GRPOTrainer), (FGRPOConfig, FGRPOTrainer)):
        args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, **CPU_TRAINER_ARGS)
        with pytest.raises(ValueError, match="No reward source provided") as info:
            trainer_cls(
                model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                args=args,
                train_dataset=_grpo_data(task_data_dir),
                processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            )
        messages.append(str(info.value))
    assert messages[0] == messages[1]


@pytest.mark.usefixtures("parent_defaults")
def test_grpo_without_args_builds_trls_default(tiny_model_dir, task_data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from fdpo.trainers.grpo_config import FGRPOConfig
    from fdpo.trainers.grpo_trainer import FGRPOTrainer

    built = []
    for cls in (GRPOTrainer, FGRPOTrainer):
        built.append(
            cls(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                parity_reward,
                train_dataset=_grpo_data(task_data_dir),
                processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            )
        )
    theirs, ours = built
    assert isinstance(ours.args, FGRPOConfig) and ours.args.output_dir.endswith("-GRPO")
    mine = _public_fields(ours.args)
    for key, value in _public_fields(theirs.args).items():
        assert mine[key] == value, key
    assert ours.ref_model is None  # TRL's default beta = 0: no KL term, no reference model


def _grpo_run(config_cls, trainer_cls, model_dir, data, out, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=[parity_reward],
        args=config_cls(output_dir=str(out), **{**GRPO_ARGS, **kw}),
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("bias_correction", [True, False], ids=["k3_ratio", "k3"])
def test_grpo_trl_beta_runs_equal_trl(tiny_model_dir, task_data_dir, tmp_path, bias_correction):
    """The same TRL config (beta > 0, with or without use_bias_correction_kl) through GRPOTrainer and FGRPOTrainer."""
    from trl import GRPOConfig, GRPOTrainer

    from fdpo.trainers.grpo_config import FGRPOConfig
    from fdpo.trainers.grpo_trainer import FGRPOTrainer

    data = _grpo_data(task_data_dir)
    kw = {"beta": 0.5, "use_bias_correction_kl": bias_correction, "max_steps": 2}
    trl_trainer = _grpo_run(GRPOConfig, GRPOTrainer, tiny_model_dir, data, tmp_path / "trl", **kw)
    ours = _grpo_run(FGRPOConfig, FGRPOTrainer, tiny_model_dir, data, tmp_path / "fdpo", **kw)
    assert ours.args.estimator == ("k3_ratio" if bias_correction else "k3") and ours.args.divergence_coef == 0.5
    h_trl = [h for h in trl_trainer.state.log_history if "loss" in h]
    h_ours = [h for h in ours.state.log_history if "loss" in h]
    assert len(h_trl) == len(h_ours) == 2
    assert max(h["kl"] for h in h_trl) > 1e-4, "the KL term must be active for the comparison to mean anything"
    for a, b in zip(h_trl, h_ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["div/reverse_kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7)
        assert b["reward"] == a["reward"]
    for (name, p), (_, q) in zip(trl_trainer.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("estimator", "divergence"),
    [("k1_reward", "reverse_kl"), ("k2", "reverse_kl"), ("k3", "reverse_kl"), ("k3_ratio", "reverse_kl"),
     ("k3_plus", "reverse_kl"), ("generator", "js"), ("full_vocab", "js")],
)
def test_grpo_sync_ref_model_with_every_estimator(tiny_model_dir, task_data_dir, tmp_path, estimator, divergence):
    """TRL's SyncRefModelCallback with mixup α = 1 every step: the reference becomes the policy after each step."""
    from fdpo.trainers.grpo_config import FGRPOConfig
    from fdpo.trainers.grpo_trainer import FGRPOTrainer

    ours = _grpo_run(
        FGRPOConfig, FGRPOTrainer, tiny_model_dir, _grpo_data(task_data_dir, 8), tmp_path,
        divergence_coef=0.1, estimator=estimator, divergence=divergence, max_steps=1,
        sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=1.0,
    )
    start = _policy_state(tiny_model_dir)
    moved = False
    for (name, p), (_, r) in zip(ours.model.named_parameters(), ours.ref_model.named_parameters()):
        torch.testing.assert_close(r, p, rtol=0, atol=0, msg=name)
        moved = moved or not torch.equal(p.detach(), start[name])
    assert moved, "the policy must have moved for the synced reference to mean anything"


def _policy_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# SFT and distillation


def _sft_data(task_data_dir: Path, n: int = 8):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(task_data_dir / "sft.jsonl"), split="train").select(range(n))


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.usefixtures("parent_defaults")
def test_sft_without_args_builds_trls_default(tiny_model_dir, task_data_dir):
    from trl import SFTTrainer

    from fdpo.trainers.sft import FSFTConfig, FSFTTrainer

    built = []
    for cls in (SFTTrainer, FSFTTrainer):
        model, tok = _load(tiny_model_dir)
        built.append(cls(model, train_dataset=_sft_data(task_data_dir), processing_class=tok))
    theirs, ours = built
    assert isinstance(ours.args, FSFTConfig) and ours.args.output_dir.endswith("-SFT")
    mine = _public_fields(ours.args)
    for key, value in _public_fields(theirs.args).items():
        assert mine[key] == value, key


def test_sft_takes_plain_training_arguments_and_gives_trls_loss(tiny_model_dir, task_data_dir, tmp_path):
    from transformers import TrainingArguments
    from trl import SFTTrainer

    from fdpo.trainers.sft import FSFTConfig, FSFTTrainer

    def args():
        return TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, per_device_train_batch_size=4,
                                 max_steps=2, **CPU_TRAINER_ARGS)

    built = []
    for cls in (SFTTrainer, FSFTTrainer):
        model, tok = _load(tiny_model_dir)
        built.append(cls(model, args(), train_dataset=_sft_data(task_data_dir), processing_class=tok))
    theirs, ours = built
    assert isinstance(ours.args, FSFTConfig) and ours.args.learning_rate == 3e-4 and ours.args.max_steps == 2
    mine = _public_fields(ours.args)
    for key, value in _public_fields(theirs.args).items():
        assert mine[key] == value, key
    batch = next(iter(theirs.get_train_dataloader()))
    _assert_same_loss_and_grads(theirs, ours, batch, "sft")


def _gkd_pair(tiny_model_dir, task_data_dir, tmp_path, trl_beta):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from fdpo.trainers.distill import FDistillConfig, FDistillTrainer

    kw = {**CPU_TRAINER_ARGS, "per_device_train_batch_size": 4, "max_length": 64}
    if trl_beta is not None:
        kw["beta"] = trl_beta
    built = []
    for config_cls, trainer_cls in ((GKDConfig, GKDTrainer), (FDistillConfig, FDistillTrainer)):
        student, tok = _load(tiny_model_dir)
        teacher = _policy(tiny_model_dir)  # a teacher that differs from the student
        built.append(trainer_cls(
            model=student, teacher_model=teacher, args=config_cls(output_dir=str(tmp_path), **kw),
            train_dataset=_sft_data(task_data_dir).map(lambda r: {"messages": r["prompt"] + r["completion"]},
                                                       remove_columns=["prompt", "completion"]),
            processing_class=tok,
        ))
    return built


@pytest.mark.parametrize("trl_beta", [None, 0.3, 0.0], ids=["default", "beta0.3", "beta0"])
def test_distill_default_and_trl_beta_give_gkds_loss(tiny_model_dir, task_data_dir, tmp_path, trl_beta):
    theirs, ours = _gkd_pair(tiny_model_dir, task_data_dir, tmp_path, trl_beta)
    expected = {None: ("generalized_jsd", 0.5), 0.3: ("generalized_jsd", 0.7), 0.0: ("forward_kl", None)}[trl_beta]
    assert (ours.args.divergence, (ours.args.divergence_params or {}).get("beta")) == pytest.approx(expected)
    batch = next(iter(theirs.get_train_dataloader()))
    _assert_same_loss_and_grads(theirs, ours, batch, f"GKD beta={trl_beta}")


def test_overridden_methods_keep_the_parents_signatures():
    import inspect

    from trl import DPOTrainer, GRPOTrainer, SFTTrainer
    from trl.experimental.gkd import GKDTrainer

    from fdpo.trainers.distill import FDistillTrainer
    from fdpo.trainers.grpo_trainer import FGRPOTrainer
    from fdpo.trainers.sft import FSFTTrainer

    assert isinstance(inspect.getattr_static(FDistillTrainer, "generate_on_policy_outputs"), staticmethod)
    for ours, parent in ((FDPOTrainer, DPOTrainer), (FSFTTrainer, SFTTrainer), (FGRPOTrainer, GRPOTrainer),
                         (FDistillTrainer, GKDTrainer)):
        for name in vars(ours):
            if (name.startswith("__") and name != "__init__") or not callable(getattr(parent, name, None)):
                continue
            mine = inspect.signature(getattr(ours, name)).parameters
            theirs = inspect.signature(getattr(parent, name)).parameters
            kinds = [p.kind for p in mine.values()]
            if name.startswith("_") and name != "__init__" and inspect.Parameter.VAR_KEYWORD in kinds:
                # a private pass-through (…, *args, **kwargs) forwards whatever TRL passes
                head = [k for k, p in mine.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
                assert head == list(theirs)[: len(head)], (ours.__name__, name)
                continue
            # every parent parameter, in order, with its default; fdpo may only append keyword-only ones
            assert list(mine)[: len(theirs)] == list(theirs), (ours.__name__, name)
            for key, p in theirs.items():
                assert mine[key].default == p.default and mine[key].kind == p.kind, (ours.__name__, name, key)
            extra = [p for k, p in mine.items() if k not in theirs]
            assert all(p.kind == p.KEYWORD_ONLY for p in extra), (ours.__name__, name, extra)
