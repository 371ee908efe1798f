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

Parent defaults: without `divergence` the loss is GKD's, the generalised JSD with TRL's `beta` (default 0.5;
fdpo's β of generalized_jsd weights the student, so it is 1 − TRL's beta; TRL's beta 0 is forward_kl, 1 is
reverse_kl). `generate_on_policy_outputs` stays TRL's @staticmethod with TRL's signature.
Differences from TRL's GKD, on purpose: `distill_temperature` is the temperature of the loss
(TRL's GKD uses T = 1 in the loss whatever `temperature` says; `temperature` stays the sampling
temperature); each micro-batch's loss is its own token mean (TRL divides by the token count of the
dataset batch even when the batch was replaced by generated completions of another length).
Data: a `messages` column, or conversational `prompt`/`completion` columns (joined into `messages`).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from trl.experimental.gkd import GKDConfig, GKDTrainer

from fdpo.losses.distill import distill_loss, resolve_distill_objective
from fdpo.trainers.divergence_choice import DivergenceChoice, divergence_field
from fdpo.trainers.guards import NonFiniteStop, add_non_finite_stop, check_finite_if_enabled
from fdpo.trainers.trl_args import as_config, default_args

_TRL_DEFAULT_BETA = 0.5
# (the unwrapped teacher, the sources generated so far) while `FDistillTrainer.training_step` runs: TRL's
# generate_on_policy_outputs is a @staticmethod, so it cannot reach the trainer otherwise
_GENERATION: ContextVar[tuple[Any, list[str]] | None] = ContextVar("fdpo_distill_generation", default=None)


@dataclass
class FDistillConfig(DivergenceChoice, NonFiniteStop, GKDConfig):
    """Configuration of `FDistillTrainer`: every field of TRL's `GKDConfig` (λ = `lmbda`, `seq_kd`,
    `temperature` for sampling, `max_new_tokens`, `teacher_model_name_or_path`), plus the divergence."""

    divergence: str | None = divergence_field(
        None,
        "Distillation: D(student ‖ teacher) over the full vocabulary, the student in π's slot (forward_kl = "
        "KL(teacher‖student), the usual KD; generalized_jsd's β = student weight = 1 − TRL's GKD beta). Default: "
        "GKD's own loss, generalized_jsd with β = 1 − `beta` (TRL's GKD beta, default 0.5).",
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


    def _gkd_divergence(self) -> tuple[str, dict[str, Any]]:
        """GKD's loss for TRL's `beta` b: KL(teacher‖student) at 0, KL(student‖teacher) at 1, else GJSD(1 − b)."""
        if self.beta == 0.0:
            return "forward_kl", {}
        if self.beta == 1.0:
            return "reverse_kl", {}
        return "generalized_jsd", {"beta": 1.0 - self.beta}

    def __post_init__(self):
        gkd_name, gkd_params = self._gkd_divergence()
        if self.divergence is None:
            self.divergence, self.divergence_params = gkd_name, gkd_params or None
        elif self.beta != _TRL_DEFAULT_BETA:
            chosen = resolve_distill_objective(self.divergence, self.divergence_kwargs())
            gkd = resolve_distill_objective(gkd_name, gkd_params)
            if (chosen.canonical, chosen.params) != (gkd.canonical, gkd.params):
                raise ValueError(
                    f"FDistillConfig: keys 'beta' = {self.beta} (TRL's GKD beta, i.e. divergence {gkd_name!r} "
                    f"{gkd_params or ''}) and 'divergence' = {self.divergence!r} disagree; set only one of them "
                    "(fdpo's generalized_jsd β weights the student: β = 1 − TRL's beta)."
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

    def __init__(
        self,
        model: Any = None,
        teacher_model: Any = None,
        args: GKDConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        preprocess_logits_for_metrics: Any = None,
        peft_config: Any = None,
        formatting_func: Any = None,
    ):
        """`GKDTrainer`'s signature. `args` may be omitted (a default named after the model, as TRL's trainers
        build theirs) or a `GKDConfig` (every field kept, its `beta` the GKD loss unless `divergence` is set)."""
        if args is None:
            args = default_args(FDistillConfig, model, "GKD")
        else:
            args = as_config(FDistillConfig, args, GKDConfig)
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError("FDistillTrainer: set `teacher_model_name_or_path` (or pass teacher_model=).")
        train_dataset = _to_messages(train_dataset, "train")
        eval_dataset = _to_messages(eval_dataset, "eval")
        self.objective = resolve_distill_objective(args.divergence, args.divergence_kwargs())
        self.generated_batches = 0
        super().__init__(
            model,
            teacher_model,
            args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        add_non_finite_stop(self)

    @staticmethod
    def generate_on_policy_outputs(model, inputs, generation_config):
        """TRL's (a @staticmethod with TRL's signature); inside `training_step` it also records which model
        generated the batch (the student, or the teacher under `seq_kd`)."""
        record = _GENERATION.get()
        if record is not None:
            teacher, sources = record
            sources.append("teacher" if model is teacher else "student")
        return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

    def training_step(self, model, inputs, num_items_in_batch=None):
        sources: list[str] = []
        token = _GENERATION.set((self.accelerator.unwrap_model(self.teacher_model), sources))
        try:
            # None: each micro-batch is its own token mean (Trainer then averages over accumulation steps), because
            # a batch replaced by generated completions no longer has the dataset's token count
            return super().training_step(model, inputs, None)
        finally:
            _GENERATION.reset(token)
            self.generated_batches += len(sources)

    def _batch_source(self) -> str:
        """'data', 'student' or 'teacher': where the batch being scored comes from."""
        record = _GENERATION.get()
        return record[1][-1] if record is not None and record[1] else "data"

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
            check_finite_if_enabled(self.args, {f"div/{self.objective.label}": loss}, step=self.state.global_step + 1)
        source = self._batch_source()
        metrics["on_policy"] = torch.tensor(float(source == "student"))
        metrics["teacher_samples"] = torch.tensor(float(source == "teacher"))
        metrics["completion_tokens"] = mask.sum().float()
        for name, value in metrics.items():
            value = value.to(self.accelerator.device).reshape(1)
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).float().mean().item())
        return (loss, student_outputs) if return_outputs else loss
