"""f-regularised SFT: NLL of the demonstrations + γ · D_f(π‖π_ref) per completion token (docs/objectives.md §2).

Source: "Implicit Reward as the Bridge: A Unified View of SFT and DPO Connections" (2025): in plain SFT the
KL-to-reference term of the implicit-reward objective is constant in π, so nothing restrains the update;
SFT objectives derived from f-divergences keep that term. fdpo's form (the paper's exact per-f losses were
not retrieved, docs/objectives.md §2) is, over the N completion tokens t of a batch (the tokens whose label is
not −100, the tokens TRL's SFT loss counts),

    L = (1/N) Σ_t [ −log π(y_t | x, y_<t)  +  γ · D_f(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) ],
    D_f(π‖π_ref) = Σ_v π_ref(v) f(π(v)/π_ref(v))    (full vocabulary, every registered f).

The NLL term is TRL's own (`trl.SFTTrainer`, fused LM head), passed in as a number; this module adds the
regulariser with the SAME normaliser N (TRL's `num_items_in_batch`, i.e. the tokens of the whole
gradient-accumulation step, or the micro-batch's token count when that is not given), so the sum over
micro-batches is one token mean of the whole bracket.

Why full vocabulary only (no "sampled" estimator): the demonstration tokens y_t are samples of the data
distribution, not of π (docs/objectives.md §1.3) nor of π_ref (§1.2). f(u(y_t)) on them estimates
E_data[f(π/π_ref)], which is not D_f(π‖π_ref) (it is not even ≥ 0-in-expectation for a general f and
vanishes on tokens the data never shows), and π_ref/p_data importance weights are unknown. An honest
sampled estimate needs fresh samples of π or π_ref at every step (generation), which is RL, not SFT.

Evaluation: `full_vocab_divergence_from_hidden` on the final hidden states and the LM-head weights of both
models, in chunks of positions, never materialising the (batch, seq, vocab) logits; with
`reduction="sum"` the gradient is computed in the same pass as the value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdpo.divergences import Divergence, full_vocab_divergence_from_hidden, resolve_divergence

#: divergence logged as the distance to the starting checkpoint (reverse KL, the usual RLHF KL).
KL_TO_START = "reverse_kl"


def token_normaliser(mask: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
    """TRL's SFT normaliser: `num_items_in_batch` when given, else the number of completion tokens (≥ 1)."""
    if num_items_in_batch is None:
        return mask.sum().clamp(min=1).to(torch.float32)
    return torch.as_tensor(num_items_in_batch, device=mask.device).to(torch.float32)


def fsft_loss(
    nll: Tensor,
    hidden: Tensor,
    lm_head_weight: Tensor,
    ref_hidden: Tensor,
    ref_lm_head_weight: Tensor,
    mask: Tensor,
    divergence: str | Divergence,
    *,
    coef: float,
    num_items_in_batch: Tensor | int | None = None,
    scale: float = 1.0,
    lm_head_bias: Tensor | None = None,
    ref_lm_head_bias: Tensor | None = None,
    token_logps: Tensor | None = None,
    log_kl_to_start: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """f-SFT loss `nll + coef · scale · Σ_t D_f(π_t‖π_ref,t) / N` and its metrics.

    Args:
        nll: TRL's SFT loss for this micro-batch (already divided by N and multiplied by `scale`).
        hidden: (B, T, H) final hidden states of π at the positions that predict each label (shifted).
        lm_head_weight: (V, H) LM head of π (gradients flow to `hidden` and to it).
        ref_hidden, ref_lm_head_weight: the same for π_ref (detached: π_ref is frozen).
        mask: (B, T) 1 where the label is a completion token (TRL's `labels != -100`, shifted).
        divergence: a registry name/label or a `Divergence`.
        coef: γ ≥ 0.
        num_items_in_batch: TRL's normaliser N (tokens of the whole accumulation step); None: `mask.sum()`.
        scale: the factor TRL multiplies its loss by under `average_tokens_across_devices` (world size).
        token_logps: (B, T) log π(y_t) (0 off the mask), for the logged `nll` (the micro-batch's token mean).
        log_kl_to_start: also return `kl_to_start` = token mean of KL(π‖π_ref) (π_ref is the start point).

    Returns:
        (loss, metrics) with metrics `div/<label>`, `nll` (when `token_logps` is given) and `kl_to_start`
        (when asked): token means over this micro-batch, detached.
    """
    div = resolve_divergence(divergence)
    if coef < 0:
        raise ValueError(f"divergence_coef must be ≥ 0, got {coef}")
    mask = mask.bool()
    n_local = mask.sum().clamp(min=1).to(torch.float32)
    norm = token_normaliser(mask, num_items_in_batch)
    ref_hidden, ref_lm_head_weight = ref_hidden.detach(), ref_lm_head_weight.detach()
    ref_bias = None if ref_lm_head_bias is None else ref_lm_head_bias.detach()
    # Σ_t D_t (masked positions contribute nothing); reduction="sum" computes the gradient in the same pass;
    # with γ = 0 (logging only) no gradient is computed
    with torch.set_grad_enabled(torch.is_grad_enabled() and coef > 0):
        div_sum = full_vocab_divergence_from_hidden(
            hidden if coef > 0 else hidden.detach(),
            lm_head_weight if coef > 0 else lm_head_weight.detach(),
            ref_hidden,
            ref_lm_head_weight,
            div,
            mask,
            lm_head_bias=lm_head_bias if coef > 0 or lm_head_bias is None else lm_head_bias.detach(),
            ref_lm_head_bias=ref_bias,
            chunk_size=chunk_size,
            reduction="sum",
        )
    loss = nll if coef == 0 else nll + (coef * scale) * div_sum / norm
    metrics: dict[str, Tensor] = {f"div/{div.label}": div_sum.detach() / n_local}
    if token_logps is not None:
        metrics["nll"] = -(token_logps.detach().float() * mask).sum() / n_local
    if log_kl_to_start:
        if div.label == KL_TO_START:
            metrics["kl_to_start"] = metrics[f"div/{div.label}"]
        else:
            with torch.no_grad():
                kl_sum = full_vocab_divergence_from_hidden(
                    hidden.detach(),
                    lm_head_weight.detach(),
                    ref_hidden,
                    ref_lm_head_weight,
                    KL_TO_START,
                    mask,
                    lm_head_bias=None if lm_head_bias is None else lm_head_bias.detach(),
                    ref_lm_head_bias=ref_bias,
                    chunk_size=chunk_size,
                    reduction="sum",
                )
            metrics["kl_to_start"] = kl_sum / n_local
    return loss, metrics
