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

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from trl import DPOConfig, DPOTrainer

from fdpo.losses.fdpo_loss import DEFAULT_SCORE_CAP, LOSS_TYPES, FDPOScore, fdpo_loss
from fdpo.trainers.divergence_choice import DivergenceChoice
from fdpo.trainers.guards import check_finite_terms

_TRL_DEFAULT_ALPHA_COEF = 0.5
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


@dataclass
class FDPOConfig(DivergenceChoice, DPOConfig):
    """Configuration of `FDPOTrainer`: every field of `trl.DPOConfig`, plus the divergence (`divergence`,
    `alpha`, `divergence_params` from `DivergenceChoice`; f-DPO takes the registry's f-DPO-valid entries).

    TRL's own `f_divergence_type` / `f_alpha_divergence_coef` are replaced by `divergence` / `alpha`
    (α = 1 − `f_alpha_divergence_coef`) and must stay at their defaults.
    """

    score_cap: float = field(
        default=DEFAULT_SCORE_CAP,
        metadata={
            "help": "Magnitude of the f′ score beyond which it is continued linearly in the log-ratio (C¹), so "
            "forward KL / α / Jeffreys / Hellinger / Neyman stay finite with non-zero gradients for sequence "
            "log-ratios down to −1000. The loss is exact while |score| ≤ score_cap."
        },
    )


    def __post_init__(self):
        if self.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"FDPOConfig: set `divergence` instead of TRL's `f_divergence_type` "
                f"(got f_divergence_type={self.f_divergence_type!r})."
            )
        if self.f_alpha_divergence_coef != _TRL_DEFAULT_ALPHA_COEF:
            raise ValueError(
                f"FDPOConfig: set `alpha` instead of TRL's `f_alpha_divergence_coef` "
                f"(α = 1 − f_alpha_divergence_coef = {1 - self.f_alpha_divergence_coef:g})."
            )
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unknown = [t for t in loss_types if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(
                f"FDPOConfig: loss_type {unknown} is not supported by f-DPO; valid: {list(LOSS_TYPES)}."
            )
        if "robust" in loss_types and not (0.0 <= self.label_smoothing < 0.5):
            raise ValueError(
                f"FDPOConfig: the robust loss needs label_smoothing in [0, 0.5), got {self.label_smoothing}."
            )
        if self.beta <= 0:
            raise ValueError(f"FDPOConfig: beta must be positive, got {self.beta}.")
        # resolved through FDPOScore, which refuses a divergence f-DPO cannot use; one canonical form is stored
        self.resolve_divergence_choice(lambda name, params: FDPOScore(name, score_cap=self.score_cap, **params).divergence)
        super().__post_init__()


class FDPOTrainer(DPOTrainer):
    """f-DPO on top of TRL's DPOTrainer; logs `div/<label>` and `scores/*` besides TRL's metrics."""

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "fdpo"]

    def __init__(self, *args: Any, **kwargs: Any):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, FDPOConfig):
            raise TypeError(f"FDPOTrainer needs `args=FDPOConfig(...)`, got {type(config).__name__}.")
        self.fdpo_score = FDPOScore(config.resolved_divergence(), score_cap=config.score_cap)
        super().__init__(*args, **kwargs)

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
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            per_pair, metrics = fdpo_loss(
                chosen_logps,
                rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                self.fdpo_score,
                beta=self.beta,
                loss_type=loss_type,
                label_smoothing=self.label_smoothing,
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
            )
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            terms[f"fdpo_{loss_type}"] = per_pair.mean()
            loss = loss + terms[f"fdpo_{loss_type}"] * loss_weight
        if self.aux_loss_enabled:
            terms["aux_loss"] = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item()
            )
        if self.model.training:
            check_finite_terms(terms, step=self.state.global_step + 1)

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
