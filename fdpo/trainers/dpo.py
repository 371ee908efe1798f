"""`FDPOTrainer`: TRL's DPOTrainer with the divergence taken from fdpo's registry (f-DPO).

Loss (f-DPO, "Beyond Reverse KL", ICLR 2024; docs/objectives.md §3): with ℓ = log π − log π_ref summed over
the completion tokens and the score s(ℓ) = c_f·(f′(e^ℓ) − f′(1)), the sigmoid loss is
−log σ(β·(s(ℓ_w) − s(ℓ_l))); hinge, ipo and robust are defined on the same margin as TRL defines them.
The math lives in `fdpo.losses.fdpo_loss`; this class gathers the sequence log-probabilities.

Hook: TRL 1.16 computes everything in `DPOTrainer._compute_loss` (policy forward through its fused LM
head, reference log-probs, the loss, the metrics) with no smaller loss method to override, so
`FDPOTrainer` overrides `_compute_loss` and keeps TRL's pieces around it: the data collator and
tokenisation, the fused-head policy forward, `compute_ref_log_probs` for the reference (a separate
model, or the LoRA base with the adapter disabled, with gradient checkpointing switched off for it),
the precomputed `ref_chosen_logps`/`ref_rejected_logps` columns, LD-DPO `ld_alpha`, WPO weighting, the
MoE aux loss and TRL's `_metrics` logging.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from trl import DPOConfig, DPOTrainer

from fdpo.divergences import divergence_class, get_divergence
from fdpo.losses.fdpo_loss import DEFAULT_SCORE_CAP, FDPOScore, check_loss_type, fdpo_loss
from fdpo.trainers.divergence_choice import DivergenceChoice
from fdpo.trainers.guards import NonFiniteStop, add_non_finite_stop, check_finite_if_enabled
from fdpo.trainers.trl_args import as_config, default_args

logger = logging.getLogger("fdpo")

_TRL_DEFAULT_ALPHA_COEF = 0.5
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})
# TRL 1.16's `f_divergence_type` values → fdpo's registry names
TRL_F_DIVERGENCES = {
    "reverse_kl": "reverse_kl",
    "forward_kl": "forward_kl",
    "js_divergence": "js",
    "alpha_divergence": "alpha",
}


@dataclass
class FDPOConfig(DivergenceChoice, NonFiniteStop, DPOConfig):
    """Configuration of `FDPOTrainer`: every field of `trl.DPOConfig`, plus the divergence (`divergence`,
    `alpha`, `divergence_params` from `DivergenceChoice`; f-DPO takes the registry's f-DPO-valid entries).

    TRL's own `f_divergence_type` / `f_alpha_divergence_coef` are understood: `f_divergence_type: js_divergence`
    is `divergence: js`, `alpha_divergence` with coefficient a is `divergence: alpha` with α = 1 − a
    (docs/objectives.md §0). Giving both TRL's and fdpo's key with different meanings is an error naming both.
    """

    score_cap: float = field(
        default=DEFAULT_SCORE_CAP,
        metadata={
            "help": "Magnitude of the f′ score beyond which it is continued linearly in the log-ratio (C¹), so "
            "forward KL / α / Jeffreys / Hellinger / Neyman stay finite with non-zero gradients for sequence "
            "log-ratios down to −1000. The loss is exact while |score| ≤ score_cap."
        },
    )

    def _translate_trl_divergence(self) -> None:
        """Fold TRL's `f_divergence_type` / `f_alpha_divergence_coef` into `divergence` / `alpha`."""
        trl_type, coef = self.f_divergence_type, self.f_alpha_divergence_coef
        if trl_type not in TRL_F_DIVERGENCES:
            raise ValueError(
                f"FDPOConfig: key 'f_divergence_type' = {trl_type!r} is not one of TRL's {list(TRL_F_DIVERGENCES)}; "
                "fdpo's own `divergence` key takes every registry name."
            )
        ours = divergence_class(self.divergence.split("(")[0]).canonical
        if trl_type != "reverse_kl":
            translated = TRL_F_DIVERGENCES[trl_type]
            if ours not in ("reverse_kl", translated):
                raise ValueError(
                    f"FDPOConfig: keys 'f_divergence_type' = {trl_type!r} (TRL's name for divergence {translated!r}) "
                    f"and 'divergence' = {self.divergence!r} disagree; set only one of them."
                )
            if ours == "reverse_kl":
                logger.info("FDPOConfig: TRL's f_divergence_type = %r is divergence = %r.", trl_type, translated)
                self.divergence = ours = translated
        if ours != "alpha" or (coef == _TRL_DEFAULT_ALPHA_COEF and trl_type != "alpha_divergence"):
            return
        given = self.alpha
        if given is None:
            given = (self.divergence_params or {}).get("alpha")
        if given is None and "(" in self.divergence:
            given = get_divergence(self.divergence).params.get("alpha")
        from_coef = 1.0 - coef
        if given is None:
            logger.info(
                "FDPOConfig: TRL's f_alpha_divergence_coef a = %g is fdpo's alpha = 1 − a = %g "
                "(docs/objectives.md §0: fdpo's α → 0 is reverse KL, α → 1 forward KL).", coef, from_coef,
            )
            if abs(from_coef) < 1e-6:  # TRL: a = 1 is the limit f′(u) = log u, reverse KL
                self.divergence = "reverse_kl"
            else:
                self.alpha = from_coef
        elif coef != _TRL_DEFAULT_ALPHA_COEF and abs(float(given) - from_coef) > 1e-9:
            raise ValueError(
                f"FDPOConfig: keys 'f_alpha_divergence_coef' = {coef} (TRL's a; fdpo's alpha = 1 − a = {from_coef:g}) "
                f"and 'alpha' = {given} disagree; set only one of them."
            )

    def __post_init__(self):
        try:
            self._translate_trl_divergence()
        except ValueError as exc:
            if str(exc).startswith("FDPOConfig"):
                raise
            raise ValueError(f"FDPOConfig: divergence={self.divergence!r}: {exc}") from exc
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if self.beta <= 0:
            raise ValueError(f"FDPOConfig: beta must be positive, got {self.beta}.")
        try:
            score = FDPOScore(self.divergence, score_cap=self.score_cap, **self.divergence_kwargs())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"FDPOConfig: divergence={self.divergence!r}: {exc}") from exc
        for loss_type in loss_types:
            try:
                check_loss_type(loss_type, score.divergence, label_smoothing=self.label_smoothing)
            except ValueError as exc:
                raise ValueError(f"FDPOConfig: key 'loss_type': {exc}.") from exc
        # store one canonical form: the name, with every parameter (also those written in a label such as
        # 'alpha(0.5)') in `alpha` / `divergence_params`
        self.store_canonical_divergence(score.divergence.canonical, score.divergence.params)
        super().__post_init__()


