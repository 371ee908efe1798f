"""D2O training step (FD2OTrainer) vs TRL 1.16's DPOTrainer on the same number of sequences.

    python benchmarks/bench_d2o.py                       # tiny model, K = 3, 8 prompts → 32 rows
    python benchmarks/bench_d2o.py --model runs/tiny/sft --k 11 --prompts 4 --reps 10

Both trainers precompute their reference log-probs (so a step is one policy forward + backward
through TRL's fused LM head) and see batches of the same number of rows: D2O B prompts × (K + 1)
completions, DPO B(K + 1)/2 pairs × 2. The completions are the sum_pairs task's short answers for
both. What differs is fdpo's code around TRL's: data layout, splitting, the loss, the metrics.

Time: forward + backward (`trainer.training_step` on one collated batch), best and median of
``--reps`` after one warm-up, the two trainers interleaved in one process, ``--threads`` torch threads
(default 1: on a shared CPU, OpenMP spin-waiting distorts multi-threaded timings).
Memory: the bytes of the distinct storages autograd saves for backward during one step (activation
memory, device-independent; on a CPU the RSS high-water mark of a tiny model is set by the setup, not
the step), and on CUDA torch.cuda.max_memory_allocated beyond the allocation before the step.
Ratios are D2O / DPO from one run of this script.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _setup(args, workdir: Path):
    from fdpo.data.tasks import write_task_data
    from fdpo.models.tiny import build_tiny_model

    data = write_task_data("sum_pairs", workdir / "data", seed=0)
    model_dir = (
        Path(args.model) if args.model else build_tiny_model(workdir / "model", seed=0, task="sum_pairs")
    )
    return model_dir, data


def _trainer(kind: str, args, model_dir: Path, data: dict, workdir: Path):
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from fdpo.trainers.d2o import FD2OConfig, FD2OTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    common = {
        "output_dir": str(workdir / kind),
        "report_to": "none",
        "bf16": False,
        "use_cpu": not torch.cuda.is_available(),
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "max_length": 64,
        "precompute_ref_log_probs": True,
        "max_steps": 1,
    }
    if kind == "d2o":
        ds = load_dataset("json", data_files=str(data["negatives"]), split="train").select(
            range(4 * args.prompts)
        )
        cfg = FD2OConfig(
            per_device_train_batch_size=args.prompts,
            num_reference_samples=args.k,
            sample_max_new_tokens=16,
            **common,
        )
        trainer = FD2OTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    else:
        pairs = args.prompts * (args.k + 1) // 2
        ds = load_dataset("json", data_files=str(data["preference"]), split="train").select(range(4 * pairs))
        cfg = DPOConfig(per_device_train_batch_size=pairs, **common)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's train loop, which is bypassed here
    batch = trainer._prepare_inputs(batch)
    return trainer, batch


def _step(trainer, batch) -> float:
    import torch

    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    trainer.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _saved_bytes(trainer, batch) -> int:
    """Bytes of the distinct tensor storages autograd saves for backward in one step (activation memory)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(trainer, batch)
    return sum(seen.values())


def _cuda_peak(trainer, batch) -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(trainer, batch)
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model directory (default: build the tiny model)")
    parser.add_argument("--k", type=int, default=3, help="reference samples per prompt (K)")
    parser.add_argument(
        "--prompts", type=int, default=8, help="D2O prompts per batch (DPO: prompts·(K+1)/2 pairs)"
    )
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, data = _setup(args, work)
        trainers = {kind: _trainer(kind, args, model_dir, data, work) for kind in ("d2o", "dpo")}
        rows = {kind: int(b["input_ids"].shape[0]) for kind, (_, b) in trainers.items()}
        tokens = {kind: int(b["attention_mask"].sum()) for kind, (_, b) in trainers.items()}
        times: dict[str, list[float]] = {"d2o": [], "dpo": []}
        for tr, b in trainers.values():  # warm-up
            _step(tr, b)
        for _ in range(args.reps):
            for kind, (tr, b) in trainers.items():
                times[kind].append(_step(tr, b))
        saved = {kind: _saved_bytes(tr, b) for kind, (tr, b) in trainers.items()}
        peak = {kind: _cuda_peak(tr, b) for kind, (tr, b) in trainers.items()}

    device = "cuda" if torch.cuda.is_available() else f"cpu ({args.threads} thread(s))"
    print(
        f"D2O (K={args.k}, {args.prompts} prompts) vs TRL DPOTrainer, {device}; rows {rows}, tokens {tokens}"
    )
    header = f"{'trainer':<10}{'best ms':>10}{'median ms':>12}{'ms/1k tok':>12}{'saved MiB':>12}"
    print(header + (f"{'CUDA peak MiB':>15}" if peak["d2o"] is not None else ""))
    for kind in ("d2o", "dpo"):
        t = times[kind]
        line = f"{kind:<10}{min(t) * 1e3:>10.1f}{statistics.median(t) * 1e3:>12.1f}"
        line += f"{statistics.median(t) * 1e6 / tokens[kind]:>12.2f}{saved[kind] / 2**20:>12.2f}"
        print(line + (f"{peak[kind] / 2**20:>15.1f}" if peak[kind] is not None else ""))
    per_tok = (statistics.median(times["d2o"]) / tokens["d2o"]) / (
        statistics.median(times["dpo"]) / tokens["dpo"]
    )
    print(
        f"ratio d2o/dpo: time best {min(times['d2o']) / min(times['dpo']):.3f}, median "
        f"{statistics.median(times['d2o']) / statistics.median(times['dpo']):.3f}, per token {per_tok:.3f}; "
        f"saved-for-backward {saved['d2o'] / saved['dpo']:.3f}"
        + (f"; CUDA peak {peak['d2o'] / peak['dpo']:.3f}" if peak["d2o"] else "")
    )


if __name__ == "__main__":
    main()
