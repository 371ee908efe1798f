"""`FDistillTrainer`: knowledge distillation with any registered divergence, on TRL's GKD machinery.

Loss (docs/objectives.md §9; `fdpo.losses.distill`): token mean over the completion of D(student ‖ teacher) over
the full vocabulary, with the student in the π slot and the teacher in the π_ref slot: `forward_kl` is
KL(teacher ‖ student) (the usual KD), `reverse_kl` KL(student ‖ teacher), `generalized_jsd` (β, GKD /
DistillSpec), `total_variation` (DistillSpec), any other registered f, or `bdkd` (BD-KD's entropy-balanced
forward + reverse KL).

Base class: TRL 1.16 ships two distillation trainers. `trl.DistillationTrainer` (stable) is on-policy only
(prompt-only data, GRPO-style generation); the mixture of fixed data and student samples with fraction λ
(GKD, DistillSpec) lives in `trl.experimental.gkd.GKDTrainer` (an `SFTTrainer` subclass; **experimental**
in TRL 1.16, so its API may change). fdpo subclasses GKDTrainer and keeps its machinery: the ChatML
collator, the teacher loading/preparation (DeepSpeed or `accelerator.prepare_model`), and
`training_step`, which with probability `lmbda` replaces the batch by completions sampled from the student
(`temperature`, `max_new_tokens`) and otherwise, with `seq_kd`, by teacher samples. fdpo replaces the loss
(`compute_loss`: one student forward, one teacher forward under no_grad, both projecting only the positions
from the batch's first completion token on (`logits_to_keep`), the divergence from `fdpo.losses.distill`) and records whether each batch was sampled from the student (`on_policy`).

Differences from TRL's GKD, on purpose: TRL's `beta` is replaced by `divergence` (β of generalized_jsd =
1 − TRL beta; TRL's `beta` must stay at its default); `distill_temperature` is the temperature of the loss
(TRL's GKD uses T = 1 in the loss whatever `temperature` says; `temperature` stays the sampling
temperature); each micro-batch's loss is its own token mean (TRL divides by the token count of the
dataset batch even when the batch was replaced by generated completions of another length).
Data: a `messages` column, or conversational `prompt`/`completion` columns (joined into `messages`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from trl.experimental.gkd import GKDConfig, GKDTrainer

from fdpo.losses.distill import distill_loss, resolve_distill_objective
from fdpo.trainers.divergence_choice import DivergenceChoice, divergence_field
from fdpo.trainers.guards import check_finite_terms

_TRL_DEFAULT_BETA = 0.5


@dataclass
class FDistillConfig(DivergenceChoice, GKDConfig):
    """Configuration of `FDistillTrainer`: every field of TRL's `GKDConfig` (λ = `lmbda`, `seq_kd`,
    `temperature` for sampling, `max_new_tokens`, `teacher_model_name_or_path`), plus the divergence."""

    divergence: str = divergence_field(
        "forward_kl",
        "Distillation: D(student ‖ teacher) over the full vocabulary, the student in π's slot (forward_kl = "
        "KL(teacher‖student), the usual KD; generalized_jsd's β = student weight = 1 − TRL's GKD beta).",
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The teacher (a local directory or hub name) with the student's vocabulary; required (e.g. the "
            "SFT model trained longer: runs/tiny/sft)."
        },
    )
    distill_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature T of the loss: both distributions are softmax(logits / T) (no T² factor)."},
    )


    def __post_init__(self):
        if self.beta != _TRL_DEFAULT_BETA:
            raise ValueError(
                "FDistillConfig: set `divergence` instead of TRL's GKD `beta` (got beta="
                f"{self.beta}); TRL's generalised JSD with beta b is `divergence: generalized_jsd` with "
                f"divergence_params {{beta: {1 - self.beta:g}}} (fdpo's β weights the student)."
            )
        if not self.distill_temperature > 0:
            raise ValueError(f"FDistillConfig: distill_temperature must be > 0, got {self.distill_temperature}.")
        self.resolve_divergence_choice(resolve_distill_objective)
        super().__post_init__()


def _to_messages(dataset, where: str):
    """GKD's collator reads `messages`; conversational prompt/completion rows are joined into it."""
    if dataset is None or "messages" in dataset.column_names:
        return dataset
    if not {"prompt", "completion"} <= set(dataset.column_names):
        raise ValueError(
            f"FDistillTrainer: the {where} dataset needs a `messages` column or conversational `prompt` and "
            f"`completion` columns; it has {dataset.column_names}."
        )
    if not isinstance(dataset[0]["prompt"], list):
        raise ValueError(
            f"FDistillTrainer: the {where} dataset's `prompt`/`completion` are plain text; distillation uses the "
            "chat template, so give them as lists of {role, content} messages (or a `messages` column)."
        )
    return dataset.map(lambda row: {"messages": row["prompt"] + row["completion"]},
                       remove_columns=["prompt", "completion"])


