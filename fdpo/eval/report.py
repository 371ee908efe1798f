"""`render_eval_table`: an evaluation result (from `evaluate_checkpoint`) as `rich` tables on screen."""

from __future__ import annotations

from typing import Any

_LABELS = {
    "mean_reward": "mean reward",
    "distinct_correct": "distinct correct answers / prompt",
    "answer_coverage": "answer coverage",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "finished_rate": "ended with eos",
    "greedy_accuracy": "greedy accuracy",
}


def render_eval_table(result: dict[str, Any], console=None) -> None:
    """Print the headline metrics, the per-difficulty breakdown and a few sample completions."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    s = result.get("settings", {})
    title = (
        f"fdpo eval: {result.get('checkpoint')} on {result.get('task')} "
        f"({s.get('num_prompts')} prompts × {s.get('num_samples')} samples, T={s.get('temperature')})"
    )
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.get("pass_at_k", {}).items():
        table.add_row(f"pass@{k}", f"{v:.3f}")
    for key, label in _LABELS.items():
        if key in result:
            table.add_row(label, f"{result[key]:.3f}")
    console.print(table)

    levels = result.get("by_difficulty", {})
    if levels:
        sub = Table(title="by difficulty")
        for col in ("difficulty", "prompts", "pass@1", "distinct correct"):
            sub.add_column(col, justify="right")
        for level, row in levels.items():
            sub.add_row(level, str(row["num_prompts"]), f"{row['pass@1']:.3f}", f"{row['distinct_correct']:.2f}")
        console.print(sub)
    for ex in result.get("examples", [])[:3]:
        shown = ", ".join(repr(c[:24]) for c in ex["completions"])
        console.print(f"[dim]{escape(ex['prompt'])}[/dim] → {escape(shown)}", highlight=False)
    if s.get("out_json"):
        console.print(f"saved: {s['out_json']}")
