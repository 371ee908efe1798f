"""`fdpo presample RECIPE`: DPH-RL's pre-sampling stage (docs/objectives.md §7, steps 1–2).

For every training prompt of the recipe (``dataset_name``, its ``prompt`` column), draw
``presample_n`` completions from the initial policy (``model_name_or_path``) with ``model.generate``
at the recipe's own GRPO generation settings (``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``, ``max_completion_length``, ``generation_kwargs``, ``chat_template_kwargs``:
the keys and defaults of TRL's GRPOConfig, so the samples match what training would draw), score
each with the recipe's reward functions (``reward_funcs``, weighted by ``reward_weights`` as TRL
does), and split the prompts:

    D_pef = {x : #correct(x) ≥ pef_threshold · n},   D_exp = the rest,

where a completion is correct when its weighted reward is ≥ ``presample_correct_reward`` (1.0).
For the correct completions of D_pef prompts, log π_ref(y_t | x, y_<t) is computed at the sampling
temperature (log_softmax(logits / T), TRL's convention) by a separate teacher-forced forward through
TRL's own fused LM head, the path GRPOTrainer uses for its training log-probs, in TRL's rollout
layout (prompt left-padded, completion right-padded, completion up to and including its first eos).
The store (fdpo/data/rehearsal.py) is written atomically to ``presample_dir`` (default
``<output_dir>/dph``).

Completions are decoded with ``skip_special_tokens=True`` and passed to the reward functions in
TRL's form (a list of one assistant message for conversational prompts), with every other dataset
column as a keyword list: a sample is "correct" exactly when training's reward would call it so.
Note: with top_p < 1, top_k > 0, min_p or a repetition penalty the samples come from the truncated
sampling distribution, not from π_ref at temperature T, and the rehearsal estimate of D_f is biased
accordingly (as it is in DPH-RL itself).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from trl.data_utils import is_conversational
from trl.trainer.utils import add_fused_lm_head

from fdpo.cpu_threads import torch_threads
from fdpo.data.loading import check_columns, load_any_dataset
from fdpo.data.presample_settings import PresampleArguments, PresampleSettings, resolve_presample_settings
from fdpo.data.rehearsal import D_EXP, D_PEF, read_manifest, write_rehearsal_dir
from fdpo.data.sample_store import tokenizer_fingerprint
from fdpo.data.sampler import (
    cut_at_eos,
    eos_token_ids,
    pad_prompt_completion,
    sample_token_ids,
    tokenize_prompts,
)
from fdpo.errors import RecipeError
from fdpo.rewards import get_reward_function

logger = logging.getLogger("fdpo")


def generation_config(settings: PresampleSettings, tokenizer, eos_ids: list[int]):
    """The GenerationConfig TRL's GRPOTrainer builds from the same settings (transformers path)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_completion_length,
        "do_sample": True,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_ids,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "min_p": settings.min_p,
        "repetition_penalty": settings.repetition_penalty,
        "cache_implementation": settings.cache_implementation,
    }
    if settings.generation_kwargs:
        kwargs.update(settings.generation_kwargs)
    return GenerationConfig(**kwargs, disable_compile=True)


