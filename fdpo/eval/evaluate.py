"""`evaluate_checkpoint`: sample a checkpoint on a synthetic task's held-out prompts and score it.

Loads the model and tokenizer with `from_pretrained` (the same path for the tiny model and a hub
model), samples `num_samples` completions per prompt, verifies each with the task's checker and
reports, averaged over prompts:

- `pass_at_k[str(k)]`: unbiased pass@k (`fdpo.eval.metrics.pass_at_k`) for every k in `ks`;
- `mean_reward`: mean verifier reward (1 correct / 0 wrong) over all samples;
- `distinct_correct`: number of distinct correct answers per prompt;
- `answer_coverage`: distinct correct answers / min(#valid answers, num_samples), in [0, 1];
- `answer_entropy`: entropy (nats) of the correct answers' distribution (`fdpo.eval.metrics.answer_entropy`);
- `distinct_1`, `distinct_2`: distinct-n over each prompt's completion tokens;
- `finished_rate`: share of samples that ended with the eos token;
- `greedy_accuracy`: accuracy of one greedy completion per prompt (if `greedy=True`);
- `by_difficulty`, `settings` and a few `examples`;
- `per_prompt`: for every prompt, `correct` (c of the n = num_samples samples), `distinct_correct`,
  `answer_entropy`, `difficulty` and, with `kl_references`, `kl_to_<name>` (that prompt's per-token
  mean): what `fdpo sweep` needs for pass@k curves k = 1…n (`pass_at_k_curve(n, c)`) and for
  bootstrap intervals over prompts.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from fdpo.data.tasks import eval_records, get_task, read_jsonl, user_prompt
from fdpo.eval.metrics import answer_entropy, distinct_correct, distinct_n, pass_at_k
from fdpo.eval.sampling import sample_completions


def _load_rows(task: str, data_file: str | Path | None, split: str = "eval") -> list[dict[str, Any]]:
    if data_file is None:
        return [{**r, "prompt": user_prompt(r["prompt"])} for r in eval_records(task, split)]
    rows = read_jsonl(data_file)
    if not rows:
        raise ValueError(f"evaluate: {data_file} holds no rows")
    return rows


SMALL_MODEL_PARAMS = 20_000_000


def _sampling_threads(model, device: str, cpu_threads: int | None) -> int | None:
    if not str(device).startswith("cpu"):
        return None
    if cpu_threads is not None:
        return cpu_threads
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS else None


def _default_json(model_path: str | Path, task: str) -> Path | None:
    path = Path(model_path)
    return path / f"eval_{task}.json" if path.is_dir() else None


def evaluate_checkpoint(
    model_path: str | Path,
    task: str = "sum_pairs",
    ks: Sequence[int] = (1, 4, 16),
    num_samples: int = 16,
    num_prompts: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    out_json: str | Path | bool | None = None,
    data_file: str | Path | None = None,
    greedy: bool = True,
    num_examples: int = 8,
    device: str | None = None,
    cpu_threads: int | None = None,
    kl_references: dict[str, str | Path] | None = None,
    split: str = "eval",
) -> dict[str, Any]:
    """Evaluate the checkpoint at `model_path` on `task`; returns the result dict (see module docstring).

    Prompts: `data_file` (JSONL with a conversational or plain-text `prompt` and the task's verifier
    fields; a `task` column, if present, overrides `task` per row) or, by default, the task's
    held-out eval prompts (`split="ood"`: its out-of-distribution prompts, for tasks that have them). `num_prompts` keeps the first ones (None: all). `max_new_tokens=None`
    uses the task's budget. The JSON goes to `out_json`; None means `<model_path>/eval_<task>.json`
    when `model_path` is a local directory, False means no file.

    `cpu_threads`: torch intra-op threads while sampling on a CPU (restored afterwards). None means
    1 for a model under `SMALL_MODEL_PARAMS` parameters (its matmuls are too small to gain from
    threads, and on shared cores spinning threads make generation 10-50x slower), else unchanged.

    `kl_references`: {name: checkpoint}; for each, `kl_to_<name>` is the exact per-token
    KL(π ‖ π_ref) on this checkpoint's own samples (`fdpo.eval.kl.kl_per_token`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"evaluate: ks must be positive integers, got {ks}")
    if num_samples < max(ks):
        raise ValueError(f"evaluate: num_samples ({num_samples}) must be >= max k ({max(ks)}) for pass@k")
    task_obj = get_task(task)
    rows = _load_rows(task_obj.name, data_file, split)
    if num_prompts is not None:
        rows = rows[:num_prompts]
    row_tasks = [get_task(r.get("task", task_obj.name)) for r in rows]
    max_new_tokens = max_new_tokens or max(t.max_new_tokens for t in row_tasks)

    start = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).to(device)
    prompts = [r["prompt"] for r in rows]
    common = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed}
    threads = _sampling_threads(model, device, cpu_threads)
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        samples = sample_completions(
            model, tokenizer, prompts, num_samples=num_samples, temperature=temperature, top_p=top_p, **common
        )
        greedy_samples = (
            sample_completions(model, tokenizer, prompts, num_samples=1, do_sample=False, **common)
            if greedy
            else None
        )
        kl_values, kl_rows = _kl_to_references(model, tokenizer, prompts, samples, kl_references or {}, device)
    finally:
        torch.set_num_threads(previous_threads)

    per_prompt: list[dict[str, Any]] = []
    for i, (row, t, comps) in enumerate(zip(rows, row_tasks, samples)):
        correct = [t.check(row, c.text) for c in comps]
        c = sum(correct)
        answers = [t.normalize(x.text) for x in comps]
        distinct = distinct_correct(answers, correct)
        per_prompt.append(
            {
                "difficulty": row.get("difficulty"),
                "pass": {k: pass_at_k(num_samples, c, k) for k in ks},
                "reward": c / num_samples,
                "distinct_correct": distinct,
                "coverage": distinct / max(1, min(t.num_answers(row), num_samples)),
                "distinct_1": distinct_n([x.token_ids for x in comps], 1),
                "distinct_2": distinct_n([x.token_ids for x in comps], 2),
                "finished": mean(x.finished for x in comps),
                "greedy": float(t.check(row, greedy_samples[i][0].text)) if greedy_samples else None,
                "correct": c,
                "answer_entropy": answer_entropy(answers, correct),
                **{name: values[i] for name, values in kl_rows.items()},
            }
        )

    result: dict[str, Any] = {
        "checkpoint": str(model_path),
        "task": task_obj.name,
        "pass_at_k": {str(k): mean(p["pass"][k] for p in per_prompt) for k in ks},
        "mean_reward": mean(p["reward"] for p in per_prompt),
        "distinct_correct": mean(p["distinct_correct"] for p in per_prompt),
        "answer_coverage": mean(p["coverage"] for p in per_prompt),
        "answer_entropy": mean(p["answer_entropy"] for p in per_prompt),
        "distinct_1": mean(p["distinct_1"] for p in per_prompt),
        "distinct_2": mean(p["distinct_2"] for p in per_prompt),
        "finished_rate": mean(p["finished"] for p in per_prompt),
    }
    if greedy:
        result["greedy_accuracy"] = mean(p["greedy"] for p in per_prompt)
    result.update(kl_values)
    by_level: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for p in per_prompt:
        by_level[p["difficulty"]].append(p)
    result["by_difficulty"] = {
        str(level): {
            "num_prompts": len(group),
            "pass@1": mean(p["reward"] for p in group),
            "distinct_correct": mean(p["distinct_correct"] for p in group),
        }
        for level, group in sorted(by_level.items(), key=lambda kv: str(kv[0]))
    }
    result["settings"] = {
        "num_prompts": len(rows),
        "num_samples": num_samples,
        "ks": list(ks),
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "split": split if data_file is None else None,
        "batch_size": batch_size,
        "data_file": str(data_file) if data_file is not None else None,
        "device": device,
        "cpu_threads": threads,
        "wall_time_s": round(time.time() - start, 2),
    }
    result["examples"] = [
        {"prompt": _prompt_text(rows[i]["prompt"]), "completions": [c.text for c in samples[i][:4]]}
        for i in range(min(num_examples, len(rows)))
    ]
    per_prompt_keys = ("correct", "distinct_correct", "answer_entropy", "difficulty", *kl_rows)
    result["per_prompt"] = [{k: p[k] for k in per_prompt_keys} for p in per_prompt]
    target = _default_json(model_path, task_obj.name) if out_json is None else out_json
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        result["settings"]["out_json"] = str(path)
    return result


