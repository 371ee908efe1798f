"""`math_verify`: 1.0 when the completion's final answer is mathematically equal to the gold answer.

Built on Hugging Face's `math-verify` (https://github.com/huggingface/Math-Verify): `parse`
extracts answers from LaTeX (`\\boxed{...}` preferred) or plain expressions, `verify(gold, pred)`
compares them symbolically and numerically (so `\\boxed{1/2}` matches gold `0.5`). The gold comes
from the `answer` column (or `solution`); a GSM8K-style gold `"... #### 72"` uses the part after
`####`. A gold that parses to nothing scores 0.0 for every completion of that row (and is logged
once), never an exception in the middle of training.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from fdpo.rewards.text import column, completion_text

logger = logging.getLogger("fdpo.rewards")


def _gold_text(gold: Any) -> str:
    text = str(gold)
    if "####" in text:
        text = text.split("####")[-1]
    text = text.strip()
    # a bare answer (no LaTeX delimiters) is wrapped so both extractors see it
    return text if ("$" in text or "\\" in text) else f"${text}$"


def math_verify(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 iff `math_verify.verify(parse(gold), parse(completion))`, with gold from `answer`/`solution`."""
    from math_verify import parse, verify

    golds = column(kwargs, ("answer", "solution"), "math_verify", len(completions))
    # math-verify's timeouts use signal.alarm, which only works in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    out = []
    for completion, gold in zip(completions, golds):
        gold_parsed = parse(_gold_text(gold), parsing_timeout=timeout)
        if not gold_parsed:
            logger.warning("math_verify: the gold answer %r could not be parsed; reward 0", gold)
            out.append(0.0)
            continue
        pred = parse(completion_text(completion), parsing_timeout=timeout)
        out.append(float(bool(pred) and verify(gold_parsed, pred, timeout_seconds=timeout)))
    return out


math_verify_reward = math_verify
