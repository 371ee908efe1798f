"""f-SFT step time vs TRL's SFTTrainer, measured interleaved in one run (ratios; CPU timings are noisy).

    python benchmarks/bench_fsft.py [--vocab 8192] [--steps 10]

Variants, each a forward + backward of `compute_loss` on the same batch:
  trl      trl.SFTTrainer (fused LM head)
  fdpo γ=0 FSFTTrainer, no reference (must be ≈ 1.00×)
  fdpo γ>0 FSFTTrainer with a reference (one extra reference forward + the chunked full-vocabulary divergence)
The tiny model's vocabulary is enlarged to `--vocab` (resize_token_embeddings) so the full-vocabulary cost shows.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from fdpo.data.tasks import write_task_data
    from fdpo.models.tiny import build_tiny_model
    from fdpo.trainers.sft import FSFTConfig, FSFTTrainer

    tmp = Path(tempfile.mkdtemp(prefix="bench_fsft_"))
    build_tiny_model(tmp / "model", arch="llama", seed=0, task="sum_pairs")
    write_task_data("sum_pairs", tmp / "data", seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp / "model")
    model.resize_token_embeddings(max(args.vocab, model.config.vocab_size))
    model.save_pretrained(tmp / "model")  # the reference is reloaded from this path
    tok = AutoTokenizer.from_pretrained(tmp / "model")
    import json

    rows = [json.loads(x) for x in (tmp / "data" / "sft.jsonl").read_text().splitlines()[:64]]
    ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    common = {"report_to": "none", "bf16": False, "use_cpu": True, "save_strategy": "no", "max_length": 32,
              "per_device_train_batch_size": args.batch, "disable_tqdm": True}
    trainers = {
        "trl": SFTTrainer(model=copy.deepcopy(model), args=SFTConfig(output_dir=str(tmp / "a"), **common),
                          train_dataset=ds, processing_class=tok),
        "fdpo γ=0": FSFTTrainer(model=copy.deepcopy(model), args=FSFTConfig(output_dir=str(tmp / "b"), **common),
                                train_dataset=ds, processing_class=tok),
        "fdpo γ=1 reverse_kl": FSFTTrainer(model=copy.deepcopy(model), train_dataset=ds, processing_class=tok,
                                           args=FSFTConfig(output_dir=str(tmp / "c"), divergence_coef=1.0, **common)),
        "fdpo γ=1 js": FSFTTrainer(model=copy.deepcopy(model), train_dataset=ds, processing_class=tok,
                                   args=FSFTConfig(output_dir=str(tmp / "d"), divergence="js", divergence_coef=1.0,
                                                   **common)),
    }
    first = next(iter(trainers.values()))
    batch = first._prepare_inputs(next(iter(first.get_train_dataloader())))
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for t in trainers.values():
        t.model.train()
    for _ in range(args.steps + 1):  # interleaved; the first round is warm-up
        for name, t in trainers.items():
            start = time.perf_counter()
            t.compute_loss(t.model, dict(batch)).backward()
            times[name].append(time.perf_counter() - start)
            t.model.zero_grad(set_to_none=True)
    base = statistics.median(times["trl"][1:])
    print(f"vocab {model.config.vocab_size}, batch {args.batch}, {args.steps} steps, 1 thread (median s/step)")
    print(f"{'variant':<22} {'s/step':>8} {'× trl':>7}")
    for name, ts in times.items():
        med = statistics.median(ts[1:])
        print(f"{name:<22} {med:8.4f} {med / base:7.2f}")


if __name__ == "__main__":
    main()
