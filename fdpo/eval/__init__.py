"""Evaluation: unbiased pass@k, diversity metrics, and checkpoint evaluation on synthetic tasks."""

from fdpo.eval.evaluate import evaluate_checkpoint
from fdpo.eval.metrics import distinct_correct, distinct_n, pass_at_k
from fdpo.eval.report import render_eval_table

__all__ = ["distinct_correct", "distinct_n", "evaluate_checkpoint", "pass_at_k", "render_eval_table"]
