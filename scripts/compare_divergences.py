"""Does the divergence matter? GRPO without KL, GRPO + reverse KL, DPH-forward and DPH-JS from one SFT checkpoint.

    python scripts/compare_divergences.py                       # runs/tiny/sft + runs/tiny/data (quickstart)
    python scripts/compare_divergences.py --sft DIR --data DIR --steps 120 --out runs/tiny/compare

Every method starts from the same SFT checkpoint, with the same RL settings (recipes/tiny/grpo/*.yaml: GRPO/DAPO
loss, 8 rollouts per prompt, same seed, learning rate and number of steps); only the regulariser differs:

- ``grpo_none``      no divergence term (recipes/tiny/grpo/grpo_none.yaml)
- ``grpo_k3_ratio``  reverse KL(π‖π_ref), TRL's default estimator, online reference model
- ``dph_forward``    DPH-RL: RL on D_exp + forward-KL rehearsal on stored π_ref samples of D_pef, no reference model
- ``dph_js``         DPH-RL with Jensen–Shannon rehearsal

One `fdpo presample` store (n samples per training prompt, D_pef = solved every time) serves both DPH runs.
Each checkpoint (and the SFT start) is evaluated with `fdpo.eval.evaluate_checkpoint` on the task's held-out
prompts: unbiased pass@1 and pass@16 from 16 samples per prompt at temperature 1, and the number of distinct
correct answers per prompt (sum_pairs has many). The table is printed and written to <out>/compare.json.
DPH-RL's claim (docs/objectives.md §7): pass@k (large k) stays near the base model under mass-covering rehearsal
while GRPO and reverse KL trade it for pass@1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("grpo_none", "grpo_k3_ratio", "dph_forward", "dph_js")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="runs/tiny/sft")
    p.add_argument("--data", default="runs/tiny/data")
    p.add_argument("--task", default="sum_pairs")
    p.add_argument("--out", default="runs/tiny/compare")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--presample-n", type=int, default=8)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra recipe overrides for every run")
    ns = p.parse_args()

    import torch

    from fdpo.eval.evaluate import evaluate_checkpoint
    from fdpo.recipe import load_recipe
    from fdpo.recipe.load import parse_override_value
    from fdpo.recipe.presample import presample_recipe
    from fdpo.train import run_training

    torch.set_num_threads(1)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = {k: parse_override_value(v) for k, v in (s.split("=", 1) for s in ns.set)}
    common = {
        "model_name_or_path": ns.sft,
        "dataset_name": str(Path(ns.data) / "rl.jsonl"),
        "max_steps": ns.steps,
        "eval_task": None,
        "save_strategy": "no",
        "logging_steps": max(1, ns.steps // 6),
        **extra,
    }
    ks = (1, min(16, ns.samples))

    def evaluate(path: str | Path) -> dict:
        r = evaluate_checkpoint(path, ns.task, ks=ks, num_samples=ns.samples, num_prompts=ns.eval_prompts,
                                greedy=False, out_json=False, seed=1234)
        return {"pass@1": r["pass_at_k"][str(ks[0])], f"pass@{ks[1]}": r["pass_at_k"][str(ks[1])],
                "distinct_correct": r["distinct_correct"]}

    rows = {"sft (start)": evaluate(ns.sft)}
    store = out / "dph_store"
    methods = [m for m in ns.methods.split(",") if m]
    if any(m.startswith("dph") for m in methods) and not (store / "manifest.json").exists():
        t = time.time()
        presample_recipe(ROOT / "recipes" / "tiny" / "grpo" / "dph_forward.yaml",
                         {**common, "output_dir": str(out / "presample"), "presample_dir": str(store),
                          "presample_n": ns.presample_n})
        print(f"presample: {time.time() - t:.0f} s", flush=True)
    for m in methods:
        t = time.time()
        over = {**common, "output_dir": str(out / m)}
        if m.startswith("dph"):
            over["rehearsal_file"] = str(store)
        recipe = load_recipe(ROOT / "recipes" / "tiny" / "grpo" / f"{m}.yaml", over)
        run_training(recipe)
        rows[m] = evaluate(out / m)
        rows[m]["train_s"] = round(time.time() - t, 1)
        print(f"{m}: {rows[m]}", flush=True)

    base = rows["sft (start)"]
    k = f"pass@{ks[1]}"
    print(f"\n{ns.task}: {ns.eval_prompts} held-out prompts × {ns.samples} samples (T = 1), {ns.steps} RL steps from {ns.sft}")
    print(f"{'method':<14} {'pass@1':>8} {k:>8} {'distinct✓':>10} {'Δpass@1':>8} {'Δ' + k:>9} {'Δdistinct':>10}")
    for name, r in rows.items():
        print(f"{name:<14} {r['pass@1']:>8.3f} {r[k]:>8.3f} {r['distinct_correct']:>10.2f} "
              f"{r['pass@1'] - base['pass@1']:>+8.3f} {r[k] - base[k]:>+9.3f} "
              f"{r['distinct_correct'] - base['distinct_correct']:>+10.2f}")
    (out / "compare.json").write_text(json.dumps({"settings": vars(ns), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