class FDPOTrainer(DPOTrainer):
    """f-DPO on top of TRL's DPOTrainer; logs `div/<label>` and `scores/*` besides TRL's metrics.

    Same signature as `trl.DPOTrainer`. `args` may be omitted (TRL's default config, as an `FDPOConfig`) or a
    plain `trl.DPOConfig` (its fields are kept, TRL's divergence names translated).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "fdpo"]

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: DPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ):
        args = default_args(FDPOConfig, model, "DPO") if args is None else as_config(FDPOConfig, args, DPOConfig)
        self.f_dpo_score = FDPOScore(args.resolved_divergence(), score_cap=args.score_cap)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        add_non_finite_stop(self)

    def _sequence_logps(self, per_token_logps: torch.Tensor, shift_mask: torch.Tensor) -> torch.Tensor:
        """Σ_t log p over the completion; with LD-DPO's `ld_alpha`, tokens past the pair's shared length × ld_alpha."""
        if self.ld_alpha is None:
            return per_token_logps.sum(dim=1)  # the fused head returns 0 where the label is −100
        position = shift_mask.cumsum(dim=1)
        chosen_len, rejected_len = shift_mask.sum(dim=1).chunk(2, dim=0)
        shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
        in_shared = (position > 0) & (position <= shared)
        in_tail = position > shared
        return (per_token_logps * in_shared).sum(dim=1) + self.ld_alpha * (per_token_logps * in_tail).sum(
            dim=1
        )

    def _reference_logps(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        # TRL's own reference pass: the reference model, or (PEFT, no ref_model) the base with the adapter off.
        return self.compute_ref_log_probs(self.model if self.ref_model is None else self.ref_model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        seq_len = shift_mask.size(1)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        per_token_logps = outputs.log_probs[:, -seq_len:]  # PEFT prompt learning prepends virtual tokens
        chosen_logps, rejected_logps = self._sequence_logps(per_token_logps, shift_mask).chunk(2, dim=0)
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(inputs)
        chosen_lengths, rejected_lengths = completion_mask.sum(dim=1).chunk(2, dim=0)

        pair_weights = None
        if self.use_weighting:  # WPO (arXiv 2406.11827, eq. 2), as TRL: detached, length-normalised
            with torch.no_grad():
                aligned = (per_token_logps - outputs.log_sum_sq_probs[:, -seq_len:]) * shift_mask
                weights = torch.exp(aligned.sum(dim=1) / shift_mask.sum(dim=1).clamp_min(1))
            chosen_w, rejected_w = weights.chunk(2, dim=0)
            pair_weights = chosen_w * rejected_w

        loss: torch.Tensor | float = 0.0
        terms: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        chosen_token_logps, _ = per_token_logps.chunk(2, dim=0)
        chosen_token_mask, _ = shift_mask.chunk(2, dim=0)
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            per_pair, metrics = fdpo_loss(
                chosen_logps,
                rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                self.f_dpo_score,
                beta=self.beta,
                loss_type=loss_type,
                label_smoothing=self.label_smoothing,
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
                discopop_tau=self.args.discopop_tau,
                chosen_token_logps=chosen_token_logps,
                chosen_token_mask=chosen_token_mask,
            )
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            terms[f"f_dpo_{loss_type}"] = per_pair.mean()
            loss = loss + terms[f"f_dpo_{loss_type}"] * loss_weight
        if self.aux_loss_enabled:
            terms["aux_loss"] = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item()
            )
        if self.model.training:
            check_finite_if_enabled(self.args, terms, step=self.state.global_step + 1)

        self._log_model_metrics(mode, outputs, inputs, shift_mask, seq_len)
        for name, values in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather(values).float().mean().item())
        self._metrics[mode]["logps/chosen"].append(
            self.accelerator.gather(chosen_logps.detach()).mean().item()
        )
        self._metrics[mode]["logps/rejected"].append(
            self.accelerator.gather(rejected_logps.detach()).mean().item()
        )

        if return_outputs:
            warnings.warn(
                "`return_outputs=True` recomputes the logits with an extra forward pass (the fused LM head "
                "does not build them), as in TRL.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_model_metrics(
        self, mode: str, outputs: Any, inputs: dict[str, Any], shift_mask, seq_len: int
    ) -> None:
        """TRL's per-batch model metrics: entropy, tokens seen, mean logits, chosen token accuracy."""
        gather = self.accelerator.gather_for_metrics

        def ratio(num: torch.Tensor, den: torch.Tensor) -> float:
            num, den = gather(num).sum().item(), gather(den).sum().item()
            return num / den if den > 0 else 0.0

        mask = shift_mask.bool()
        self._metrics[mode]["entropy"].append(
            ratio((outputs.entropy[:, -seq_len:].detach() * shift_mask).sum(), shift_mask.sum())
        )
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].detach().chunk(2, dim=0)
        self._metrics[mode]["logits/chosen"].append(
            ratio(chosen_logits[chosen_mask].sum(), chosen_mask.sum())
        )
        self._metrics[mode]["logits/rejected"].append(
            ratio(rejected_logits[rejected_mask].sum(), rejected_mask.sum())
        )
        chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        self._metrics[mode]["mean_token_accuracy"].append(
            ratio((chosen_top1 & chosen_mask).sum(), chosen_mask.sum())
        )
