"""`FGRPOConfig`: every field of `trl.GRPOConfig` plus fdpo's divergence penalty and RL objectives (docs/objectives.md §1, §6-§9).

The trainer is `fdpo.trainers.grpo_trainer.FGRPOTrainer` (config and trainer in their own files, as TRL).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import GRPOConfig

from fdpo.data.presample_settings import PresampleArguments
from fdpo.divergences import get_divergence
from fdpo.losses.grpo_penalty import ESTIMATORS, check_estimator
from fdpo.trainers.divergence_choice import DivergenceChoice
from fdpo.trainers.guards import NonFiniteStop

logger = logging.getLogger("fdpo")
_DEFAULT_ESTIMATOR = "k3_ratio"
_ESTIMATOR_HELP = (
    "How η·D_f(π‖π_ref) is estimated on rollouts and which gradient it follows (docs/objectives.md §1): "
    "`k1_reward`: k1 = log π − log π_ref summed over the completion and subtracted from the reward before the "
    "group advantages (PPO-RLHF); gradient ∇KL(π‖π_ref) through the policy gradient (k1 used as a loss has "
    "expected gradient 0, hence in the reward). "
    "`k2`: ½ℓ² as a loss (biased value) → ∇KL(π‖π_ref). "
    "`k3`: e^−ℓ − 1 + ℓ as a loss (unbiased value of the reverse KL) → ∇KL(π_ref‖π), the FORWARD-KL gradient. "
    "`k3_ratio`: (π/π_old)·k3 (TRL 1.16's default `use_bias_correction_kl`) → ∇KL(π‖π_ref), reverse. "
    "`k3_plus`: ½ℓ² + sg(k3 − ½ℓ²), k3's value (unbiased, ≥ 0) with k2's gradient → ∇KL(π‖π_ref) (straight-through). "
    "`generator`: (π/π_old)·f̃(u)/u, the unbiased E_π[f(u)/u] with its score-function term → ∇D_f(π‖π_ref), "
    "any registered f. "
    "`full_vocab`: Σ_v π_ref f(π/π_ref) exactly at every completion position (chunked) → ∇D_f(π‖π_ref) exactly. "
    "k1_reward, k2, k3, k3_ratio and k3_plus need `divergence: reverse_kl`. All are per-position (prefix held fixed), as "
    "TRL's k3; values and gradients are at the sampling temperature. The ratio π/π_old is per token even with "
    "`importance_sampling_level: sequence` (where TRL would use the sequence-level ratio)."
)


@dataclass
class FGRPOConfig(DivergenceChoice, NonFiniteStop, PresampleArguments, GRPOConfig):  # output_dir first, as TRL
    """Configuration of `FGRPOTrainer`: every field of `trl.GRPOConfig`, plus the divergence penalty.

    TRL's `beta` b is understood: it becomes `divergence_coef: b` with `estimator: k3_ratio` (TRL's default
    `use_bias_correction_kl: true`) or `estimator: k3` (false), and `beta` is then 0. `reward_funcs` has no
    default: without reward functions (here or as the trainer's argument) TRL's error stands. The keys of
    `fdpo presample` (`presample_n`, `pef_threshold`, ...) are accepted so one recipe serves both stages.
    `loss_type` also takes `disco` (DisCO, docs/objectives.md §8) and `fdpg` (f-DPG, §9).
    """

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions by name (fdpo.rewards: `synthetic_task`, a task name such as `sum_pairs`, "
            "`math_verify`, `exact_match`) or dotted path `pkg.module:function`; weights in `reward_weights`. "
            "Used when the trainer gets no `reward_funcs` argument; none at all is TRL's error."
        },
    )
    divergence_coef: float = field(
        default=0.0,
        metadata={"help": "η, the coefficient of the divergence penalty (0: no penalty, no reference model)."},
    )
    estimator: str = field(
        default=_DEFAULT_ESTIMATOR, metadata={"help": _ESTIMATOR_HELP, "choices": list(ESTIMATORS)}
    )
    full_vocab_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Positions per chunk of `estimator: full_vocab` (None: about 2M logits per chunk on CPU)."},
    )
    chi2_coef: float = field(
        default=0.0,
        metadata={
            "help": "Correlated Proxies (ICLR 2025) χ² occupancy penalty: coefficient of mean_batch(R + 1/R − 2), "
            "R = e^L, L the sequence log-ratio log π − log π_ref of each rollout (released RLHF run: 0.0008 with "
            "`chi2_sqrt: true`). Needs the reference model."
        },
    )
    chi2_sqrt: bool = field(
        default=True, metadata={"help": "Penalise √max(χ², 1e-4) (the released code) instead of χ²."}
    )
    rehearsal_file: str | None = field(
        default=None,
        metadata={
            "help": "DPH-RL: the store written by `fdpo presample` (its directory, by default <output_dir>/dph, "
            "or manifest.json). Each step adds `rehearsal_coef` × token-mean f̃(u) on stored π_ref samples; "
            "no reference model is loaded for it. A tokenizer/chat-template/temperature mismatch is refused."
        },
    )
    rehearsal_divergence: str = field(
        default="forward_kl",
        metadata={"help": "DPH-RL: f of the rehearsal term (any registry entry or label, e.g. `js`, `alpha(0.5)`)."},
    )
    rehearsal_coef: float = field(
        default=0.02, metadata={"help": "DPH-RL: η of the rehearsal term (paper: 0.01–0.05 forward KL, 0.05–0.2 JS)."}
    )
    rehearsal_batch_size: int | None = field(
        default=None,
        metadata={"help": "DPH-RL: stored samples per micro-batch and process (None: from `rehearsal_ratio`)."},
    )
    rehearsal_ratio: float = field(
        default=0.125,
        metadata={
            "help": "DPH-RL: rehearsal samples per RL rollout when `rehearsal_batch_size` is unset "
            "(paper: 256 per 2048 = 0.125); at least one sample per micro-batch."
        },
    )
    rehearsal_train_on_exp: bool = field(
        default=True,
        metadata={"help": "DPH-RL: run RL on the store's D_exp prompts (d_exp.jsonl) instead of `dataset_name`."},
    )
    disco_score: str = field(
        default="log_l",
        metadata={"help": "DisCO (`loss_type: disco`): length-normalised score `log_l` or `l_ratio`.",
                  "choices": ["log_l", "l_ratio"]},
    )
    disco_form: str = field(
        default="dro",
        metadata={"help": "DisCO: `dro` (τ log-mean-exp over negatives) or `basic`.", "choices": ["dro", "basic"]},
    )
    disco_tau: float | None = field(
        default=None, metadata={"help": "DisCO: τ of the DRO form (None: 10 for log_l, 1 for l_ratio)."}
    )
    disco_delta: float = field(default=1e-4, metadata={"help": "DisCO: trust-region radius δ of KL(π_old‖π)."})
    disco_beta: float = field(default=1e3, metadata={"help": "DisCO: β of the squared hinge (β/2)[KL̂ − δ]₊²."})
    disco_kl_estimator: str = field(
        default="k1", metadata={"help": "DisCO: KL̂ estimator `k1` or `k3`.", "choices": ["k1", "k3"]}
    )
    fdpg_target: str = field(
        default="constraint",
        metadata={
            "help": "f-DPG (`loss_type: fdpg`, f = `divergence`): target p ∝ a(x)·b(x) with b = 1[reward ≥ 0.5] "
            "(`constraint`, GDC) or p ∝ a(x)·exp(r(x)/fdpg_beta) (`reward`); a = the reference (initial) model.",
            "choices": ["constraint", "reward"],
        },
    )
    fdpg_beta: float = field(default=0.1, metadata={"help": "f-DPG: β of the target a(x)·exp(r(x)/β)."})
    fdpg_baseline_momentum: float = field(
        default=0.99, metadata={"help": "f-DPG: momentum of the moving-average baseline B."}
    )
    eval_task: str | None = field(
        default=None,
        metadata={"help": "Synthetic task whose held-out prompts the pass@k hook samples (e.g. sum_pairs)."},
    )
    eval_every_steps: int = field(
        default=0,
        metadata={
            "help": "Every this many optimizer steps (and at the start and end of training) sample `eval_num_samples` "
            "completions on `eval_num_prompts` held-out prompts of `eval_task` and log eval/pass@k, "
            "eval/distinct_correct (0: only at the end when `eval_task` is set)."
        },
    )
    eval_ks: list[int] = field(
        default_factory=lambda: [1, 4, 16], metadata={"help": "k values of the unbiased pass@k hook."}
    )
    eval_num_prompts: int = field(default=32, metadata={"help": "Held-out prompts sampled by the pass@k hook."})
    eval_num_samples: int = field(default=16, metadata={"help": "Samples per prompt of the pass@k hook (≥ max k)."})
    eval_temperature: float | None = field(
        default=None, metadata={"help": "Sampling temperature of the pass@k hook (None: `temperature`)."}
    )


    @property
    def needs_reference(self) -> bool:
        """Whether any configured term needs π_ref at training time (DPH-RL rehearsal does not)."""
        return self.divergence_coef > 0 or self.chi2_coef > 0 or self.loss_type == "fdpg"

    @property
    def needs_ref_logps(self) -> bool:
        """Whether TRL must compute per-token reference log-probs of each generation batch."""
        sampled_penalty = self.divergence_coef > 0 and self.estimator != "full_vocab"
        return sampled_penalty or self.chi2_coef > 0 or self.loss_type == "fdpg"

    def _translate_trl_beta(self) -> None:
        """TRL's `beta` b > 0 (its inline reverse-KL k3 term) → `divergence_coef: b` with `estimator: k3_ratio`
        (`use_bias_correction_kl: true`, TRL's default) or `k3` (false); `beta` is then 0, so TRL adds no KL of
        its own beside fdpo's (docs/objectives.md §6.2)."""
        if self.beta == 0.0:
            return
        trl_estimator = "k3_ratio" if self.use_bias_correction_kl else "k3"
        if self.divergence_coef not in (0.0, self.beta):
            raise ValueError(
                f"FGRPOConfig: keys 'beta' = {self.beta} (TRL's KL coefficient, i.e. divergence_coef) and "
                f"'divergence_coef' = {self.divergence_coef} disagree; set only one of them."
            )
        if get_divergence(self.divergence, **self.divergence_kwargs()).canonical != "reverse_kl":
            raise ValueError(
                f"FGRPOConfig: key 'beta' = {self.beta} is TRL's reverse-KL penalty, but key 'divergence' is "
                f"{self.divergence!r}; set `divergence_coef` (η) with `estimator` for another divergence."
            )
        if self.estimator not in (_DEFAULT_ESTIMATOR, trl_estimator) and not self.use_bias_correction_kl:
            raise ValueError(
                f"FGRPOConfig: keys 'use_bias_correction_kl' = false (TRL's k3) and 'estimator' = {self.estimator!r} "
                "disagree; set only one of them."
            )
        estimator = trl_estimator if self.estimator == _DEFAULT_ESTIMATOR else self.estimator
        logger.info(
            "FGRPOConfig: TRL's beta = %g (use_bias_correction_kl = %s) is divergence_coef = %g with estimator = %r.",
            self.beta, self.use_bias_correction_kl, self.beta, estimator,
        )
        self.divergence_coef, self.estimator, self.beta = self.beta, estimator, 0.0

    def __post_init__(self):
        self._translate_trl_beta()
        if self.divergence_coef < 0:
            raise ValueError(f"FGRPOConfig: key 'divergence_coef' must be ≥ 0, got {self.divergence_coef}.")
        for key in ("chi2_coef", "rehearsal_coef"):
            if getattr(self, key) < 0:
                raise ValueError(f"FGRPOConfig: key '{key}' must be ≥ 0, got {getattr(self, key)}.")
        try:
            div = self.resolved_divergence()
            if self.divergence_coef > 0:
                check_estimator(self.estimator, div)
            elif self.estimator not in ESTIMATORS:
                check_estimator(self.estimator, "reverse_kl")
            if self.rehearsal_file is not None:
                self.rehearsal_divergence = get_divergence(self.rehearsal_divergence).label
        except (TypeError, ValueError) as exc:
            raise ValueError(f"FGRPOConfig: {exc}") from exc
        if self.loss_type in ("disco", "fdpg") and self.importance_sampling_level != "token":
                raise ValueError(f"FGRPOConfig: key 'loss_type' = {self.loss_type!r} needs importance_sampling_level 'token'.")
        if self.loss_type == "disco":
            if self.steps_per_generation not in (None, 1) or self.generation_batch_size is not None:
                raise ValueError(
                    "FGRPOConfig: key 'loss_type' = 'disco' scores whole question groups in one micro-batch; set "
                    "`steps_per_generation: 1` (and no `generation_batch_size`)."
                )
            self.steps_per_generation = 1
            if self.per_device_train_batch_size % (self.num_generations or 1):
                raise ValueError(
                    "FGRPOConfig: key 'loss_type' = 'disco' needs `per_device_train_batch_size` to be a multiple of "
                    "`num_generations` (whole groups on every process)."
                )
        if self.loss_type == "fdpg" and self.fdpg_beta <= 0:
            raise ValueError(f"FGRPOConfig: key 'fdpg_beta' must be > 0, got {self.fdpg_beta}.")
        if self.rehearsal_batch_size is not None and self.rehearsal_batch_size < 1:
            raise ValueError(f"FGRPOConfig: key 'rehearsal_batch_size' must be ≥ 1, got {self.rehearsal_batch_size}.")
        self.store_canonical_divergence(div.canonical, div.params)
        if self.estimator == "k1_reward" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "FGRPOConfig: key 'estimator' = 'k1_reward' folds the KL into the summed reward; it needs "
                "`multi_objective_aggregation: sum_then_normalize`."
            )
        if self.eval_every_steps < 0:
            raise ValueError(f"FGRPOConfig: key 'eval_every_steps' must be ≥ 0, got {self.eval_every_steps}.")
        if self.eval_ks and max(self.eval_ks) > self.eval_num_samples:
            raise ValueError(
                f"FGRPOConfig: key 'eval_num_samples' ({self.eval_num_samples}) must be ≥ max(eval_ks) "
                f"({max(self.eval_ks)})."
            )
        super().__post_init__()

