"""Write GSM8K as fdpo GRPO data: `prompt` (one user message asking for a boxed answer) and `answer` (gold).

    python scripts/prepare_gsm8k.py data/gsm8k            # needs the hub (or a local copy: --source DIR)

The `math_verify` reward reads the gold from `answer` (GSM8K's "... #### 72" keeps the part after ####).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--source", default="openai/gsm8k", help="hub name or local dataset directory")
    args = parser.parse_args()
    from datasets import load_dataset

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        ds = load_dataset(args.source, "main", split=split)
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as fh:
            for row in ds:
                prompt = [{"role": "user", "content": f"{row['question']}\n\n{INSTRUCTION}"}]
                fh.write(json.dumps({"prompt": prompt, "answer": row["answer"]}) + "\n")
        print(f"wrote {out / f'{split}.jsonl'} ({len(ds)} rows)")


if __name__ == "__main__":
    main()