class FDistillTrainer(GKDTrainer):
    """GKD with the loss taken from fdpo's registry (or BD-KD); logs `div/<label>` and `on_policy`."""

    _tag_names: ClassVar[list[str]] = ["trl", "gkd", "fdpo"]

    def __init__(self, *args: Any, teacher_model: Any = None, **kwargs: Any):
        config = kwargs.get("args")
        if not isinstance(config, FDistillConfig):
            raise TypeError(f"FDistillTrainer needs `args=FDistillConfig(...)`, got {type(config).__name__}.")
        if args:
            raise TypeError("FDistillTrainer takes keyword arguments only (model=..., args=..., ...).")
        if teacher_model is None:
            teacher_model = config.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError("FDistillTrainer: set `teacher_model_name_or_path` (or pass teacher_model=).")
        for key, where in (("train_dataset", "train"), ("eval_dataset", "eval")):
            if kwargs.get(key) is not None:
                kwargs[key] = _to_messages(kwargs[key], where)
        self.objective = resolve_distill_objective(config.divergence, config.divergence_kwargs())
        self._batch_source = "data"
        self.generated_batches = 0
        super().__init__(teacher_model=teacher_model, **kwargs)

    def generate_on_policy_outputs(self, model, inputs, generation_config):  # GKD calls it on the student or teacher
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self._batch_source = "teacher" if model is teacher else "student"
        self.generated_batches += 1
        return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._batch_source = "data"
        # None: each micro-batch is its own token mean (Trainer then averages over accumulation steps), because
        # a batch replaced by generated completions no longer has the dataset's token count
        return super().training_step(model, inputs, None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        mask = inputs["labels"][:, 1:] != -100
        # logits only from the first position that predicts a completion token on (the prompt's are never used)
        cols = mask.any(dim=0).nonzero()
        first = int(cols[0]) if cols.numel() else 0
        keep = mask.shape[1] + 1 - first
        student_outputs = model(**model_inputs, use_cache=False, logits_to_keep=keep)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_logits = self.teacher_model(**model_inputs, use_cache=False, logits_to_keep=keep).logits
        loss, metrics = distill_loss(
            student_outputs.logits[:, :-1],
            teacher_logits[:, :-1],
            mask[:, first:],
            self.objective,
            temperature=self.args.distill_temperature,
        )
        if model.training:
            check_finite_terms({f"div/{self.objective.label}": loss}, step=self.state.global_step + 1)
        metrics["on_policy"] = torch.tensor(float(self._batch_source == "student"))
        metrics["teacher_samples"] = torch.tensor(float(self._batch_source == "teacher"))
        metrics["completion_tokens"] = mask.sum().float()
        for name, value in metrics.items():
            value = value.to(self.accelerator.device).reshape(1)
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).float().mean().item())
        return (loss, student_outputs) if return_outputs else loss
