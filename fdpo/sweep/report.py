"""The sweep report: method × metric with seeded bootstrap intervals, paired Δ vs the baseline and vs the start.

From every complete cell's `eval_<split>/eval.json` (their `per_prompt` rows: c correct of n
samples, distinct correct answers, answer entropy, per-token KL to the start) the report builds,
per split and method (cells of one method differ only in the seed), tables x[s, p] over seeds s
and prompts p, and:

- pass@k for k = 1…n per prompt from c (`pass_at_k_curve`, the unbiased estimator), averaged;
- mean, 95% two-way bootstrap interval over prompts and seeds (`fdpo.eval.intervals`, seeded by
  the sweep's eval seed, the same replicates for every metric of a method);
- Δ vs the baseline method: the paired difference on the same prompts and seed indices (seeds both
  have); Δ vs the start checkpoint: x[s, p] − x_start[p] (the start is one model, evaluated once);
  an interval that excludes 0 is marked `*`.

Written to run_dir/report/: `report.md`, `report.json` and, per split, `pass_at_k_<split>.png`
(curves with bands, log-k axis), `reward_vs_diversity_<split>.png` (mean reward vs distinct correct
answers, the f-DPO paper's trade-off picture) and `kl_vs_reward_<split>.png` (KL to start vs reward).
It is rewritten after every finished cell, so it shows what is complete while the rest runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fdpo.eval.intervals import BootstrapDraws, Interval, bootstrap_curve, bootstrap_mean, paired_difference
from fdpo.eval.metrics import pass_at_k_curve
from fdpo.sweep.plots import write_plots
from fdpo.sweep.spec import START_ROW, SweepSpec, cell_is_complete, eval_splits
from fdpo.trainers.checkpoints import RUN_MARKER, write_json

REPORT_DIR = "report"
PER_PROMPT_METRICS = ("distinct_correct", "answer_entropy", f"kl_to_{START_ROW}")
LABELS = {"mean_reward": "mean reward", "distinct_correct": "distinct correct", "answer_entropy": "answer entropy",
          f"kl_to_{START_ROW}": "KL to start"}


def _load_eval(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if "per_prompt" in result else None


def report_ks(n: int) -> list[int]:
    """The k columns of the table: 1, 4, 16, … (powers of 4) up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 4
    return [*ks, n]


def _tables(results: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """{metric: x[s, p]} and "curve": x[s, p, k] from the eval results of one method's seeds."""
    n = results[0]["settings"]["num_samples"]
    counts = np.array([[p["correct"] for p in r["per_prompt"]] for r in results])
    out = {"curve": np.array([[pass_at_k_curve(n, int(c)) for c in row] for row in counts]),
           "mean_reward": counts / n}
    for key in PER_PROMPT_METRICS:
        if all(key in r["per_prompt"][0] for r in results):
            out[key] = np.array([[p[key] for p in r["per_prompt"]] for r in results], dtype=np.float64)
    return out


def _metric_values(tables: dict[str, np.ndarray], ks: list[int]) -> dict[str, np.ndarray]:
    out = {f"pass@{k}": tables["curve"][:, :, k - 1] for k in ks}
    out.update({m: v for m, v in tables.items() if m != "curve"})
    return out


def _interval(iv: Interval) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in iv.as_dict().items()}


def _train_time(cell_dir: Path) -> float | None:
    marker = cell_dir / "train" / RUN_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("wall_time_s")


