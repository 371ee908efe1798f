"""One-command GPU check: fdpo's objectives vs TRL's (and Liger's) on a random-init Qwen2.5-0.5B, side by side.

    python scripts/gpu_check.py [--out gpu_check.json] [--steps 5]     # one GPU, ≤ 10 minutes
    python scripts/gpu_check.py --cpu-dry-run                          # tiny shapes, no CUDA (the test suite runs it)

The model is the Qwen2.5-0.5B architecture (hidden 896, 24 layers, 14/2 heads, vocab 151,936, tied embeddings),
built from a local config with random weights (no download), in bf16 on the GPU; the tokenizer is fdpo's offline
tiny one (its ids are a subset of the vocabulary) and the data fdpo's synthetic sum_pairs task. Measured in one
run, each pair on the same weights and the same batch (median step time after one warm-up step; peak memory =
torch.cuda.max_memory_allocated during the steps minus the memory allocated before them):

  dpo        TRL DPOTrainer (sigmoid)  vs  fdpo FDPOTrainer reverse_kl and js   (targets ≤ 1.02× time and memory)
  sparsepo   TRL DPOTrainer            vs  fdpo TokenDPOTrainer SparsePO         (target ≤ 1.4×)
  fsft       TRL SFTTrainer            vs  fdpo FSFTTrainer γ = 1, js           (a reference forward + the divergence)
  full_vocab TRL's chunked JSD (distillation) [and Liger's fused JSD if installed]  vs  fdpo
             full_vocab_divergence_from_hidden, js, forward + backward           (target: memory ≤ the best of them)
  fsdp       fdpo FSFTTrainer γ > 0 under `accelerate launch --config_file configs/accelerate/fsdp.yaml
             --num_processes 1` (GPU only: accelerate has no FSDP on a CPU; tests/test_fsdp.py covers 2 CPU ranks)

Not yet in this script (listed as `skipped` in the table and JSON): GRPO with vLLM colocate vs TRL's GRPO with
β > 0, and DPH-RL vs it (benchmarks/bench_grpo.py measures the latter pair on CPU). Prints a table of ratios and
writes the JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # bench_dpo's trainer builders are reused, not copied

QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=512, tie_word_embeddings=True)
DRY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, tie_word_embeddings=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Median seconds per step (after one warm-up step) and peak extra CUDA memory in MiB (CPU: None)."""
    step()
    _sync()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return {"s_per_step": statistics.median(times), "peak_mib": peak}


def build_model(root: Path, dry: bool) -> Path:
    """Random-init Qwen2 of the 0.5B shape (dry: tiny shape) with fdpo's offline tokenizer, saved locally."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from fdpo.models.tiny import build_tiny_model

    tiny = build_tiny_model(root / "tiny", seed=0, task="sum_pairs")
    tok = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    cfg = Qwen2Config(**(DRY if dry else QWEN_05B), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).to(torch.float32 if dry else torch.bfloat16)
    out = root / "qwen2.5-0.5b-random"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _trainer_step(trainer, inputs) -> Callable[[], None]:
    import bench_dpo

    return lambda: bench_dpo.one_step(trainer, inputs)


def check_dpo(model_dir: Path, ns: argparse.Namespace, tmp: Path) -> dict:
    import bench_dpo

    data = bench_dpo._data(64)
    out = {}
    for name, variant, kw in (("trl_dpo", "trl", {}), ("fdpo_reverse_kl", "fdpo", {}),
                              ("fdpo_js", "fdpo", {"divergence": "js"}), ("sparsepo", "sparsepo", {})):
        trainer, inputs = bench_dpo.build_trainer(variant, model_dir, data, ns.batch, str(tmp / name), **kw)
        out[name] = measure(_trainer_step(trainer, inputs), ns.steps)
        del trainer, inputs
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def check_fsft(model_dir: Path, ns: argparse.Namespace, tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from fdpo.data.tasks import build_rows
    from fdpo.trainers.sft import FSFTConfig, FSFTTrainer

    rows = build_rows("sum_pairs", "sft", seed=0, size=64)
    ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(model_dir)
    common = {"report_to": "none", "bf16": False, "use_cpu": not torch.cuda.is_available(), "save_strategy": "no",
              "max_length": 64, "per_device_train_batch_size": ns.batch, "disable_tqdm": True}
    out = {}
    for name, cls, args in (
        ("trl_sft", SFTTrainer, SFTConfig(output_dir=str(tmp / "sft_a"), **common)),
        ("fdpo_fsft_js", FSFTTrainer, FSFTConfig(output_dir=str(tmp / "sft_b"), divergence="js",
                                                  divergence_coef=1.0, **common)),
    ):
        trainer = cls(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=ds,
                      processing_class=tok)
        trainer.model.train()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

        def step(trainer=trainer, batch=batch):
            trainer.compute_loss(trainer.model, dict(batch)).backward()
            trainer.model.zero_grad(set_to_none=True)

        out[name] = measure(step, ns.steps)
        del trainer
    return out


def check_full_vocab(ns: argparse.Namespace, dry: bool) -> dict:
    """The divergence alone, forward + backward, from hidden states and LM heads (JSD, β = 0.5)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from fdpo.divergences import full_vocab_divergence_from_hidden

    shape = DRY if dry else QWEN_05B
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if dry else torch.bfloat16
    n, h, v = (64 if dry else 4096), shape["hidden_size"], shape["vocab_size"]
    torch.manual_seed(0)
    hs = torch.randn(n, h, device=dev, dtype=dtype, requires_grad=True)
    w = (0.02 * torch.randn(v, h, device=dev)).to(dtype).requires_grad_()
    hr, wr = torch.randn(n, h, device=dev, dtype=dtype), (0.02 * torch.randn(v, h, device=dev)).to(dtype)
    mask = torch.ones(1, n, dtype=torch.bool, device=dev)

    def fdpo_step():
        full_vocab_divergence_from_hidden(hs, w, hr, wr, "js", reduction="sum").backward()
        hs.grad = w.grad = None

    def trl_step():
        loss, _, _ = _chunked_divergence_loss(hs[None], hr[None], w, wr, mask, beta=0.5)
        loss.backward()
        hs.grad = w.grad = None

    out = {"fdpo_full_vocab_js": measure(fdpo_step, ns.steps), "trl_chunked_jsd": measure(trl_step, ns.steps)}
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        out["liger_fused_jsd"] = {"skipped": "liger-kernel is not installed"}
    else:
        liger = LigerFusedLinearJSD(jsd_beta=0.5)

        def liger_step():
            liger(hs, w, hr, wr).backward()
            hs.grad = w.grad = None

        out["liger_fused_jsd"] = measure(liger_step, ns.steps)
    return out


