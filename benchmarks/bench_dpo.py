"""DPO-family training steps: FDPOTrainer vs TRL's DPOTrainer, and SparsePO / TDPO vs plain DPO.

    python benchmarks/bench_dpo.py                 # tiny model + ~50M random-init Llama (vocab 32000)
    python benchmarks/bench_dpo.py --quick         # tiny model only, few rounds
    python benchmarks/bench_dpo.py --models big --rounds 9 --batch 8

Variants (same model weights, same batch of sum_pairs preference pairs, online reference model, AdamW):
  trl        trl.DPOTrainer, reverse KL (standard DPO), sigmoid loss
  fdpo       fdpo FDPOTrainer, divergence reverse_kl (must be within 1.05× of trl)
  sparsepo   fdpo TokenDPOTrainer, SparsePO with a learned common mask (must be within 1.6× of plain DPO = trl)
  tdpo2      fdpo TokenDPOTrainer, TDPO2 (no mask), for reference

Time: one "step" = ``trainer.training_step`` (forward of policy and reference, loss, backward) plus the
optimizer step; every variant is built once, then the variants run interleaved round by round (after one
warm-up round) so that load on a shared machine hits them alike; the median per variant is reported and the
ratios are taken from these medians of one run.
Memory: on CUDA, torch.cuda.max_memory_allocated during the steps minus the allocated memory before them
(interleaved, in-process). On CPU, each variant runs in a fresh subprocess: peak RSS (VmHWM, reset through
/proc/self/clear_refs) during the warm-up + 2 steps minus the RSS before the first step, i.e. activations,
gradients and optimizer state of the steps (the same optimizer state for every variant, plus the mask network).

Reading the CPU numbers: without Triton, TRL's fused LM head projects EVERY position (prompt and padding
included), while the token-level path projects completion positions only, so SparsePO can beat plain DPO on a
CPU. On a GPU TRL compacts to completion positions too; the token-level path then costs about 10 LM-head
products per completion token (policy log-probs 3, reference 1, KL forward 2, KL backward 4) against TRL's 4
(Qwen2.5-0.5B estimate: ≈1.4× a DPO step). Measured on CPU in this repository (one shared 2-core machine,
1 thread, batch 8 pairs, median of 7): tiny 0.9M fdpo/trl 0.96 time, 0.92 memory, sparsepo/dpo 0.97, 0.90;
Llama 43.7M (vocab 32000) fdpo/trl 1.01, 0.98, sparsepo/dpo 0.72, 0.83.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("trl", "fdpo", "sparsepo", "tdpo2")


def _common(out: str, batch: int) -> dict:
    return {
        "output_dir": out,
        "report_to": "none",
        "bf16": False,
        "use_cpu": not _cuda(),
        "save_strategy": "no",
        "logging_steps": 1000,
        "disable_tqdm": True,
        "max_length": 64,
        "per_device_train_batch_size": batch,
        "learning_rate": 1e-5,
        "max_grad_norm": 1.0,
        "beta": 0.1,
        "precompute_ref_log_probs": False,
        "dataloader_num_workers": 0,
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_models(root: Path, which: list[str]) -> dict[str, Path]:
    """The tiny fdpo model and (``big``) a ~50M-parameter random-init Llama with the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fdpo.models.tiny import build_tiny_model

    tiny = build_tiny_model(root / "tiny", seed=0, task="sum_pairs")
    out = {"tiny": tiny}
    if "big" in which:
        import torch

        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(tiny)
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = LlamaForCausalLM(cfg)
        big = root / "llama50m"
        model.save_pretrained(big)
        tok.save_pretrained(big)
        out["big"] = big
    return {k: v for k, v in out.items() if k in which}


def build_trainer(variant: str, model_dir: Path, data, batch: int, out: str, divergence: str = "reverse_kl"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    kw = _common(out, batch)
    if variant == "trl":
        from trl import DPOConfig, DPOTrainer

        cls, args = DPOTrainer, DPOConfig(**kw)
    elif variant == "fdpo":
        from fdpo.trainers.dpo import FDPOConfig, FDPOTrainer

        cls, args = FDPOTrainer, FDPOConfig(divergence=divergence, **kw)
    else:
        from fdpo.trainers.token_dpo import TokenDPOConfig, TokenDPOTrainer

        extra = {
            "objective": "sparsepo",
            "mask": "sparse",
            "mask_mode": "common",
            "l1_reward": 1e-3,
            "l1_kl": 1e-3,
        }
        if variant == "tdpo2":
            extra = {"objective": "tdpo2"}
        cls, args = TokenDPOTrainer, TokenDPOConfig(**extra, **kw)
    trainer = cls(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); training_step divides by it
    trainer.model.train()
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(batch)])
    inputs = {k: v.to(trainer.accelerator.device) for k, v in inputs.items()}
    return trainer, inputs


