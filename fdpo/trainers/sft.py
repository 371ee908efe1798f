"""`FSFTTrainer`: TRL's SFTTrainer with an optional f-divergence regulariser to a reference (f-SFT).

Loss (docs/objectives.md §2; "Implicit Reward as the Bridge", 2025), over the N completion tokens of a batch:

    L = (1/N) Σ_t [ −log π(y_t | x, y_<t) + γ · D_f(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) ]

γ = `divergence_coef` (default 0: plain SFT, exactly TRL's loss, no reference loaded). The NLL term is TRL's
own (`SFTTrainer.compute_loss`, fused LM head, its normalisation); the regulariser and its math live in
`fdpo.losses.fsft_loss`. π_ref defaults to the starting checkpoint (`model_name_or_path`), loaded again
from its path as a frozen copy (as TRL's DPOTrainer loads its reference); under LoRA it is the base model
with the adapter disabled (no second copy). `ref_model_name_or_path` names another reference.

Post-DPO SFT ("Implicit Reward as the Bridge" recommends a reduced learning rate there): start from the
DPO checkpoint (`model_name_or_path: runs/tiny/dpo`), which is then also the reference, and set
`lr_scale` (effective learning rate = `learning_rate` × `lr_scale`; see `FSFTConfig.lr_scale`).

One policy forward. TRL 1.16's SFT loss runs the backbone once and projects the hidden states through
its fused, chunked LM head without building the logits. fdpo captures that same forward's final hidden
states (a forward hook on the backbone) and its per-token outputs (a hook on the model), and evaluates
the divergence from the hidden states and both LM heads in chunks (`full_vocab_divergence_from_hidden`):
no second policy forward, no (batch, seq, vocab) tensor. The reference runs its backbone once under
`no_grad`. Logged: `nll`, `div/<label>` and `kl_to_start` (token mean of KL(π‖π_start); when the
reference is the starting model it is the same reference forward, and when the divergence is reverse KL
it is the same number).

Sharded models (FSDP2, DeepSpeed ZeRO-3): the reference backbone runs through its wrapper's forward and the
divergence inside the policy's (`fdpo.trainers.model_access`), so the LM heads are full there and the head's
gradient reaches the sharded weight through FSDP's / ZeRO-3's own reduction (2-process FSDP2 test:
tests/test_fsdp.py). LoRA: the reference is the base with the adapter named "ref" active if the model has
one, else with every adapter disabled.

Not supported with γ > 0 (clear errors): models with logit scaling or soft-capping (the chunked projection is h·Wᵀ + b),
TRL's deprecated `label_smoothing_factor` / `compute_loss_func` paths (their loss is not the fused one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from accelerate.utils import is_peft_model
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from fdpo.losses.fsft_loss import fsft_loss
from fdpo.trainers.divergence_choice import DivergenceChoice
from fdpo.trainers.guards import NonFiniteStop, add_non_finite_stop, check_finite_if_enabled
from fdpo.trainers.model_access import (
    backbone,
    causal_lm,
    check_plain_head,
    in_forward,
    lm_head,
    reference_forward,
)
from fdpo.trainers.trl_args import as_config, default_args

ESTIMATORS = ("full_vocab",)


@dataclass
class FSFTConfig(DivergenceChoice, NonFiniteStop, SFTConfig):
    """Configuration of `FSFTTrainer`: every field of `trl.SFTConfig`, plus the f-divergence regulariser
    (`divergence`, `alpha`, `divergence_params` from `DivergenceChoice`: any registry entry)."""

    divergence_coef: float = field(
        default=0.0,
        metadata={
            "help": "γ: weight of the per-token mean of D_f(π‖π_ref) added to the NLL. 0 (default) is plain SFT, "
            "exactly TRL's loss, and loads no reference model."
        },
    )
    divergence_estimator: str = field(
        default="full_vocab",
        metadata={
            "help": "How D_f is evaluated: `full_vocab` (exact, per position over the vocabulary, in chunks). There "
            "is no `sampled` option: demonstration tokens are samples of neither π nor π_ref, so f(u) on them does "
            "not estimate D_f(π‖π_ref) (see fdpo/losses/fsft_loss.py)."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reference π_ref. Default: the starting checkpoint (model_name_or_path) as a frozen copy, or "
            "under LoRA the base model with the adapter disabled (no second copy)."
        },
    )
    log_kl_to_start: bool | None = field(
        default=None,
        metadata={
            "help": "Log `kl_to_start`, the token mean of KL(π‖π_start). Default: whenever a reference is loaded "
            "anyway (divergence_coef > 0 and the reference is the starting model). `true` with divergence_coef = 0 "
            "loads the starting model for logging only."
        },
    )
    lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "Multiplies learning_rate: the effective rate is learning_rate × lr_scale (after construction "
            "`learning_rate` holds it; the given rate is kept in `base_learning_rate`). 'Implicit Reward as the "
            "Bridge' (2025) recommends a reduced learning rate for SFT after DPO (e.g. lr_scale: 0.1)."
        },
    )
    base_learning_rate: float | None = field(
        default=None, init=False, metadata={"help": "learning_rate as given, before lr_scale (set by fdpo)."}
    )


    def __post_init__(self):
        if self.divergence_estimator not in ESTIMATORS:
            raise ValueError(
                f"FSFTConfig: divergence_estimator={self.divergence_estimator!r} is not available; valid: "
                f"{list(ESTIMATORS)}. A sampled estimate of D_f(π‖π_ref) needs samples of π or π_ref; the "
                "demonstrations are neither (fdpo/losses/fsft_loss.py explains)."
            )
        if not self.divergence_coef >= 0:
            raise ValueError(f"FSFTConfig: divergence_coef must be ≥ 0, got {self.divergence_coef}.")
        if not self.lr_scale > 0:
            raise ValueError(f"FSFTConfig: lr_scale must be > 0, got {self.lr_scale}.")
        self.resolve_divergence_choice()
        self.base_learning_rate = self.learning_rate
        self.learning_rate = self.learning_rate * self.lr_scale
        super().__post_init__()

    @property
    def divergence_label(self) -> str:
        return self.resolved_divergence().label


def _same_path(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return a == b
    return a == b or os.path.realpath(a) == os.path.realpath(b)


class FSFTTrainer(SFTTrainer):
    """Supervised fine-tuning, optionally regularised by γ·D_f(π‖π_ref); stops with the step and term
    named if a loss term goes non-finite."""

    _tag_names: ClassVar[list[str]] = ["trl", "sft", "fdpo"]

    def __init__(
        self,
        model: Any,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_loss_func: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: Any = None,
        preprocess_logits_for_metrics: Any = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Any = None,
        *,
        ref_model: Any = None,
    ):
        """`trl.SFTTrainer`'s signature plus `ref_model` (keyword only). `args` may be omitted (TRL's default
        config, as an `FSFTConfig`), a `trl.SFTConfig` or a plain `transformers.TrainingArguments` (every field
        kept, as SFTTrainer does)."""
        if args is None:
            config = default_args(FSFTConfig, model, "SFT")
        else:
            config = as_config(FSFTConfig, args, TrainingArguments)
        super().__init__(
            model,
            args=config,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        add_non_finite_stop(self)
        self.fsft_divergence = config.resolved_divergence()
        self.divergence_coef = float(config.divergence_coef)
        start = getattr(self._policy_lm().config, "_name_or_path", "") or None
        self.ref_is_start = ref_model is None and (
            config.ref_model_name_or_path is None or _same_path(config.ref_model_name_or_path, start)
        )
        log_kl = config.log_kl_to_start
        self.log_kl_to_start = (self.divergence_coef > 0 and self.ref_is_start) if log_kl is None else bool(log_kl)
        if self.log_kl_to_start and not self.ref_is_start:
            raise ValueError(
                "FSFTConfig: log_kl_to_start needs the reference to be the starting model; with "
                f"ref_model_name_or_path={config.ref_model_name_or_path!r} the divergence to it is logged as "
                "div/<name> instead."
            )
        self.uses_reference = self.divergence_coef > 0 or self.log_kl_to_start
        self.ref_model = None
        self._captured: dict[str, Any] | None = None
        if not self.uses_reference:
            return
        self._check_supported(config)
        if ref_model is None and not (self._is_peft() and config.ref_model_name_or_path is None):
            ref_model = self._load_reference(config.ref_model_name_or_path or start, config)
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        lm = self._policy_lm()
        lm.register_forward_hook(self._capture_hook("outputs"))
        lm.base_model.register_forward_hook(self._capture_hook("hidden"))

    # ----------------------------------------------------------------------------------------------
    # set-up
    # ----------------------------------------------------------------------------------------------

    def _is_peft(self) -> bool:
        return is_peft_model(self.accelerator.unwrap_model(self.model))

    def _policy_lm(self):
        """The causal-LM module that carries TRL's fused head (the PEFT base model under LoRA)."""
        return causal_lm(self.accelerator, self.model)

    def _check_supported(self, config: FSFTConfig) -> None:
        what = f"divergence_coef={config.divergence_coef} (or log_kl_to_start)"
        if self.label_smoother is not None or self.compute_loss_func is not None:
            raise ValueError(
                f"FSFTTrainer: {what} needs TRL's fused SFT loss; unset label_smoothing_factor / compute_loss_func."
            )
        check_plain_head(self._policy_lm().config, f"FSFTTrainer: {what}")

    def _load_reference(self, path: str | None, config: FSFTConfig):
        if not path:
            raise ValueError(
                "FSFTTrainer: the reference is the starting checkpoint, but the model has no `_name_or_path` to load "
                "it from; set `ref_model_name_or_path` or pass `ref_model=`."
            )
        from trl.trainer.utils import create_model_from_path

        lm = self._policy_lm()
        kwargs: dict[str, Any] = dict(config.model_init_kwargs or {})
        kwargs.setdefault("dtype", lm.dtype)
        kwargs.setdefault("attn_implementation", lm.config._attn_implementation)
        kwargs["device_map"] = None
        return create_model_from_path(path, **kwargs)

    def _capture_hook(self, key: str):
        def hook(module, args, output):
            if self._captured is not None and key not in self._captured:  # the first (training) forward only
                self._captured[key] = output.last_hidden_state if key == "hidden" else output

        return hook

    # ----------------------------------------------------------------------------------------------
    # loss
    # ----------------------------------------------------------------------------------------------

    def _reference_hidden(self, inputs: dict[str, Any]) -> torch.Tensor:
        """π_ref's final hidden states (no grad): the reference model, or under LoRA the policy with the
        "ref" adapter active or every adapter disabled (`model_access.reference_forward`)."""
        kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "output_router_logits")}
        kwargs["use_cache"] = False
        with reference_forward(
            self.accelerator, self.model, self.ref_model,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs, autocast=False,
        ) as ref:
            stack = backbone(self.accelerator, ref)
            return in_forward(self.accelerator, ref, lambda: stack(**kwargs).last_hidden_state)

    def _divergence_terms(self, nll, hidden, ref_hidden, mask, num_items_in_batch, token_logps):
        """`fsft_loss` with both LM heads, full (run inside the policy's forward when sharded)."""
        scale = 1.0
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = float(self.accelerator.num_processes // self.get_tp_size())
        ref = self.model if self.ref_model is None else self.ref_model
        with lm_head(self.accelerator, self.model) as (weight, bias), lm_head(self.accelerator, ref) as (rw, rb):
            return fsft_loss(
                nll,
                hidden,
                weight,
                ref_hidden.to(hidden.device),
                rw.detach(),
                mask,
                self.fsft_divergence,
                coef=self.divergence_coef,
                num_items_in_batch=num_items_in_batch,
                scale=scale,
                lm_head_bias=bias,
                ref_lm_head_bias=None if rb is None else rb.detach(),
                token_logps=token_logps,
                log_kl_to_start=self.log_kl_to_start,
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.uses_reference:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if isinstance(result, tuple) else result
            if model.training:
                check_finite_if_enabled(self.args, {"nll": loss}, step=self.state.global_step + 1)
            return result

        mode = "train" if self.model.training else "eval"
        self._captured = {}
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            captured = self._captured
        finally:
            self._captured = None
        nll = result[0] if isinstance(result, tuple) else result
        fused, hidden = captured["outputs"], captured["hidden"]
        if "shift_labels" not in inputs:
            hidden = hidden[:, :-1]
        mask = fused.label_mask
        if hidden.shape[:2] != mask.shape:
            raise ValueError(
                f"FSFTTrainer: hidden states {tuple(hidden.shape[:2])} and labels {tuple(mask.shape)} do not align "
                "(prompt-learning PEFT adapters are not supported with divergence_coef > 0)."
            )
        ref_hidden = self._reference_hidden(inputs)
        if "shift_labels" not in inputs:
            ref_hidden = ref_hidden[:, :-1]
        loss, metrics = in_forward(
            self.accelerator, model, self._divergence_terms,
            nll, hidden, ref_hidden, mask, num_items_in_batch, fused.log_probs,
        )
        if model.training:
            check_finite_if_enabled(
                self.args,
                {"nll": nll, **{k: v for k, v in metrics.items() if k.startswith("div/")}, "loss": loss},
                step=self.state.global_step + 1,
            )
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.reshape(1)).mean().item())
        if isinstance(result, tuple):
            return (loss, *result[1:])
        return loss
