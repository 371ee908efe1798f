"""DPH-RL recipe keys (objectives.md §7): the presample stage's and the rehearsal term's.

`DPHArguments` = `PresampleArguments` + `RehearsalArguments`, meant to be mixed into the GRPO
trainer's config (``class FGRPOConfig(GRPOConfig, DPHArguments)``) so that one recipe serves both
`fdpo presample RECIPE` and `fdpo train RECIPE`. Every field has a default and help text.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PresampleArguments:
    """Recipe keys of `fdpo presample` (a trainer config that defines a key of its own wins)."""

    presample_n: int = field(
        default=8, metadata={"help": "DPH-RL: completions sampled per training prompt before RL (paper: 8)."}
    )
    pef_threshold: float = field(
        default=1.0,
        metadata={
            "help": "DPH-RL: a prompt joins D_pef (rehearsed, not trained on with RL) when at least this "
            "fraction of its presample_n completions is correct; 1.0 = solved every time (the paper)."
        },
    )
    presample_correct_reward: float = field(
        default=1.0,
        metadata={"help": "DPH-RL: a completion is correct when its weighted total reward is ≥ this value."},
    )
    presample_batch_size: int = field(
        default=64, metadata={"help": "DPH-RL: sequences per generate call and per log π_ref forward."}
    )
    presample_seed: int | None = field(
        default=None, metadata={"help": "DPH-RL: sampling seed for `fdpo presample` (default: the recipe's seed)."}
    )
    presample_dir: str | None = field(
        default=None,
        metadata={"help": "DPH-RL: where `fdpo presample` writes the rehearsal store (default: <output_dir>/dph)."},
    )
    reward_funcs: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Reward functions (names from fdpo.rewards or dotted paths to user functions), as "
            "TRL's GRPO script takes them."
        },
    )



@dataclass
class RehearsalArguments:
    """Recipe keys of the DPH-RL rehearsal term η · token-mean f̃(u) on stored D_pef samples."""

    rehearsal_coef: float = field(
        default=0.0,
        metadata={
            "help": "DPH-RL: η of the rehearsal term η·token-mean f(u) on the samples `fdpo presample` stored "
            "(u = π/π_ref per token, f from `divergence`; paper: 0.01–0.05 forward_kl, 0.05–0.2 js). > 0 turns "
            "DPH-RL on: RL trains on the D_exp prompts only and no reference model is loaded. 0: off."
        },
    )
    rehearsal_batch_size: int = field(
        default=8,
        metadata={
            "help": "DPH-RL: stored samples per device in each rehearsal batch (the paper: 256 per 2048 "
            "rollouts, i.e. 1/8 of the rollouts)."
        },
    )
    rehearsal_dir: str | None = field(
        default=None,
        metadata={"help": "DPH-RL: the store `fdpo presample` wrote (default: presample_dir, else <output_dir>/dph)."},
    )
    rehearsal_convention: str = field(
        default="dph",
        metadata={
            "help": "DPH-RL: per-sample value optimised: `dph` = the paper's forms f̃(u) = f(u) − f′(1)(u − 1) "
            "(forward_kl: u − log u − 1; js: u log u − (u+1) log((u+1)/2) = 2·f_js), `registry` = the "
            "registry's f(u). Same expected value and gradient up to the js scale; `dph` has lower variance.",
            "choices": ["dph", "registry"],
        },
    )
    rehearsal_seed: int | None = field(
        default=None, metadata={"help": "DPH-RL: seed of the rehearsal sample order (default: the recipe's seed)."}
    )


@dataclass
class DPHArguments(PresampleArguments, RehearsalArguments):
    """Every DPH-RL recipe key (presample + rehearsal), for mixing into a trainer config."""
