"""GRPO step time and peak memory: FGRPOTrainer vs TRL's GRPOTrainer, and DPH-RL rehearsal vs an online reference.

    python benchmarks/bench_grpo.py                  # random Llama (hidden 512, 8 layers) with the tiny tokenizer
    python benchmarks/bench_grpo.py --quick          # the tiny model itself, seconds
    python benchmarks/bench_grpo.py --model DIR      # any local causal LM directory

Variants, same data / seed / batch / completion length / learning rate (same settings):

- ``trl``:   trl.GRPOTrainer, ``beta = η`` (reverse KL, k3 × importance ratio: TRL's default), reference model.
- ``fdpo``:  FGRPOTrainer, ``divergence: reverse_kl``, ``divergence_coef: η``, ``estimator: k3_ratio`` (the same
             objective; the tests check the losses and weights agree with ``trl``).
- ``dph``:   FGRPOTrainer, no KL (``divergence_coef: 0``) + DPH-RL forward-KL rehearsal on stored π_ref samples
             (``rehearsal_ratio`` 0.125: 1 stored sample per 8 rollouts), NO reference model. The store is
             written once by ``fdpo presample`` before timing (not timed).

Each (round, variant) runs in a fresh subprocess, variants interleaved round by round (so drifting load on a
shared machine hits all of them alike). Step time: mean of TRL's logged ``step_time`` (generation + reference
pass + loss + backward + optimizer step) over the steps after the first, median over rounds. Peak memory: on
CUDA ``torch.cuda.max_memory_allocated``; on CPU the process high-water RSS (``ru_maxrss``) minus the RSS
before the model was loaded. Ratios are from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = ("trl", "fdpo", "dph")


def hash_reward(prompts, completions, **kwargs):
    """Deterministic 0/1 reward (crc32 parity of the text): ~half correct for any model, so advantages are non-zero."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(float(zlib.crc32(text.encode()) % 2))
    return out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_random_model(tiny_dir: Path, out: Path, hidden: int, layers: int) -> Path:
    """A randomly initialised Llama of the given size with the tiny model's tokenizer (no download)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_dir)
    cfg.hidden_size, cfg.num_hidden_layers = hidden, layers
    cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 3 * hidden, hidden // 64, hidden // 64
    cfg.head_dim = 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def child(variant: str, ns: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(ns.threads)
    cuda = torch.cuda.is_available()
    base_rss = _rss_mb()
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from fdpo.trainers.grpo import FGRPOConfig, FGRPOTrainer

    data = load_dataset("json", data_files=ns.data, split="train")
    common = dict(
        output_dir=str(Path(ns.work) / f"out_{variant}"),
        max_steps=ns.steps,
        per_device_train_batch_size=ns.batch,
        num_generations=ns.generations,
        max_completion_length=ns.completion,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        bf16=cuda,
        use_cpu=not cuda,
    )
    if variant == "trl":
        cls, tcls, kw = GRPOConfig, GRPOTrainer, dict(beta=ns.eta)
    elif variant == "fdpo":
        cls, tcls, kw = FGRPOConfig, FGRPOTrainer, dict(divergence_coef=ns.eta, estimator="k3_ratio")
    else:
        cls, tcls, kw = FGRPOConfig, FGRPOTrainer, dict(
            divergence_coef=0.0, rehearsal_file=ns.store, rehearsal_divergence="forward_kl", rehearsal_coef=0.05,
            rehearsal_ratio=0.125, rehearsal_train_on_exp=False,
        )
    model = AutoModelForCausalLM.from_pretrained(ns.model, dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        model = model.cuda()
        torch.cuda.reset_peak_memory_stats()
    trainer = tcls(
        model=model, reward_funcs=[hash_reward], args=cls(**common, **kw), train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(ns.model),
    )
    trainer.train()
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h][1:]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb() - base_rss
    return {
        "variant": variant,
        "step_time": statistics.mean(times),
        "peak_mb": peak,
        "ref_model": getattr(trainer, "ref_model", None) is not None,
        "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


def make_store(ns: argparse.Namespace) -> str:
    """`fdpo presample` on the benchmark data (the hash reward, pef_threshold 0.5): the DPH-RL store."""
    from fdpo.data.presample import presample, resolve_presample_settings

    recipe = Path(ns.work) / "presample.yaml"
    recipe.write_text(
        f"trainer: grpo\nmodel_name_or_path: {ns.model}\ndataset_name: {ns.data}\noutput_dir: {ns.work}/store\n"
        f"reward_funcs: ['bench_grpo:hash_reward']\npresample_n: 4\npef_threshold: 0.5\n"
        f"max_completion_length: {ns.completion}\nnum_generations: {ns.generations}\n"
        f"per_device_train_batch_size: {ns.batch}\n"
    )
    sys.path.insert(0, str(HERE))
    manifest = presample(resolve_presample_settings(recipe))
    return manifest["out_dir"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model dir (default: random Llama built from the tiny model)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="the tiny model, fewer steps")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion", type=int, default=16)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--eta", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=VARIANTS, default=None)
    p.add_argument("--work", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--store", default=None)
    ns = p.parse_args()
    if ns.child:
        print("RESULT " + json.dumps(child(ns.child, ns)), flush=True)
        return

    work = Path(ns.work or tempfile.mkdtemp(prefix="bench_grpo_"))
    ns.work = str(work)
    from fdpo.data.tasks import build_rows, write_jsonl
    from fdpo.models.tiny import build_tiny_model

    tiny = build_tiny_model(work / "tiny", arch="llama", seed=0, task="sum_pairs")
    if ns.quick:
        ns.steps, ns.rounds = min(ns.steps, 4), min(ns.rounds, 2)
    if ns.model is None:
        ns.model = str(tiny if ns.quick else build_random_model(tiny, work / "random", ns.hidden, ns.layers))
    ns.data = str(work / "rl.jsonl")
    write_jsonl(Path(ns.data), build_rows("sum_pairs", "rl", seed=0, size=ns.prompts))
    ns.store = make_store(ns)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(ns.threads), "TQDM_DISABLE": "1"}
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(ns.rounds):
        for v in VARIANTS:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", v, "--work", ns.work, "--data", ns.data,
                   "--store", ns.store, "--model", ns.model, "--steps", str(ns.steps), "--batch", str(ns.batch),
                   "--generations", str(ns.generations), "--completion", str(ns.completion), "--eta", str(ns.eta),
                   "--threads", str(ns.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"variant {v} failed:\n{out.stderr[-3000:]}")
            results[v].append(json.loads(line[7:]))
            print(f"round {r} {v}: {results[v][-1]}", file=sys.stderr, flush=True)

    med = {v: {k: statistics.median(x[k] for x in results[v]) for k in ("step_time", "peak_mb")} for v in VARIANTS}
    info = results["trl"][0]
    device = info["device"]
    print(f"\nGRPO benchmark: model {Path(ns.model).name} ({info['params_m']:.1f}M params), batch {ns.batch} "
          f"({ns.batch // ns.generations} prompts × {ns.generations}), {ns.completion} new tokens, {ns.steps} steps "
          f"× {ns.rounds} rounds (median), η = {ns.eta}, {ns.threads} thread(s), {device}")
    print(f"{'variant':<8} {'ref model':>9} {'step time (s)':>14} {'peak mem (MB)':>14}")
    for v in VARIANTS:
        print(f"{v:<8} {results[v][0]['ref_model']!s:>9} {med[v]['step_time']:>14.3f} {med[v]['peak_mb']:>14.1f}")
    model_mb = info["params_m"] * 1e6 * (4 if device == "cpu" else 2) / 2**20
    print()
    print(f"fdpo / trl  step time {med['fdpo']['step_time'] / med['trl']['step_time']:.3f}x (target ≤ 1.05)   "
          f"peak memory {med['fdpo']['peak_mb'] / med['trl']['peak_mb']:.3f}x")
    print(f"dph / fdpo  step time {med['dph']['step_time'] / med['fdpo']['step_time']:.3f}x (target ≤ 0.85)   "
          f"peak memory {med['dph']['peak_mb'] / med['fdpo']['peak_mb']:.3f}x, "
          f"saves {med['fdpo']['peak_mb'] - med['dph']['peak_mb']:.1f} MB (one model copy = {model_mb:.1f} MB)")


if __name__ == "__main__":
    main()