def group_identical_rows(rows: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(group index of each row, first row of each group): rows with identical content (every column)
    are one prompt, so a duplicated prompt cannot sit in both D_pef and D_exp."""
    first: dict[str, int] = {}
    group_of_row, first_rows = [], []
    for i, row in enumerate(rows):
        key = json.dumps(row, sort_keys=True, ensure_ascii=False, default=repr)
        if key not in first:
            first[key] = len(first_rows)
            first_rows.append(i)
        group_of_row.append(first[key])
    return group_of_row, first_rows


def sample(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    settings: PresampleSettings,
    eos_ids: list[int],
) -> list[list[tuple[list[int], bool]]]:
    """``settings.n`` completions (token ids cut after eos, finished flag) per prompt, drawn by fdpo's
    one sampler (fdpo/data/sampler.py) in left-padded batches of ``settings.batch_size`` sequences, seeded."""
    return sample_token_ids(
        model,
        prompt_ids,
        generation_config=generation_config(settings, tokenizer, eos_ids),
        num_samples=settings.n,
        batch_size=settings.batch_size,
        seed=settings.seed,
        pad_token_id=tokenizer.pad_token_id,
        eos_ids=eos_ids,
        progress="presample: generate",
    )


def score(
    reward_fns: list[Any],
    weights: list[float] | None,
    rows: list[dict[str, Any]],
    completions_ids: list[list[int]],
    tokenizer,
    batch_size: int,
) -> list[float]:
    """Weighted total reward of each completion (TRL's call convention; a None reward counts as NaN)."""
    w = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(w) != len(reward_fns):
        raise RecipeError(f"reward_weights has {len(w)} values for {len(reward_fns)} reward functions")
    totals: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids = completions_ids[start : start + batch_size]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        prompts = [r["prompt"] for r in batch]
        if is_conversational(batch[0]):
            completions: list[Any] = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = texts
        keys = [k for k in batch[0] if k not in ("prompt", "completion", "completion_ids")]
        kwargs = {k: [r[k] for r in batch] for k in keys}
        per_fn = []
        for fn in reward_fns:
            values = fn(prompts=prompts, completions=completions, completion_ids=ids, trainer_state=None, **kwargs)
            per_fn.append([math.nan if v is None else float(v) for v in values])
        for j in range(len(batch)):
            vals = [per_fn[k][j] for k in range(len(reward_fns))]
            totals.append(math.nan if all(math.isnan(v) for v in vals) else
                          sum(wk * v for wk, v in zip(w, vals) if not math.isnan(v)))
    return totals


def reference_logps(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    temperature: float,
    pad_token_id: int,
    batch_size: int,
    cast_lm_head_to_fp32: bool = False,
) -> list[list[float]]:
    """Per-token log π(y_t | x, y_<t) at ``temperature`` (log_softmax(logits / T)) of each completion,
    by a teacher-forced forward in TRL's rollout layout through TRL's fused LM head (on a shallow copy
    of ``model``, which is left unpatched), exactly as GRPOTrainer computes training log-probs."""
    # a shallow copy shares every module and parameter, so the patch does not touch the caller's model
    fused = copy.copy(model)
    add_fused_lm_head(fused, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32)
    device = next(model.parameters()).device
    out: list[list[float]] = []
    starts = range(0, len(prompt_ids), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, total=len(starts), desc="presample: log π_ref", unit="batch", leave=False):
            prompts = [torch.tensor(p, dtype=torch.long) for p in prompt_ids[start : start + batch_size]]
            comps = [torch.tensor(c, dtype=torch.long) for c in completion_ids[start : start + batch_size]]
            padded = pad_prompt_completion(prompts, comps, pad_token_id)
            input_ids = padded["input_ids"].to(device)
            attention = padded["attention_mask"].to(device)
            keep = padded["completion_width"]
            labels = input_ids.masked_fill(attention == 0, -100)
            labels[:, :-keep] = -100
            logps = fused(input_ids=input_ids, attention_mask=attention, labels=labels, fused_lm_head=True).log_probs
            logps = logps[:, -keep:].float().cpu()
            out.extend(logps[r, : len(c)].tolist() for r, c in enumerate(comps))
    return out


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def load_policy_and_tokenizer(settings: PresampleSettings):
    kwargs: dict[str, Any] = {"revision": settings.model_revision}
    if settings.dtype is not None:
        kwargs["dtype"] = getattr(torch, settings.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model_name_or_path, revision=settings.model_revision)
        model = AutoModelForCausalLM.from_pretrained(settings.model_name_or_path, **kwargs)
    except OSError as exc:
        raise RecipeError(
            f"{settings.recipe_path}: key 'model_name_or_path' = {settings.model_name_or_path!r} could not be "
            f"loaded ({str(exc)[:300]})."
        ) from exc
    if tokenizer.pad_token is None:  # as TRL's GRPOTrainer does
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return model, tokenizer


def presample(settings: PresampleSettings, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Run the presample stage; returns the manifest written to ``settings.out_dir``."""
    t0 = time.time()
    dataset = load_any_dataset(
        settings.dataset_name,
        config=settings.dataset_config,
        split=settings.dataset_train_split,
        key=f"{settings.recipe_path}: dataset_name",
    )
    check_columns(dataset, ["prompt"], source=f"{settings.dataset_name} (recipe {settings.recipe_path})",
                  text_columns=["prompt"])
    reward_fns = [get_reward_function(spec) for spec in settings.reward_funcs]
    if model is None or tokenizer is None:
        model, tokenizer = load_policy_and_tokenizer(settings)
    eos_ids = eos_token_ids(model, tokenizer)
    rows = [dict(r) for r in dataset]
    # identical rows are one prompt: sampled once, and all their copies land on the same side
    group_of_row, first_rows = group_identical_rows(rows)
    urows = [rows[i] for i in first_rows]
    prompt_ids = tokenize_prompts(tokenizer, [r["prompt"] for r in urows], settings.chat_template_kwargs)

    samples = sample(model, tokenizer, prompt_ids, settings, eos_ids)
    flat_rows = [urows[g] for g in range(len(urows)) for _ in range(settings.n)]
    flat_ids = [ids for per_prompt in samples for ids, _ in per_prompt]
    rewards = score(reward_fns, settings.reward_weights, flat_rows, flat_ids, tokenizer, settings.batch_size)

    need = math.ceil(settings.pef_threshold * settings.n - 1e-9)
    num_correct, in_pef, keep = [], [], []  # keep: (prompt group, sample j, reward)
    for g in range(len(urows)):
        rs = rewards[g * settings.n : (g + 1) * settings.n]
        correct = [j for j, r in enumerate(rs) if not math.isnan(r) and r >= settings.correct_reward]
        num_correct.append(len(correct))
        pef = len(correct) >= need
        in_pef.append(pef)
        if pef:
            keep.extend((g, j, rs[j]) for j in correct)

    kept_prompts = [prompt_ids[i] for i, _, _ in keep]
    kept_completions = [samples[i][j][0] for i, j, _ in keep]
    logps = reference_logps(
        model,
        kept_prompts,
        kept_completions,
        temperature=settings.temperature,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=settings.batch_size,
        cast_lm_head_to_fp32=settings.cast_lm_head_to_fp32,
    ) if keep else []

    def flat(seqs: list[list[int]], dtype) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.long)
        values = torch.tensor([t for s in seqs for t in s], dtype=dtype)
        return values, torch.cumsum(lengths, 0)

    p_flat, p_off = flat(kept_prompts, torch.int32)
    c_flat, c_off = flat(kept_completions, torch.int32)
    lp_flat, _ = flat(logps, torch.float32)
    pef_rows = [i for i, g in enumerate(group_of_row) if in_pef[g]]
    exp_rows = [i for i, g in enumerate(group_of_row) if not in_pef[g]]
    tensors = {
        "prompt_ids": p_flat,
        "prompt_offsets": p_off,
        "completion_ids": c_flat,
        "completion_offsets": c_off,
        "completion_mask": torch.ones(c_flat.numel(), dtype=torch.int8),
        "ref_logps": lp_flat,
        "sample_prompt_row": torch.tensor([first_rows[g] for g, _, _ in keep], dtype=torch.long),
        "sample_reward": torch.tensor([r for _, _, r in keep], dtype=torch.float32),
        "prompt_group": torch.tensor(group_of_row, dtype=torch.long),
        "prompt_num_correct": torch.tensor([num_correct[g] for g in group_of_row], dtype=torch.long),
        "prompt_in_pef": torch.tensor([in_pef[g] for g in group_of_row], dtype=torch.int8),
        "pef_rows": torch.tensor(pef_rows, dtype=torch.long),
        "exp_rows": torch.tensor(exp_rows, dtype=torch.long),
    }
    finished = sum(f for per_prompt in samples for _, f in per_prompt)
    total = len(urows) * settings.n
    valid = [r for r in rewards if not math.isnan(r)]
    manifest = {
        "recipe": settings.recipe_path,
        "out_dir": str(Path(settings.out_dir).resolve()),
        "model_name_or_path": settings.model_name_or_path,
        "model_revision": settings.model_revision,
        "dataset": {
            "name": settings.dataset_name,
            "config": settings.dataset_config,
            "split": settings.dataset_train_split,
            "rows": len(rows),
        },
        "generation": settings.generation_manifest(),
        "reward_funcs": [f if isinstance(f, str) else getattr(f, "__name__", repr(f)) for f in settings.reward_funcs],
        "reward_weights": settings.reward_weights,
        "presample_correct_reward": settings.correct_reward,
        "pef_threshold": settings.pef_threshold,
        "pef_min_correct": need,
        "tokenizer": tokenizer_fingerprint(tokenizer, chat_template_kwargs=settings.chat_template_kwargs),
        "counts": {
            "rows": len(rows),
            "prompts": len(urows),
            "d_pef": len(pef_rows),
            "d_exp": len(exp_rows),
            "d_pef_prompts": sum(in_pef),
            "d_exp_prompts": len(urows) - sum(in_pef),
            "samples": total,
            "samples_correct": sum(num_correct),
            "samples_finished": int(finished),
            "stored_samples": len(keep),
            "stored_tokens": int(c_flat.numel()),
        },
        "frac_pef": sum(in_pef) / max(len(urows), 1),
        "frac_pef_rows": len(pef_rows) / max(len(rows), 1),
        "mean_reward": sum(valid) / max(len(valid), 1),
        "pass_rate": sum(num_correct) / max(total, 1),
        "created_unix": time.time(),
        "wall_time_s": round(time.time() - t0, 2),
    }

    def jsonl(indices: list[int]):
        def write(path: Path) -> None:
            dataset.select(indices).to_json(str(path), lines=True, force_ascii=False)

        return write

    out = write_rehearsal_dir(settings.out_dir, manifest, tensors, {D_EXP: jsonl(exp_rows), D_PEF: jsonl(pef_rows)})
    logger.info(
        "presample: %d prompts (%d rows) × %d samples, pass rate %.3f; D_pef %d prompts (%.1f%%), D_exp %d; "
        "%d samples stored in %s",
        len(urows), len(rows), settings.n, manifest["pass_rate"], sum(in_pef), 100 * manifest["frac_pef"],
        len(urows) - sum(in_pef), len(keep), settings.out_dir,
    )
    return read_manifest(out)


def run_presample(recipe: Any) -> dict[str, Any]:
    """`fdpo presample` on a LOADED recipe (fdpo.recipe's `load_presample_recipe`): resolve the settings,
    then :func:`presample`; the recipe's `cpu_threads` (as in `fdpo train`) sets torch's threads for the
    sampling on a CPU."""
    settings = resolve_presample_settings(recipe)
    with torch_threads(recipe.recipe_args.cpu_threads):
        return presample(settings)


__all__ = [
    "PresampleArguments",
    "PresampleSettings",
    "cut_at_eos",
    "eos_token_ids",
    "generation_config",
    "group_identical_rows",
    "presample",
    "reference_logps",
    "resolve_presample_settings",
    "run_presample",
    "sample",
    "score",
    "tokenize_prompts",
]