def _prompt_text(prompt: str | list[dict[str, Any]]) -> str:
    return prompt if isinstance(prompt, str) else " | ".join(m["content"] for m in prompt)


def _kl_to_references(
    model, tokenizer, prompts, samples, references, device
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """`kl_to_<name>` for each reference checkpoint, on the sampled completions (see `kl_references`).

    Returns the per-token mean over all samples and, per prompt, the per-token mean over that prompt's samples.
    """
    if not references:
        return {}, {}
    from transformers import AutoModelForCausalLM

    from fdpo.eval.kl import kl_token_sums
    from fdpo.eval.sampling import render_prompt_ids

    prompt_ids, completion_ids, owner = [], [], []
    for p, (prompt, comps) in enumerate(zip(prompts, samples)):
        ids = render_prompt_ids(tokenizer, prompt)
        for c in comps:
            prompt_ids.append(ids)
            completion_ids.append(c.token_ids)
            owner.append(p)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out, rows = {}, {}
    for name, path in references.items():
        ref = AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
        sums = kl_token_sums(model, ref, prompt_ids, completion_ids, pad_id=pad_id)
        total, count = [0.0] * len(prompts), [0] * len(prompts)
        for p, (s, n) in zip(owner, sums):
            total[p] += s
            count[p] += n
        out[f"kl_to_{name}"] = sum(total) / max(sum(count), 1)
        rows[f"kl_to_{name}"] = [t / max(n, 1) for t, n in zip(total, count)]
    return out, rows
