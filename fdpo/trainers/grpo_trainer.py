"""`FGRPOTrainer`: TRL's GRPOTrainer with a selectable divergence penalty η·D_f(π‖π_ref) (docs/objectives.md §1, §6).

The math lives in `fdpo.losses.grpo_penalty` (estimators, their gradients) and `fdpo.divergences`
(full-vocabulary evaluation); this class gathers the tensors and logs.

How it hooks TRL 1.16 (read `trl/trainer/grpo_trainer.py`):

- TRL reads `self.beta` in three places: at construction (beta ≠ 0 builds a reference model, or uses the
  LoRA base with the adapter disabled), in `_generate_and_score_completions` (beta ≠ 0 computes
  `ref_per_token_logps`) and in `_compute_loss` (beta ≠ 0 adds its inline k3 term). `FGRPOConfig.beta`
  stays 0; `FGRPOTrainer.beta` is a property that reads non-zero only at construction and during
  generation, and only when the chosen regulariser needs the reference log-probs. So TRL's own
  reference machinery (model creation, fp32 LM head, fused head at the sampling temperature,
  DeepSpeed/FSDP preparation, PEFT adapter disabling) serves fdpo, and TRL never adds its own KL:
  fdpo's regulariser REPLACES it rather than sitting beside it.
- `_compute_loss` runs TRL's (policy loss, clipping, entropy bonus, metrics) and adds
  η·Σ_{b,t} w_{bt}·penalty_{bt}, where w are the token weights of TRL's aggregation for the
  configured `loss_type` (so the sum equals TRL's inline `beta·per_token_kl` placement exactly). The
  policy log-probs with gradient are taken from TRL's own forward (no second policy forward).
- `estimator: full_vocab` needs the policy's final hidden states: a forward hook on the backbone
  captures them during that same forward; the reference's hidden states are computed once per
  generation batch (one no-grad backbone pass instead of TRL's reference log-prob pass), and
  `full_vocab_divergence_from_hidden` projects both through their LM heads chunk by chunk.
- `estimator: k1_reward` subtracts η·Σ_t k1_t from each rollout's reward and recomputes the group
  advantages (the PPO-RLHF way); π_old's log-probs come from TRL when it computes them, else from one
  extra no-grad forward.

Traps handled: TRL recomputes reference log-probs every generation batch (so does fdpo, only when
needed); log-probs of policy and reference are taken at the SAMPLING temperature (TRL's fused head),
so every estimator regularises D_f between the temperature-scaled distributions (full_vocab too).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from trl import GRPOConfig, GRPOTrainer

from fdpo.divergences import full_vocab_divergence_from_hidden
from fdpo.losses.chi2 import chi2_penalty
from fdpo.losses.disco import disco_loss
from fdpo.losses.dph import rehearsal_loss
from fdpo.losses.fdpg import FDPGState, fdpg_loss
from fdpo.losses.grpo_penalty import ESTIMATORS, group_advantages, per_token_penalty, sequence_k1
from fdpo.trainers.grpo_config import FGRPOConfig
from fdpo.trainers.guards import add_non_finite_stop, check_finite_if_enabled
from fdpo.trainers.model_access import (
    backbone,
    check_plain_head,
    in_forward,
    lm_head,
    reference_forward,
    sharding,
)
from fdpo.trainers.trl_args import as_config, default_args

__all__ = ["FGRPOConfig", "FGRPOTrainer"]


TOKEN_MEAN_METRICS = ("rehearsal/loss", "rehearsal/logratio_mean")  # rehearsal_loss metrics that are token means


class FGRPOTrainer(GRPOTrainer):
    """GRPO with fdpo's divergence penalty; logs `div/<label>` besides TRL's metrics (see module docstring)."""

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "fdpo"]

    # TRL assigns `self.beta = args.beta` (0 for FGRPOConfig) and then reads it; see the module docstring.
    @property
    def beta(self) -> float:
        return self.__dict__.get("_beta_seen_by_trl", 0.0)

    @beta.setter
    def beta(self, value: float) -> None:  # TRL's assignment of args.beta (always 0 here) is ignored
        pass

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: Any = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
    ):
        """`trl.GRPOTrainer`'s signature. `args` may be omitted (TRL's default config, as an `FGRPOConfig`) or a
        plain `trl.GRPOConfig` (every field kept, TRL's `beta` translated). Reward functions: the argument, else
        `args.reward_funcs` by name; neither is TRL's "No reward source provided" error."""
        from fdpo.rewards.registry import get_reward_function

        args = default_args(FGRPOConfig, model, "GRPO") if args is None else as_config(FGRPOConfig, args, GRPOConfig)
        if reward_funcs is None and args.reward_funcs:
            reward_funcs = [get_reward_function(name) for name in args.reward_funcs]
        if args.sync_ref_model and not args.needs_reference:
            raise ValueError(
                "FGRPOTrainer: key 'sync_ref_model' is true but no term uses the reference model (divergence_coef = 0, "
                "chi2_coef = 0, loss_type not fdpg); set `divergence_coef` (or TRL's `beta`) or `sync_ref_model: false`."
            )
        self.penalty_divergence = args.resolved_divergence()
        self.penalty_estimator = ESTIMATORS[args.estimator]
        self._needs_ref_logps = args.needs_ref_logps
        self._needs_ref_hidden = args.divergence_coef > 0 and args.estimator == "full_vocab"
        self.fdpg_state = FDPGState(baseline_momentum=args.fdpg_baseline_momentum) if args.loss_type == "fdpg" else None
        if args.rehearsal_file is not None and args.rehearsal_train_on_exp:
            train_dataset = self._d_exp_dataset(args)
        # non-zero while TRL builds its reference model, only if a term needs one
        self._beta_seen_by_trl = 1.0 if args.needs_reference else 0.0
        self._in_penalty_loss = False
        self._policy_capture: dict[str, Any] = {}
        self._rewards_per_func: torch.Tensor | None = None
        callbacks = list(callbacks or [])
        if args.eval_task is not None:
            from fdpo.eval.callback import PassAtKCallback

            callbacks.append(PassAtKCallback())
        super().__init__(
            model,
            reward_funcs,
            args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        add_non_finite_stop(self)
        self._beta_seen_by_trl = 0.0
        for cb in self.callback_handler.callbacks:
            if hasattr(cb, "bind"):
                cb.bind(self)
        if self._needs_ref_hidden:
            self._check_full_vocab_model()
        self.rehearsal = self._open_rehearsal() if args.rehearsal_file is not None else None

    # ------------------------------------------------------------------ checkpoint state

    STATE_FILE: ClassVar[str] = "fdpo_grpo_state.json"

    def _extra_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.rehearsal is not None:
            out["rehearsal"] = self.rehearsal.state_dict()
        if self.fdpg_state is not None:
            out["fdpg"] = self.fdpg_state.state_dict()
        return out

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self._extra_state()
        if state and self.args.should_save:
            import json
            import os

            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            with open(os.path.join(folder, self.STATE_FILE), "w") as fh:
                json.dump(state, fh)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Resume also the rehearsal stream position and f-DPG's log Z / baseline."""
        super()._load_optimizer_and_scheduler(checkpoint)
        import json
        import os

        path = None if checkpoint is None else os.path.join(checkpoint, self.STATE_FILE)
        if path is None or not os.path.exists(path):
            return
        with open(path) as fh:
            state = json.load(fh)
        if self.rehearsal is not None and "rehearsal" in state:
            self.rehearsal.load_state_dict(state["rehearsal"])
        if self.fdpg_state is not None and "fdpg" in state:
            self.fdpg_state.load_state_dict(state["fdpg"])

    # ------------------------------------------------------------------ DPH-RL rehearsal store

    @staticmethod
    def _d_exp_dataset(args: FGRPOConfig):
        from pathlib import Path

        from datasets import load_dataset

        from fdpo.data.rehearsal import D_EXP, MANIFEST

        root = Path(args.rehearsal_file)
        root = root.parent if root.name == MANIFEST else root
        path = root / D_EXP
        if not path.exists():
            raise FileNotFoundError(
                f"key 'rehearsal_file' = {args.rehearsal_file!r}: {path} does not exist. Run `fdpo presample RECIPE` "
                "first (it writes the store), or set `rehearsal_train_on_exp: false`."
            )
        return load_dataset("json", data_files=str(path), split="train")

    def _open_rehearsal(self):
        from fdpo.data.rehearsal import RehearsalBuffer

        args = self.args
        bs = args.rehearsal_batch_size or max(1, round(args.rehearsal_ratio * args.per_device_train_batch_size))
        return RehearsalBuffer(
            args.rehearsal_file,
            tokenizer=self._tokenizer,
            temperature=self.temperature,
            batch_size=bs,
            seed=args.seed,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            chat_template_kwargs=args.chat_template_kwargs,
            generation={
                "top_p": self.top_p,
                "top_k": self.top_k,
                "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty,
                "max_completion_length": self.max_completion_length,
            },
            model_name_or_path=getattr(self.accelerator.unwrap_model(self.model).config, "_name_or_path", None),
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

    # ------------------------------------------------------------------ reference side

    @property
    def has_reference_model(self) -> bool:
        """Whether a separate reference model is held in memory (PEFT uses the adapter-disabled base)."""
        return self.ref_model is not None

    def _check_full_vocab_model(self) -> None:
        if sharding(self.accelerator) is not None:  # tests/test_fsdp.py: the head is still a DTensor in the loss
            raise ValueError(
                "key 'estimator' = 'full_vocab' is not supported under FSDP or DeepSpeed ZeRO-3 yet (the LM head "
                "is still sharded where the GRPO loss reads it); use `estimator: generator` (unbiased, any f) or "
                "ZeRO-2 / DDP."
            )
        check_plain_head(
            self.accelerator.unwrap_model(self.model).config,
            "key 'estimator' = 'full_vocab' (use `estimator: generator` instead)",
        )

    @torch.no_grad()
    def _reference_hidden_states(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Final hidden states of the reference at the positions predicting each completion token (B, C, H):
        the reference model, or the PEFT "ref" adapter / adapter-free base (`model_access.reference_forward`);
        through the wrapper's forward when the model is sharded."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        c = inputs["completion_ids"].size(1)
        bs = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        out = []
        with reference_forward(self.accelerator, self.model_wrapped, self.ref_model, autocast=False) as ref:
            stack = backbone(self.accelerator, ref)
            for start in range(0, input_ids.size(0), bs):
                with self.accelerator.autocast():
                    h = in_forward(
                        self.accelerator, ref, stack,
                        input_ids=input_ids[start : start + bs],
                        attention_mask=attention_mask[start : start + bs],
                        use_cache=False,
                    ).last_hidden_state
                out.append(h[:, -c - 1 : -1])
        return torch.cat(out, dim=0)

    def _full_vocab_value(self, inputs: dict[str, Any], weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Σ w·D_f over the full vocabulary from both models' hidden states (inside the policy's forward when sharded)."""
        ref = self.model_wrapped if self.ref_model is None else self.ref_model
        with lm_head(self.accelerator, self.model_wrapped) as (w, b), lm_head(self.accelerator, ref) as (rw, rb):
            return full_vocab_divergence_from_hidden(
                self._policy_capture["hidden"],
                w,
                inputs["ref_hidden_states"],
                rw.detach(),
                self.penalty_divergence,
                mask.bool(),
                lm_head_bias=b,
                ref_lm_head_bias=None if rb is None else rb.detach(),
                chunk_size=self.args.full_vocab_chunk_size,
                temperature=self.temperature,
                reduction="sum",
                weights=weights,
            )

    # ------------------------------------------------------------------ generation side

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._beta_seen_by_trl = 1.0 if self._needs_ref_logps else 0.0
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._beta_seen_by_trl = 0.0
        mode = "train" if self.model.training else "eval"
        self._log_group_pass_rates(mode)
        if self.args.divergence_coef > 0 and self.args.estimator == "k1_reward":
            self._fold_k1_into_advantages(output, mode)
        if self._needs_ref_hidden:
            output["ref_hidden_states"] = self._reference_hidden_states(output)
        if self.loss_type in ("disco", "fdpg"):
            self._add_sequence_rewards(output, mode)
        return output

    def _add_sequence_rewards(self, output: dict[str, Any], mode: str) -> None:
        """Local per-rollout rewards and group ids (DisCO regroups shuffled rows; f-DPG's target needs r)."""
        rpf = self._rewards_per_func
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        local = output["completion_ids"].size(0)
        start = self.accelerator.process_index * local
        n = self.num_generations if mode == "train" else self.num_generations_eval
        output["group_rewards"] = rewards[start : start + local]
        output["group_index"] = torch.arange(start, start + local, device=rewards.device) // n
        if self.loss_type == "fdpg" and mode == "train":
            self._update_fdpg_log_z(output)

    @torch.no_grad()
    def _fdpg_sequences(self, inputs: dict[str, Any], mask: torch.Tensor, logps: torch.Tensor | None = None):
        """(log q, log P) per rollout: q = π_old (the sampler), P = a·b or a·exp(r/β), a = π_ref (sequence)."""
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None and logps is not None else old
        log_q = None if old is None else (old.float() * mask).sum(-1)
        log_a = (inputs["ref_per_token_logps"].float() * mask).sum(-1)
        r = inputs["group_rewards"].float()
        if self.args.fdpg_target == "constraint":
            log_p = torch.where(r >= 0.5, log_a, torch.full_like(log_a, -float("inf")))
        else:
            log_p = log_a + r / self.args.fdpg_beta
        return log_q, log_p

    @torch.no_grad()
    def _update_fdpg_log_z(self, output: dict[str, Any]) -> None:
        """Add this generation batch (all processes) to the running importance-sampling estimate of log Z."""
        mask = output["completion_mask"].float()
        old = output.get("old_per_token_logps")
        if old is None:
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            attn = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            old, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, attn, output["completion_ids"].size(1), batch_size=self.args.per_device_train_batch_size
            )
        log_q = (old.float() * mask).sum(-1)
        _, log_p = self._fdpg_sequences(output, mask)
        self.fdpg_state.update_log_z(self.accelerator.gather(log_p), self.accelerator.gather(log_q))

    def _log_group_pass_rates(self, mode: str) -> None:
        rpf = self._rewards_per_func
        if rpf is None:
            return
        n = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1).view(-1, n)
        self._metrics[mode]["rollouts/solved_all"].append((rewards > 0.5).all(dim=1).float().mean().item())
        self._metrics[mode]["rollouts/solved_none"].append((rewards <= 0.5).all(dim=1).float().mean().item())

    @torch.no_grad()
    def _fold_k1_into_advantages(self, output: dict[str, Any], mode: str) -> None:
        """r ← r − η·Σ_t k1_t (k1 = log π_old − log π_ref of the sampled tokens), then TRL's group advantages."""
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        old = output.get("old_per_token_logps")
        if old is None:
            input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            bs = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
            old, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size=bs
            )
        k1 = sequence_k1(old, output["ref_per_token_logps"], mask)
        all_k1 = self.accelerator.gather(k1)
        rpf = self._rewards_per_func
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rpf).all(dim=1)] = torch.nan
        n = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = group_advantages(rewards - self.args.divergence_coef * all_k1, n, self.scale_rewards)
        local = k1.size(0)
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local]
        tokens = self.accelerator.gather(mask.sum()).sum().clamp(min=1)
        self._metrics[mode][f"div/{self.penalty_divergence.label}"].append((all_k1.sum() / tokens).item())
        self._metrics[mode]["k1_reward/penalty"].append((self.args.divergence_coef * all_k1).mean().item())

    # ------------------------------------------------------------------ loss side

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if not self._in_penalty_loss:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        handle = None
        if self._needs_ref_hidden:
            hiddens: list[torch.Tensor] = []
            handle = backbone(self.accelerator, model).register_forward_hook(lambda _m, _i, out: hiddens.append(out.last_hidden_state))
        try:
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        finally:
            if handle is not None:
                handle.remove()
        self._policy_capture["logps"] = result[0]
        if handle is not None:
            self._policy_capture["hidden"] = torch.cat([h[:, -logits_to_keep - 1 : -1] for h in hiddens], dim=0)
        return result

    def _token_weights(self, mask: torch.Tensor, inputs: dict[str, Any], mode: str) -> torch.Tensor:
        """w with TRL's loss = Σ_{b,t} w_{bt}·per_token_loss_{bt} for the configured `loss_type`."""
        mask = mask.float()
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        lt = self.loss_type
        if lt in ("grpo", "sapo"):
            return mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / mask.size(0) / accum
        if lt == "bnpo":
            return mask / mask.sum().clamp(min=1.0) / accum
        if lt == "dr_grpo":
            return mask / (mask.size(0) * self.max_completion_length) / accum
        if lt in ("dapo", "cispo", "vespo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return mask / normalizer
        if lt == "luspo":
            return mask / mask.size(0) / accum
        raise ValueError(f"FGRPOTrainer: unsupported loss_type {lt!r}")

    def _penalty(self, inputs: dict[str, Any], weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """η·Σ w·penalty, and the metric div/<label> (the weighted mean of the regularised per-token value)."""
        logps = self._policy_capture["logps"]
        est = self.args.estimator
        if est == "full_vocab":
            value = in_forward(self.accelerator, self.model_wrapped, self._full_vocab_value, inputs, weights, mask)
        else:
            per_token = per_token_penalty(
                est, self.penalty_divergence, logps, inputs["ref_per_token_logps"], inputs.get("old_per_token_logps")
            )
            value = (weights * per_token).sum()
        stats = self.accelerator.reduce(torch.stack([value.detach().float(), weights.sum().float()]), reduction="sum")
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][f"div/{self.penalty_divergence.label}"].append((stats[0] / stats[1].clamp(min=1e-30)).item())
        return self.args.divergence_coef * value

    def _log_metrics(self, metrics: dict[str, torch.Tensor], mode: str, prefix: str = "") -> None:
        for name, value in metrics.items():
            v = self.accelerator.gather(value.detach().float().reshape(1)).nanmean().item()
            self._metrics[mode][prefix + name].append(v)

    def _policy_objective(self, model, inputs, mode: str) -> torch.Tensor:
        """TRL's policy loss (its loss_type), or DisCO / f-DPG on the same rollouts; captures log π."""
        self._in_penalty_loss = True
        try:
            if self.loss_type not in ("disco", "fdpg"):
                return super()._compute_loss(model, inputs)
            input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, inputs["completion_ids"].size(1), compute_entropy=True
            )
        finally:
            self._in_penalty_loss = False
        mask = inputs["completion_mask"].float()
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        self._metrics[mode]["entropy"].append(
            (self.accelerator.gather((entropies * mask).sum()).sum() / self.accelerator.gather(mask.sum()).sum()).item()
        )
        old = inputs.get("old_per_token_logps")
        if self.loss_type == "disco":
            order = torch.argsort(inputs["group_index"], stable=True)  # rows of one question together again
            loss, metrics = disco_loss(
                logps[order], mask[order], inputs["group_rewards"][order], self.num_generations
                if mode == "train" else self.num_generations_eval,
                old_token_logps=None if old is None else old[order],
                score=self.args.disco_score,
                form=self.args.disco_form,
                tau=self.args.disco_tau,
                delta=self.args.disco_delta,
                constraint_beta=self.args.disco_beta,
                kl_estimator=self.args.disco_kl_estimator,
            )
        else:
            log_q, log_p = self._fdpg_sequences(inputs, mask, logps)
            loss, metrics = fdpg_loss(
                (logps * mask).sum(-1), log_q, log_p, self.penalty_divergence,
                log_z=self.fdpg_state.log_z, baseline=self.fdpg_state.baseline,
            )
            if mode == "train":
                is_mean = self.accelerator.gather(metrics["fdpg/pseudo_reward_is"].reshape(1)).mean()
                self.fdpg_state.update_baseline(is_mean)
        self._log_metrics(metrics, mode)
        return loss / accum

    def _rehearsal_term(self, model, mode: str) -> torch.Tensor:
        """η · token-mean f̃(u) on the next chunk of stored π_ref samples (DPH-RL), no reference model."""
        batch = self.rehearsal.next_batch(self.accelerator.device)
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, batch.input_ids, batch.attention_mask, batch.logits_to_keep
        )
        # token mean over the rehearsal batch of ALL processes: each process divides its token sum by the global
        # count / world size, so DDP's gradient average gives Σ_all / N_all (as one process would)
        count = batch.completion_mask.sum().float()
        total = self.accelerator.gather(count.reshape(1)).sum()
        world = self.accelerator.num_processes
        loss, metrics = rehearsal_loss(
            logps, batch.ref_logps, batch.completion_mask, self.args.rehearsal_divergence,
            num_tokens=(total / world).clamp(min=1.0 / world),
        )
        if world > 1:  # logged as one process would (_log_metrics averages the processes' values)
            for name in [k for k in metrics if k.startswith("div/") or k in TOKEN_MEAN_METRICS]:
                metrics[name] = metrics[name] * count * world / total.clamp(min=1.0)  # mean over all tokens
            if "rehearsal/logratio_abs_max" in metrics:
                metrics["rehearsal/logratio_abs_max"] = self.accelerator.gather(
                    metrics["rehearsal/logratio_abs_max"].reshape(1)).max()
            metrics["rehearsal/tokens"] = total
        clash = self.args.divergence_coef > 0 and f"div/{self.penalty_divergence.label}" in metrics
        self._log_metrics(metrics if not clash else {("rehearsal/" + k): v for k, v in metrics.items()}, mode)
        return self.args.rehearsal_coef * loss / self.current_gradient_accumulation_steps

    def _chi2_term(self, inputs: dict[str, Any], mask: torch.Tensor, mode: str) -> torch.Tensor:
        """chi2_coef · √χ² (or χ²) of the sequence log-ratios of this micro-batch's rollouts (Correlated Proxies)."""
        logps = self._policy_capture["logps"]
        seq = ((logps.float() - inputs["ref_per_token_logps"].float()) * mask).sum(-1)
        penalty, metrics = chi2_penalty(seq, sqrt=self.args.chi2_sqrt)
        self._log_metrics(metrics, mode)
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return self.args.chi2_coef * penalty / accum

    def _compute_loss(self, model, inputs):
        self._policy_capture = {}
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        # DPH-RL: the rehearsal forward runs BEFORE the policy forward. Autograd's engine runs the ready node with
        # the highest sequence number first, so the backward then finishes the (large) policy graph before the
        # rehearsal one: the rehearsal's gradients are not allocated for every parameter while the policy's
        # activations and LM-head tile are still alive (that cost one model copy of peak memory, the very copy
        # DPH-RL saves by loading no reference model; benchmarks/bench_grpo.py measures it).
        rehearsal = None
        if self.rehearsal is not None and mode == "train" and self.args.rehearsal_coef > 0:
            rehearsal = self._rehearsal_term(model, mode)
        terms: dict[str, torch.Tensor] = {"policy_loss": self._policy_objective(model, inputs, mode)}
        if self.args.divergence_coef > 0 and not self.penalty_estimator.in_reward:
            if self.loss_type in ("disco", "fdpg"):
                accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
                weights = mask.float() / mask.sum().clamp(min=1.0) / accum  # token mean
            else:
                weights = self._token_weights(mask, inputs, mode)
            terms[f"penalty/{self.penalty_divergence.label}"] = self._penalty(inputs, weights, mask)
        if self.args.chi2_coef > 0:
            terms["penalty/chi2_occupancy"] = self._chi2_term(inputs, mask.float(), mode)
        if rehearsal is not None:
            terms[f"rehearsal/{self.args.rehearsal_divergence}"] = rehearsal
        check_finite_if_enabled(self.args, terms, step=self.state.global_step + 1)
        self._policy_capture = {}
        return sum(terms.values())