def build_report(spec: SweepSpec) -> dict[str, Any]:
    """The report as a dict (module docstring); only complete evaluations enter it."""
    cells = spec.cells()
    complete = [c for c in cells if cell_is_complete(spec, c)]
    seed = int(spec.eval.get("seed", 1234))
    report: dict[str, Any] = {
        "sweep": str(spec.path), "description": spec.description, "baseline": spec.baseline,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cells": {"total": len(cells), "complete": len(complete),
                  "pending": [c.name for c in cells if c not in complete]},
        "bootstrap": {"resamples": 2000, "confidence": 0.95, "seed": seed,
                      "over": "prompts and seeds (two-way percentile bootstrap)"},
        "splits": {},
    }
    for split in eval_splits(spec):
        start = _load_eval(spec.shared_dir / f"eval_{START_ROW}_{split}" / "eval.json")
        by_group: dict[str, list[tuple[int, dict[str, Any], float | None]]] = {}
        for cell in complete:
            result = _load_eval(spec.cell_dir(cell) / f"eval_{split}" / "eval.json")
            if result is not None:
                by_group.setdefault(cell.group, []).append((cell.seed, result, _train_time(spec.cell_dir(cell))))
        rows: dict[str, Any] = {}
        tables: dict[str, tuple[list[int], dict[str, np.ndarray]]] = {}
        n = None
        if start is not None:
            n = start["settings"]["num_samples"]
            tables[START_ROW] = ([], _tables([start]))
        for group in spec.groups():
            if group in by_group:
                entries = sorted(by_group[group], key=lambda e: e[0])
                tables[group] = ([e[0] for e in entries], _tables([e[1] for e in entries]))
                n = n or entries[0][1]["settings"]["num_samples"]
                times = [e[2] for e in entries if e[2] is not None]
                rows[group] = {"seeds": [e[0] for e in entries],
                               "train_wall_time_s": round(float(np.mean(times)), 1) if times else None}
        if n is None:
            continue
        ks = report_ks(n)
        if start is not None:
            rows = {START_ROW: {"seeds": [], "train_wall_time_s": None}, **rows}
        base = tables.get(spec.baseline) if spec.baseline else None
        for group, (seeds, tab) in tables.items():
            values = _metric_values(tab, ks)
            draws = BootstrapDraws.draw(tab["curve"].shape[0], tab["curve"].shape[1], seed=seed)
            row = rows[group]
            row["num_prompts"] = int(tab["curve"].shape[1])
            row["metrics"] = {m: _interval(bootstrap_mean(v, draws)) for m, v in values.items()}
            row["pass_at_k_curve"] = {k: [round(x, 6) for x in v] for k, v in bootstrap_curve(tab["curve"], draws).items()}
            if base is not None and group not in (spec.baseline, START_ROW):
                row["delta_vs_baseline"] = _paired(seeds, values, base[0], _metric_values(base[1], ks), seed)
            if START_ROW in tables and group != START_ROW:
                start_values = _metric_values(tables[START_ROW][1], ks)
                row["delta_vs_start"] = {m: _interval(bootstrap_mean(v - start_values[m], draws))
                                         for m, v in values.items() if m in start_values}
        report["splits"][split] = {"num_samples": n, "ks": ks, "rows": rows,
                                   "num_prompts": start["settings"]["num_prompts"] if start else None}
    return report


def _paired(seeds: list[int], values: dict[str, np.ndarray], base_seeds: list[int],
            base_values: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    common = [s for s in seeds if s in base_seeds]
    if not common:
        return {}
    mine = [seeds.index(s) for s in common]
    theirs = [base_seeds.index(s) for s in common]
    draws = BootstrapDraws.draw(len(common), next(iter(values.values())).shape[1], seed=seed)
    return {m: _interval(paired_difference(v[mine], base_values[m][theirs], draws))
            for m, v in values.items() if m in base_values}


def _fmt(iv: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    if iv is None:
        return "-"
    sign = "+" if signed else ""
    mark = "*" if signed and iv["excludes_zero"] else ""
    return f"{iv['mean']:{sign}.{digits}f} [{iv['low']:{sign}.{digits}f}, {iv['high']:{sign}.{digits}f}]{mark}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: per split a metric table, Δ vs baseline and Δ vs start tables."""
    lines = [f"# Sweep report: {report['sweep']}", ""]
    if report["description"]:
        lines += [report["description"], ""]
    c = report["cells"]
    lines += [f"Cells complete: {c['complete']}/{c['total']}"
              + (f" (pending: {', '.join(c['pending'])})" if c["pending"] else "") + f". Generated {report['generated']}.",
              "", "Mean over prompts and seeds, [95% interval] from a seeded two-way bootstrap over prompts and seeds "
              f"({report['bootstrap']['resamples']} resamples); Δ columns are paired differences on the same prompts, "
              "`*` where the interval excludes 0. pass@1 equals the mean reward (binary verifier).", ""]
    for split, block in report["splits"].items():
        rows = block["rows"]
        metrics = [f"pass@{k}" for k in block["ks"]] + [m for m in LABELS if m != "mean_reward"
                                                        and any(m in r["metrics"] for r in rows.values())]
        header = ["method", "seeds", *[LABELS.get(m, m) for m in metrics], "train s"]
        lines += [f"## Split `{split}` ({block['num_samples']} samples per prompt)", ""]
        lines += _md_table(header, [[g, str(len(r["seeds"]) or "-"), *[_fmt(r["metrics"].get(m)) for m in metrics],
                                     "-" if r["train_wall_time_s"] is None else f"{r['train_wall_time_s']:.0f}"]
                                    for g, r in rows.items()])
        for key, title in (("delta_vs_baseline", f"Δ vs baseline `{report['baseline']}`"),
                           ("delta_vs_start", "Δ vs the start checkpoint")):
            delta_rows = [[g, *[_fmt(r[key].get(m), signed=True) for m in metrics]] for g, r in rows.items() if r.get(key)]
            if delta_rows:
                lines += ["", f"### {title} (`{split}`)", ""]
                lines += _md_table(["method", *[LABELS.get(m, m) for m in metrics]], delta_rows)
        lines.append("")
    return "\n".join(lines) + "\n"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def write_report(spec: SweepSpec) -> dict[str, Any]:
    """Build the report and write report.md, report.json and the PNGs (atomically) into run_dir/report/."""
    report = build_report(spec)
    out = spec.run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    tmp = out / "report.md.tmp"
    tmp.write_text(render_markdown(report), encoding="utf-8")
    tmp.replace(out / "report.md")
    write_plots(report, out)
    return report
