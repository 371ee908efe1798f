"""Verifiable rewards with TRL's signature `fn(prompts, completions, **kwargs) -> list[float]`.

Completions may be strings or conversational message lists. Built in: the synthetic tasks'
checkers (`sum_pairs`, `between`, per-row `synthetic_task`), `exact_match` (an `answer` column),
`math_verify` (math-verify on an `answer`/`solution` column); any user function by dotted path.
"""

from fdpo.rewards.exact import exact_match
from fdpo.rewards.math_reward import math_verify
from fdpo.rewards.registry import RewardSpecError, available_rewards, get_reward_function
from fdpo.rewards.tasks import TaskReward, synthetic_task
from fdpo.rewards.text import completion_text

__all__ = [
    "RewardSpecError",
    "TaskReward",
    "available_rewards",
    "completion_text",
    "exact_match",
    "get_reward_function",
    "math_verify",
    "synthetic_task",
]
