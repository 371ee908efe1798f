"""`kl_to_<name>`: the exact per-token KL(π ‖ π_ref) on the policy's samples, checked against a direct float64 sum."""

from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturbed_copy(src, dst, scale=0.05, seed=1):
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(str(dst))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(dst))
    return dst


def _direct_kl(model, ref, prompt_ids, completion_ids):
    """Σ over completion positions of Σ_v π log(π/π_ref) in float64, one unpadded sequence at a time."""
    total, count = 0.0, 0
    for p, c in zip(prompt_ids, completion_ids):
        ids = torch.tensor([list(p) + list(c)])
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        lq = torch.log_softmax(ref(input_ids=ids).logits[0].double(), -1)
        for t in range(len(p) - 1, len(p) + len(c) - 1):
            total += float((lp[t].exp() * (lp[t] - lq[t])).sum())
            count += 1
    return total / count


def test_kl_per_token_equals_direct_sum(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fdpo.eval.kl import kl_per_token
    from fdpo.eval.sampling import render_prompt_ids, sample_completions

    other = _perturbed_copy(tiny_model_dir, tmp_path / "other")
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(other)).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    prompts = ["Write two numbers that add up to 7.", "Split 12 into two numbers."]
    samples = sample_completions(model, tok, prompts, num_samples=3, max_new_tokens=6, seed=0)
    prompt_ids = [render_prompt_ids(tok, p) for p in prompts for _ in range(3)]
    completion_ids = [c.token_ids for comps in samples for c in comps]
    with torch.no_grad():
        got = kl_per_token(model, ref, prompt_ids, completion_ids, pad_id=tok.pad_token_id, batch_size=4)
        want = _direct_kl(model, ref, prompt_ids, completion_ids)
        same = kl_per_token(ref, ref, prompt_ids, completion_ids, pad_id=tok.pad_token_id)
    assert want > 1e-3  # the perturbation moved the model: a real, non-zero KL is compared
    assert got == pytest.approx(want, rel=1e-4)
    assert same == pytest.approx(0.0, abs=1e-6)


def test_pipeline_eval_stage_reports_kl_to_an_earlier_stage(tiny_model_dir, tmp_path):
    import yaml

    from fdpo.pipeline import run_pipeline

    other = _perturbed_copy(tiny_model_dir, tmp_path / "other")
    pipeline = {
        "run_dir": str(tmp_path / "run"),
        "stages": [
            {"name": "model", "kind": "tiny", "arch": "llama", "seed": 0},
            {"name": "ev", "kind": "eval", "checkpoint": str(other), "task": "sum_pairs", "ks": [1],
             "num_samples": 2, "num_prompts": 4, "kl_to": {"model": {"from_stage": "model"}}},
        ],
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    results = run_pipeline(path)
    kl = results[-1].metrics["kl_to_model"]
    assert kl > 1e-3  # the tiny stage rebuilds the same seed-0 model; `other` is its perturbed copy