def one_step(trainer, inputs) -> None:
    trainer.training_step(trainer.model, inputs)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.zero_grad(set_to_none=True)
    if getattr(trainer, "token_masks", None) is not None:
        trainer.token_masks.zero_grad(set_to_none=True)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _data(n: int):
    from datasets import Dataset

    from fdpo.data.tasks import build_rows

    rows = build_rows("sum_pairs", "preference", seed=0, size=n)
    return Dataset.from_list(rows)


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def memory_worker(variant: str, model_dir: str, batch: int, threads: int) -> None:
    """Child process: peak RSS growth over a warm-up step and two steps (CPU)."""
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, inputs = build_trainer(variant, Path(model_dir), _data(4 * batch), batch, tmp)
        before = _vm("VmRSS")
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        for _ in range(3):
            one_step(trainer, inputs)
        print(json.dumps({"peak": _vm("VmHWM") - before}))


def cpu_memory(variant: str, model_dir: Path, batch: int, threads: int) -> float:
    cmd = [sys.executable, __file__, "--memory-worker", variant, str(model_dir), str(batch), str(threads)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"] / 2**20


def bench_model(
    name: str, model_dir: Path, batch: int, rounds: int, threads: int
) -> dict[str, dict[str, float]]:
    import torch

    data = _data(4 * batch)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in VARIANTS:
            trainers[v] = build_trainer(v, model_dir, data, batch, os.path.join(tmp, v))
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        mem: dict[str, float] = {}
        for r in range(rounds + 1):  # round 0: warm-up
            order = VARIANTS if r % 2 else tuple(reversed(VARIANTS))
            for v in order:
                trainer, inputs = trainers[v]
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                _sync()
                t0 = time.perf_counter()
                one_step(trainer, inputs)
                _sync()
                dt = time.perf_counter() - t0
                if r > 0:
                    times[v].append(dt)
                    if torch.cuda.is_available():
                        mem[v] = max(mem.get(v, 0.0), (torch.cuda.max_memory_allocated() - base) / 2**20)
    if not torch.cuda.is_available():
        mem = {v: cpu_memory(v, model_dir, batch, threads) for v in VARIANTS}
    return {v: {"time_ms": 1e3 * statistics.median(times[v]), "mem_mib": mem[v]} for v in VARIANTS}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        _, _, variant, model_dir, batch, threads = sys.argv
        memory_worker(variant, model_dir, int(batch), int(threads))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny", "big"], choices=["tiny", "big"])
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 rounds")
    a = parser.parse_args()
    if a.quick:
        a.models, a.rounds = ["tiny"], 3
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({a.threads} thread)"
    print(f"device: {device}; batch {a.batch} pairs; median of {a.rounds} interleaved steps")
    with tempfile.TemporaryDirectory() as root:
        models = build_models(Path(root), a.models)
        header = (
            f"{'model':<9} {'params':>7} | {'trl ms':>8} {'fdpo ms':>8} {'sparsepo':>9} {'tdpo2':>8} | "
            f"{'fdpo/trl t':>10} {'fdpo/trl m':>10} | {'sparse/dpo t':>12} {'sparse/dpo m':>12} | mem MiB trl/fdpo/sparsepo"
        )
        print(header)
        print("-" * len(header))
        for name, path in models.items():
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(path)
            n = _param_count(cfg)
            res = bench_model(name, path, a.batch, a.rounds, a.threads)
            t = {v: res[v]["time_ms"] for v in VARIANTS}
            m = {v: res[v]["mem_mib"] for v in VARIANTS}
            print(
                f"{name:<9} {n / 1e6:>6.1f}M | {t['trl']:>8.1f} {t['fdpo']:>8.1f} {t['sparsepo']:>9.1f} {t['tdpo2']:>8.1f} | "
                f"{t['fdpo'] / t['trl']:>10.3f} {_ratio(m['fdpo'], m['trl']):>10} | "
                f"{t['sparsepo'] / t['trl']:>12.3f} {_ratio(m['sparsepo'], m['trl']):>12} | "
                f"{m['trl']:.1f}/{m['fdpo']:.1f}/{m['sparsepo']:.1f}"
            )
    print("targets: fdpo/trl ≤ 1.05 (time and memory); sparsepo/plain DPO (trl) ≤ 1.6")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b > 0 else "n/a"


def _param_count(cfg) -> float:
    from transformers import AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