def check_fsdp(model_dir: Path, ns: argparse.Namespace, tmp: Path) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "accelerate has no FSDP on a CPU (2 CPU ranks: tests/test_fsdp.py)"}
    from fdpo.data.tasks import write_task_data

    data = write_task_data("sum_pairs", tmp / "data", seed=0)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1", "-m", "fdpo", "train",
           str(REPO / "recipes" / "tiny" / "sft" / "sft.yaml"), "--model_name_or_path", str(model_dir),
           "--dataset_name", str(data["sft"]), "--output_dir", str(tmp / "fsdp"), "--max_steps", str(ns.steps + 1),
           "--divergence", "js", "--divergence_coef", "1.0", "--per_device_train_batch_size", str(ns.batch),
           "--save_strategy", "no", "--eval_task", "null", "--logging_steps", "1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        return {"failed": proc.stderr[-2000:]}
    info = json.loads((tmp / "fsdp" / "fdpo_run_complete.json").read_text())
    return {"distributed_type": info["distributed_type"], "train_runtime_s": info["train_runtime"],
            "steps": info["global_step"], "wall_s": time.perf_counter() - start}


RATIOS = (  # (label, numerator, denominator, target or None)
    ("f-DPO reverse_kl / TRL DPO", ("dpo", "fdpo_reverse_kl"), ("dpo", "trl_dpo"), 1.02),
    ("f-DPO js / TRL DPO", ("dpo", "fdpo_js"), ("dpo", "trl_dpo"), 1.02),
    ("SparsePO / DPO", ("dpo", "sparsepo"), ("dpo", "trl_dpo"), 1.4),
    ("f-SFT γ>0 / TRL SFT", ("fsft", "fdpo_fsft_js"), ("fsft", "trl_sft"), None),
    ("full-vocab fdpo / TRL chunked", ("full_vocab", "fdpo_full_vocab_js"), ("full_vocab", "trl_chunked_jsd"), 1.0),
    ("full-vocab fdpo / Liger", ("full_vocab", "fdpo_full_vocab_js"), ("full_vocab", "liger_fused_jsd"), 1.0),
)


def ratio_rows(results: dict) -> list[dict]:
    rows = []
    for label, (s1, k1), (s2, k2), target in RATIOS:
        a, b = results.get(s1, {}).get(k1, {}), results.get(s2, {}).get(k2, {})
        row = {"comparison": label, "target": target}
        for m in ("s_per_step", "peak_mib"):
            row[m] = a[m] / b[m] if a.get(m) and b.get(m) else None
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU, no CUDA needed")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default="gpu_check.json")
    ns = p.parse_args(argv)
    dry = ns.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu-dry-run for the tiny-shape check")
    if dry:
        ns.steps, ns.batch = min(ns.steps, 2), min(ns.batch, 2)
        torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fdpo_gpu_check_"))
    model_dir = build_model(tmp, dry)
    results: dict = {
        "hardware": torch.cuda.get_device_name(0) if not dry else f"CPU ({platform.processor() or 'dry run'})",
        "dry_run": dry, "torch": torch.__version__, "model": DRY if dry else QWEN_05B, "steps": ns.steps,
        "batch": ns.batch,
    }
    for name, fn in (("dpo", lambda: check_dpo(model_dir, ns, tmp)), ("fsft", lambda: check_fsft(model_dir, ns, tmp)),
                     ("full_vocab", lambda: check_full_vocab(ns, dry)), ("fsdp", lambda: check_fsdp(model_dir, ns, tmp))):
        start = time.perf_counter()
        results[name] = fn()
        print(f"gpu_check: {name} done in {time.perf_counter() - start:.1f}s", flush=True)
    results["grpo"] = {"skipped": "GRPO (vLLM colocate) vs TRL GRPO β>0 and DPH-RL: not yet in this script"}
    results["ratios"] = ratio_rows(results)
    print(f"\n{'comparison':<34} {'time ×':>8} {'memory ×':>9} {'target':>7}")
    for r in results["ratios"]:
        fmt = lambda x: f"{x:.3f}" if x is not None else "—"  # noqa: E731
        print(f"{r['comparison']:<34} {fmt(r['s_per_step']):>8} {fmt(r['peak_mib']):>9} {r['target'] or '':>7}")
    print(f"fsdp: {results['fsdp']}")
    Path(ns.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"gpu_check: wrote {ns.out}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
