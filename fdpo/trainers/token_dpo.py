"""`TokenDPOTrainer`: token-level preference objectives (TDPO1, TDPO2, SparsePO, MaPO) on TRL's DPOTrainer.

Math: `fdpo.losses.token_level` (docs/objectives.md §4); masks: `fdpo.losses.token_masks`. This class only
gathers the per-token tensors and logs.

Per batch (chosen rows then rejected rows, TRL's collator):
- ONE policy forward through the model's own forward (so DDP/FSDP wrappers see it) with
  ``output_hidden_states=True, logits_to_keep=1``: the final hidden states h, no (batch, seq, vocab) logits.
  TRL's fused-head forward is not used: it returns only gathered log-probs, and KL_t needs the full
  next-token distribution.
- log π(y_t) from h through TRL's chunked log-prob kernel (`trl.kernels.ChunkedLogProbFunction`, the same
  kernel TRL's fused head runs, with entropy/mean logit/top-1 for TRL's metrics);
- ONE reference forward (no grad; the reference model, or the LoRA base with the adapter disabled), with
  ``output_hidden_states=True``: log π_ref(y_t), the reference's final hidden states for KL_t, the per-layer
  states for the learned mask, and (``mask: activations``) MLP/attention outputs through forward hooks;
- KL_t = KL(π_ref ‖ π) (``token_divergence``) over the full vocabulary from the two final hidden states,
  projected chunk by chunk (`fdpo.divergences.full_vocab_divergence_from_hidden`), completion positions only.

TRL's ``precompute_ref_log_probs`` stores only sequence sums, so token-level objectives use an online
reference (rejected at config time otherwise). Learned mask parameters live beside the model (not inside
it, so the saved model stays a plain causal LM): their own optimizer param group with
``mask_weight_decay``, saved as ``fdpo_token_mask.safetensors`` in every checkpoint and the final output,
reloaded on resume; their gradients are averaged across processes by hand (they are outside DDP), cleared
after each optimizer step and clipped to ``max_grad_norm`` on their own.

Sharded models: everything that reads an LM head runs inside the policy's forward (`model_access.in_forward`), where
FSDP2 holds the root unit's head unsharded and ZeRO-3's head is gathered (`model_access.lm_head`); the head's
gradient reaches the shard through the wrapper's own reduction.

Tested on CPU: single process, reference model (given or reloaded from disk), LoRA (reference = the "ref" adapter
when present, else the base with the adapter disabled), gradient checkpointing, resume, 2 processes (DDP, gloo:
losses and learned masks equal the 1-process run, tests/test_token_dpo_ddp.py). FSDP2 (2 CPU ranks): SparsePO with learned masks fails in
accelerate's FSDP2 optimizer switch (the mask parameters live beside the model); not yet supported. ZeRO-3: the
LM-head gather logic with a stand-in only (tests/test_model_access.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback

from fdpo.losses.token_level import (
    DEFAULT_TOKEN_DIVERGENCE,
    mask_statistics,
    sequential_divergence_from_hidden,
    token_level_loss,
    token_rewards,
)
from fdpo.losses.token_masks import MASK_TARGETS, TokenMaskNetworks, activation_mask
from fdpo.trainers.dpo import FDPOConfig, FDPOTrainer
from fdpo.trainers.guards import check_finite_if_enabled
from fdpo.trainers.model_access import check_plain_logits, in_forward, lm_head, reference_forward
from fdpo.trainers.token_dpo_data import DECISIVE_COLUMNS, DecisiveCollator, content, decisive_token_flags

OBJECTIVES = ("fdpo", "tdpo1", "tdpo2", "sparsepo")
MASKS = ("none", "sparse", "activations")
MASK_FILE = "fdpo_token_mask.safetensors"
_LOGPROB_CHUNK = 4096


@dataclass
class TokenDPOConfig(FDPOConfig):
    """`FDPOConfig` plus the token-level objectives. ``objective: fdpo`` is plain f-DPO (FDPOTrainer)."""

    objective: str = field(
        default="sparsepo",
        metadata={
            "help": "Preference objective: `fdpo` (sequence-level f-DPO, `divergence`), `tdpo1` (TDPO1: "
            "−log σ(β[Σr_w − Σr_l + KL_w − KL_l]) with per-token rewards r and sequential KL), `tdpo2` (TDPO2: the "
            "KL difference scaled by `tdpo_alpha`, stop-gradient on the chosen KL), `sparsepo` (TDPO1 with token "
            "masks m^u on rewards and m^d on KL, `mask`).",
            "choices": list(OBJECTIVES),
        },
    )
    mask: str | None = field(
        default=None,
        metadata={
            "help": "SparsePO token masks, from the reference model: `sparse` (learned: per-layer shared "
            "LayerNorm → Linear → ReLU, bias-free mixer → ReLU), `activations` (MaPO: detached min–max scaled "
            "reference activations, one mask for reward and KL), `none` (all ones: TDPO1). Default: `sparse` "
            "for objective sparsepo, `none` otherwise (the only value tdpo1/tdpo2/fdpo accept).",
            "choices": list(MASKS),
        },
    )
    mask_mode: str = field(
        default="common",
        metadata={
            "help": "`common`: one learned mask network for reward and KL (the L1 weights are halved); "
            "`independent`: one network each.",
            "choices": ["common", "independent"],
        },
    )
    mask_targets: list[str] = field(
        default_factory=lambda: list(MASK_TARGETS),
        metadata={
            "help": "Which terms the learned mask multiplies: [reward, kl] (both), [reward] (reward-only "
            "masking, KL unmasked), [kl] (KL-only)."
        },
    )
    l1_reward: float = field(
        default=0.0,
        metadata={"help": "λ_u: L1 weight on the reward mask (per pair, summed over completion tokens)."},
    )
    l1_kl: float = field(
        default=0.0,
        metadata={"help": "λ_d: L1 weight on the KL mask (per pair, summed over completion tokens)."},
    )
    mask_weight_decay: float = field(
        default=0.01,
        metadata={"help": "Weight decay of the learned mask parameters (their own optimizer param group)."},
    )
    mask_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the learned mask parameters (None: `learning_rate`); same scheduler."
        },
    )
    tdpo_alpha: float = field(
        default=0.5, metadata={"help": "α of TDPO2: scale of the KL difference (0.5 in the TDPO paper)."}
    )
    token_divergence: str = field(
        default=DEFAULT_TOKEN_DIVERGENCE,
        metadata={
            "help": "Divergence of the sequential term, per position over the full vocabulary, from fdpo's "
            "registry. TDPO/SparsePO use `forward_kl` = KL(π_ref ‖ π); any registered divergence is accepted."
        },
    )
    kl_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Positions per chunk of the full-vocabulary term (None: about 2M logits per chunk)."
        },
    )

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"TokenDPOConfig: objective must be one of {list(OBJECTIVES)}, got {self.objective!r}."
            )
        if self.mask is None:
            self.mask = "sparse" if self.objective == "sparsepo" else "none"
        if self.mask not in MASKS:
            raise ValueError(f"TokenDPOConfig: mask must be one of {list(MASKS)}, got {self.mask!r}.")
        if self.objective != "sparsepo" and self.mask != "none":
            raise ValueError(
                f"TokenDPOConfig: objective {self.objective!r} uses no token mask (mask: {self.mask!r}); set "
                "objective: sparsepo for masked token-level DPO, or drop the mask key."
            )
        targets = list(self.mask_targets)
        if not targets or any(t not in MASK_TARGETS for t in targets) or len(set(targets)) != len(targets):
            raise ValueError(
                f"TokenDPOConfig: mask_targets must be a non-empty subset of {list(MASK_TARGETS)}, got {targets}."
            )
        if self.mask_mode not in ("common", "independent"):
            raise ValueError(
                f"TokenDPOConfig: mask_mode must be 'common' or 'independent', got {self.mask_mode!r}."
            )
        for name in ("l1_reward", "l1_kl", "mask_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"TokenDPOConfig: {name} must be ≥ 0, got {getattr(self, name)}.")
        if self.objective != "fdpo":
            loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
            if loss_types != ["sigmoid"]:
                raise ValueError(
                    f"TokenDPOConfig: objective {self.objective!r} is a sigmoid loss; set loss_type: [sigmoid] "
                    f"(got {loss_types})."
                )
            if self.precompute_ref_log_probs:
                raise ValueError(
                    f"TokenDPOConfig: objective {self.objective!r} needs per-token reference log-probs and the "
                    "reference's hidden states; TRL's precompute_ref_log_probs stores only sequence sums. Set "
                    "precompute_ref_log_probs: false (the reference then runs online)."
                )
            if self.ld_alpha is not None or self.use_weighting:
                raise ValueError(
                    f"TokenDPOConfig: ld_alpha / use_weighting are sequence-level options, not defined for "
                    f"objective {self.objective!r}."
                )
        from fdpo.divergences import resolve_divergence

        try:
            self.token_divergence = resolve_divergence(self.token_divergence).canonical
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"TokenDPOConfig: token_divergence={self.token_divergence!r}: {exc}") from exc
        super().__post_init__()


class _ZeroMaskGradients(TrainerCallback):
    """The Trainer zeroes only the model's gradients after each optimizer step; the mask networks live beside
    the model, so their gradients are cleared here (else they would accumulate across steps)."""

    def __init__(self, masks: torch.nn.Module) -> None:
        self.masks = masks

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.masks.zero_grad(set_to_none=True)


class TokenDPOTrainer(FDPOTrainer):
    """TDPO1 / TDPO2 / SparsePO / MaPO (``objective``, ``mask``); ``objective: fdpo`` is FDPOTrainer."""

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "fdpo", "token-level"]

    def __init__(self, *args: Any, **kwargs: Any):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, TokenDPOConfig):
            raise TypeError(f"TokenDPOTrainer needs `args=TokenDPOConfig(...)`, got {type(config).__name__}.")
        super().__init__(*args, **kwargs)
        self.token_objective = config.objective
        self.token_masks: TokenMaskNetworks | None = None
        self._checked_hidden = False
        if config.objective == "fdpo":
            return
        if self.ref_model is None and not is_peft_model(self.model):
            raise ValueError("TokenDPOTrainer: token-level objectives need a reference model (online).")
        if config.mask == "sparse":
            ref_cfg = (self.ref_model if self.ref_model is not None else self.model).config.get_text_config()
            self.token_masks = TokenMaskNetworks(
                ref_cfg.hidden_size,
                ref_cfg.num_hidden_layers,
                mode=config.mask_mode,
                targets=config.mask_targets,
            ).to(self.accelerator.device)
            self.add_callback(_ZeroMaskGradients(self.token_masks))
        self.data_collator = DecisiveCollator(self.data_collator)

    # ------------------------------------------------------------------ data: decisive spans → tokens
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        columns = getattr(dataset, "column_names", None) or []
        if getattr(args, "objective", "fdpo") == "fdpo" or "chosen_decisive_spans" not in columns:
            return dataset
        tokenizer = getattr(processing_class, "tokenizer", processing_class)

        def flags(example):
            return {
                f"{side}_decisive": decisive_token_flags(
                    tokenizer,
                    example[f"{side}_ids"],
                    content(example[side]),
                    example[f"{side}_decisive_spans"],
                )
                for side in ("chosen", "rejected")
            }

        return dataset.map(flags, desc=f"Marking decisive tokens of {dataset_name} dataset")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *DECISIVE_COLUMNS]))

    # ------------------------------------------------------------------ optimizer, save, resume
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.token_masks is not None:
            params = list(self.token_masks.parameters())
            present = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not any(id(p) in present for p in params):
                group = {"params": params, "weight_decay": self.args.mask_weight_decay}
                if self.args.mask_learning_rate is not None:
                    group["lr"] = self.args.mask_learning_rate
                optimizer.add_param_group(group)
        return optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.token_masks is not None and self.args.should_save:
            from safetensors.torch import save_file

            out = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(out, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.token_masks.state_dict().items()}
            save_file(state, os.path.join(out, MASK_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.load_token_masks(resume_from_checkpoint)

    def load_token_masks(self, directory: str) -> None:
        """Load the learned mask parameters saved in ``directory`` (a checkpoint or an output dir)."""
        if self.token_masks is None:
            return
        path = os.path.join(directory, MASK_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint has no SparsePO mask parameters (was it written by another "
                "trainer or mask setting?). Resume from a checkpoint of the same recipe."
            )
        from safetensors.torch import load_file

        self.token_masks.load_state_dict(load_file(path, device=str(self.accelerator.device)))

    def _clip_grad_norm(self, model):
        """The model's gradients as the Trainer clips them; the mask networks' gradients clipped on their own
        to the same ``max_grad_norm`` (the logged grad_norm is the model's)."""
        norm = super()._clip_grad_norm(model)
        if self.token_masks is not None:
            torch.nn.utils.clip_grad_norm_(self.token_masks.parameters(), self.args.max_grad_norm)
        return norm

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.token_masks is not None and self.accelerator.num_processes > 1:
            for p in self.token_masks.parameters():  # outside DDP: average their gradients by hand
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        return loss

    # ------------------------------------------------------------------ forward passes
    @staticmethod
    def _activation_hooks(model: torch.nn.Module, store: dict[str, list[torch.Tensor]]) -> list[Any]:
        """Forward hooks collecting the feature-mean of each layer's MLP and attention outputs."""
        import re

        pattern = re.compile(r"(?:^|\.)layers\.\d+\.(mlp|self_attn)$")
        handles = []
        for name, module in model.named_modules():
            match = pattern.search(name)
            if match is None:
                continue
            kind = "mlp" if match.group(1) == "mlp" else "attention"

            def hook(_mod, _inp, output, kind=kind):
                out = output[0] if isinstance(output, tuple) else output
                store.setdefault(kind, []).append(out.detach().float().mean(dim=-1))

            handles.append(module.register_forward_hook(hook))
        return handles

    def _token_logps(self, hidden: torch.Tensor, weight, bias, targets: torch.Tensor, stats: bool):
        from trl.kernels import ChunkedLogProbFunction

        outputs = ("log_probs", "entropy", "mean_logits", "is_top1") if stats else ("log_probs",)
        return ChunkedLogProbFunction.apply(
            hidden, weight, bias, targets, 1.0, _LOGPROB_CHUNK, None, 1.0, outputs
        )

    def _head_terms(self, model, ref_model, outputs, ref_out, targets, shift_mask):
        """Everything that reads an LM head: log π(y_t) (with TRL's entropy/mean-logit/top-1 statistics), log π_ref(y_t),
        the per-token divergence over the full vocabulary, and (MaPO) the reference's mean logit per position
        (h · mean_v(W) + mean b: no logits needed). Run through `model_access.in_forward` (sharded heads)."""
        args: TokenDPOConfig = self.args
        acc = self.accelerator
        with lm_head(acc, model) as (weight, bias), lm_head(acc, ref_model) as (ref_weight, ref_bias):
            if not self._checked_hidden:
                check_plain_logits(
                    outputs.hidden_states[-1][:, -1], outputs.logits[:, -1], weight, bias, "TokenDPOTrainer"
                )
                self._checked_hidden = True
            hidden = outputs.hidden_states[-1][:, :-1][shift_mask]
            logps, entropy, _, mean_logits, is_top1 = self._token_logps(hidden, weight, bias, targets, True)
            ref_hidden = ref_out.hidden_states[-1][:, :-1][shift_mask]
            with torch.no_grad():
                (ref_logps, *_) = self._token_logps(ref_hidden, ref_weight, ref_bias, targets, False)
            kl = sequential_divergence_from_hidden(
                hidden,
                weight,
                ref_hidden,
                ref_weight,
                torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device),
                args.token_divergence,
                lm_head_bias=bias,
                ref_lm_head_bias=ref_bias,
                chunk_size=args.kl_chunk_size,
            )
            logit_mean = None
            if args.mask == "activations":
                with torch.no_grad():
                    logit_mean = ref_out.hidden_states[-1][:, :-1].float() @ ref_weight.float().mean(dim=0)
                    if ref_bias is not None:
                        logit_mean = logit_mean + ref_bias.float().mean()
        return logps, entropy, mean_logits, is_top1, ref_logps, kl, logit_mean

    def _compute_loss(self, model, inputs, return_outputs):
        if self.token_objective == "fdpo":
            return super()._compute_loss(model, inputs, return_outputs)
        args: TokenDPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:].bool()
        targets = input_ids[:, 1:][shift_mask]
        model_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}

        # policy: one forward, final hidden states only (no full logits)
        outputs = model(**model_kwargs, output_hidden_states=True, logits_to_keep=1)
        # reference: one forward, no grad (the reference model, or the PEFT "ref" adapter / adapter-free base)
        store: dict[str, list[torch.Tensor]] = {}
        ref_model = self.model if self.ref_model is None else self.ref_model
        handles = self._activation_hooks(ref_model, store) if args.mask == "activations" else []
        try:
            with reference_forward(
                self.accelerator, self.model, self.ref_model,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as ref:
                ref_out = ref(**model_kwargs, output_hidden_states=True, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        # everything that reads an LM head runs inside the policy's forward when the model is sharded
        logps, entropy, mean_logits, is_top1, ref_logps, kl_rows, logit_mean = in_forward(
            self.accelerator, model, self._head_terms, model, ref_model, outputs, ref_out, targets, shift_mask
        )

        def scatter(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(shift_mask.shape).masked_scatter(shift_mask, values)

        rewards = token_rewards(scatter(logps), scatter(ref_logps), shift_mask)
        kl = scatter(kl_rows)

        masks: dict[str, torch.Tensor] = {}
        if args.mask == "sparse":
            layer_states = torch.stack([h[:, :-1][shift_mask] for h in ref_out.hidden_states[1:]])
            masks = {t: scatter(m) for t, m in self.token_masks(layer_states).items()}
        elif args.mask == "activations":
            with torch.no_grad():
                acts = {k: [a[:, :-1] for a in v] for k, v in store.items()}
                acts["residual"] = [h[:, :-1].float().mean(dim=-1) for h in ref_out.hidden_states[1:]]
                acts["logits"] = [logit_mean]
                m = activation_mask(acts, shift_mask)
            masks = {"reward": m, "kl": m}

        per_pair, metrics = token_level_loss(
            rewards,
            kl,
            shift_mask,
            beta=self.beta,
            objective=args.objective,
            reward_mask=masks.get("reward"),
            kl_mask=masks.get("kl"),
            l1_reward=args.l1_reward if args.mask == "sparse" else 0.0,
            l1_kl=args.l1_kl if args.mask == "sparse" else 0.0,
            shared_mask=self.token_masks is not None and self.token_masks.shared,
            tdpo_alpha=args.tdpo_alpha,
        )
        loss = per_pair.mean()
        if self.model.training:
            check_finite_if_enabled(args, {args.objective: loss}, step=self.state.global_step + 1)

        self._log_token_metrics(mode, metrics, kl, shift_mask, masks, inputs.get("decisive_mask"), logps)
        fused_like = SimpleNamespace(
            entropy=scatter(entropy.detach()),
            mean_logits=scatter(mean_logits.detach()),
            is_top1=scatter(is_top1.detach()).bool(),
        )
        self._log_model_metrics(mode, fused_like, inputs, completion_mask[:, 1:], shift_mask.size(1))

        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, mode, metrics, kl, shift_mask, masks, decisive, logps) -> None:
        gather = self.accelerator.gather
        log = self._metrics[mode]
        for name, values in metrics.items():
            log[name].append(gather(values).float().mean().item())
        kl_seq = (kl.detach() * shift_mask).sum(dim=1)
        log[f"div/{self.args.token_divergence}"].append(gather(kl_seq).float().mean().item())
        chosen_logps, rejected_logps = (
            torch.zeros(shift_mask.shape, device=logps.device)
            .masked_scatter(shift_mask, logps.detach().float())
            .sum(dim=1)
            .chunk(2)
        )
        log["logps/chosen"].append(gather(chosen_logps).mean().item())
        log["logps/rejected"].append(gather(rejected_logps).mean().item())
        decisive_shift = None if decisive is None else decisive[:, 1:].bool()
        seen = set()
        for target, m in masks.items():
            name = "common" if (self.token_masks is not None and self.token_masks.shared) else target
            if self.args.mask == "activations":
                name = "activations"
            if name in seen:
                continue
            seen.add(name)
            s = {k: gather(v).sum() for k, v in mask_statistics(m, shift_mask, decisive_shift).items()}
            n = float(s["n"].clamp_min(1))
            log[f"mask/{name}/sparsity"].append(float(s["zeros"]) / n)
            log[f"mask/{name}/mean"].append(float(s["sum"]) / n)
            if decisive_shift is not None and float(s["decisive_n"]) > 0 and float(s["other_n"]) > 0:
                log[f"mask/{name}/decisive"].append(float(s["decisive_sum"] / s["decisive_n"]))
                log[f"mask/{name}/other"].append(float(s["other_sum"] / s["other_n"]))
