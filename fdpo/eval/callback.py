"""`PassAtKCallback`: pass@k and answer diversity on held-out prompts during and after training.

At the start of training, every `eval_every_steps` optimizer steps (0: never in between) and at the end,
the callback samples `eval_num_samples` completions for each of the first `eval_num_prompts` held-out
prompts of `eval_task` with the model being trained (left-padded batches, the chat template, pure
ancestral sampling at `eval_temperature`, a fixed seed so points are comparable), verifies them with the
task's checker and logs, averaged over prompts:

- `eval/pass@k` for every k in `eval_ks`: the unbiased estimator 1 − C(n−c, k)/C(n, k) (Chen et al., 2021);
- `eval/distinct_correct`: distinct correct (normalised) answers per prompt; `eval/mean_reward`.

So diversity collapse (pass@1 up, pass@16 / distinct answers down) is visible in the training log.
Values go into the trainer's metric buffer (logged with the next log line) and into
`state.log_history`; the whole history is written to `<output_dir>/eval_during_training.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from transformers import TrainerCallback

from fdpo.data.tasks import eval_records, get_task, user_prompt
from fdpo.eval.metrics import distinct_correct, pass_at_k
from fdpo.eval.sampling import sample_completions


def pass_at_k_metrics(model, tokenizer, task: str, *, ks, num_prompts: int, num_samples: int,
                      temperature: float, max_new_tokens: int | None = None, seed: int = 0) -> dict[str, float]:
    """pass@k, mean reward and distinct correct answers of `model` on `task`'s first held-out prompts."""
    task_obj = get_task(task)
    rows = [{**r, "prompt": user_prompt(r["prompt"])} for r in eval_records(task_obj)][:num_prompts]
    samples = sample_completions(
        model, tokenizer, [r["prompt"] for r in rows], num_samples=num_samples, temperature=temperature,
        max_new_tokens=max_new_tokens or task_obj.max_new_tokens, seed=seed,
    )
    passes: dict[int, list[float]] = {k: [] for k in ks}
    rewards, distinct = [], []
    for row, comps in zip(rows, samples):
        correct = [task_obj.check(row, c.text) for c in comps]
        c = sum(correct)
        for k in ks:
            passes[k].append(pass_at_k(num_samples, c, k))
        rewards.append(c / num_samples)
        distinct.append(distinct_correct([task_obj.normalize(x.text) for x in comps], correct))
    out = {f"eval/pass@{k}": mean(v) for k, v in passes.items()}
    out["eval/mean_reward"] = mean(rewards)
    out["eval/distinct_correct"] = mean(distinct)
    return out


class PassAtKCallback(TrainerCallback):
    """Reads `eval_task`, `eval_every_steps`, `eval_ks`, `eval_num_prompts`, `eval_num_samples`,
    `eval_temperature` (falls back to `temperature`) from the trainer's args; see the module docstring."""

    def __init__(self) -> None:
        self.trainer = None
        self.history: list[dict[str, Any]] = []

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def _run(self, args, state, model) -> dict[str, float]:
        import torch

        tok = self.trainer.processing_class
        temperature = args.eval_temperature if args.eval_temperature is not None else args.temperature
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        threads = torch.get_num_threads()
        try:
            metrics = pass_at_k_metrics(
                unwrapped, tok, args.eval_task, ks=args.eval_ks, num_prompts=args.eval_num_prompts,
                num_samples=args.eval_num_samples, temperature=temperature, seed=args.seed,
            )
        finally:
            torch.set_num_threads(threads)
        record = {"step": state.global_step, **metrics}
        self.history.append(record)
        return metrics

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is not None and args.eval_every_steps > 0:
            metrics = self._run(args, state, model)
            state.log_history.append({"step": state.global_step, **metrics})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = args.eval_every_steps
        if self.trainer is None or every <= 0 or state.global_step % every or state.global_step >= state.max_steps:
            return
        metrics = self._run(args, state, model)
        for name, value in metrics.items():
            self.trainer._metrics["train"][name].append(value)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.trainer is None:
            return
        metrics = self._run(args, state, model)
        state.log_history.append({"step": state.global_step, **metrics})
        if state.is_world_process_zero:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval_during_training.json").write_text(json.dumps(self.history, indent=2) + "\n")
