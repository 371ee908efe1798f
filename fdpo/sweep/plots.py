"""The sweep report's figures (PNG, matplotlib Agg), one set per evaluation split.

- `pass_at_k_<split>.png`: pass@k for k = 1…n per method, mean over prompts and seeds with its 95%
  bootstrap band, on a log-k axis (where DPH-RL's large-k claim is read off);
- `reward_vs_diversity_<split>.png`: mean reward (y) against distinct correct answers per prompt (x),
  one point per method with both intervals as error bars (the f-DPO paper's trade-off picture);
- `kl_vs_reward_<split>.png`: per-token KL to the start checkpoint (x) against mean reward (y).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _errorbar(ax, rows: dict[str, Any], x_key: str, y_key: str) -> bool:
    drawn = False
    for name, row in rows.items():
        x, y = row["metrics"].get(x_key), row["metrics"].get(y_key)
        if x is None or y is None:
            continue
        ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                    yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]], fmt="o", capsize=3, label=name)
        drawn = True
    return drawn


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Write the figures of every split of `report` into `out`; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for split, block in report["splits"].items():
        rows = block["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, row in rows.items():
            curve = row["pass_at_k_curve"]
            ks = list(range(1, len(curve["mean"]) + 1))
            line, = ax.plot(ks, curve["mean"], label=name, linestyle="--" if name == "start" else "-")
            ax.fill_between(ks, curve["low"], curve["high"], color=line.get_color(), alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (samples per prompt)")
        ax.set_ylabel("pass@k")
        ax.set_title(f"pass@k, split '{split}' (mean, 95% bootstrap band)")
        ax.legend(fontsize=7, loc="lower right")
        written.append(_save(fig, out / f"pass_at_k_{split}.png", plt))

        for x_key, y_key, stem, xlabel in (
            ("distinct_correct", "mean_reward", "reward_vs_diversity", "distinct correct answers per prompt"),
            ("kl_to_start", "mean_reward", "kl_vs_reward", "per-token KL to the start checkpoint"),
        ):
            fig, ax = plt.subplots(figsize=(5.5, 4))
            if _errorbar(ax, rows, x_key, y_key):
                ax.set_xlabel(xlabel)
                ax.set_ylabel("mean reward (= pass@1)")
                ax.set_title(f"split '{split}' (95% bootstrap intervals)")
                ax.legend(fontsize=7)
                written.append(_save(fig, out / f"{stem}_{split}.png", plt))
            else:
                plt.close(fig)
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
