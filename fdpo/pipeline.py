"""Multi-stage pipelines: named stages run in order, each skipped when complete and resumed when partial.

A pipeline recipe is YAML:

    run_dir: runs/tiny                 # every stage writes to run_dir/<stage name>
    stages:
      - {name: model, kind: tiny, arch: llama, seed: 0}
      - {name: data, kind: data, task: sum_pairs, seed: 0}
      - name: sft
        kind: train
        recipe: recipes/tiny/sft/sft.yaml
        overrides:                     # recipe keys; {from_stage: X, file: F} is X's output (/F)
          model_name_or_path: {from_stage: model}
          dataset_name: {from_stage: data, file: sft.jsonl}
      - {name: eval_sft, kind: eval, checkpoint: {from_stage: sft}, task: sum_pairs, ks: [1, 4, 16]}

Stage kinds: `tiny` (build the tiny model), `data` (synthetic task data), `train` (a training
recipe; output_dir is set to the stage folder), `presample` (DPH-RL's `fdpo presample` of a GRPO
recipe; the rehearsal store is the stage folder, so a later train stage sets
`rehearsal_file: {from_stage: <this stage>}`), `eval` (pass@k and diversity; `kl_to: {sft: {from_stage: sft}}` adds `kl_to_sft`, the exact
per-token KL(π‖π_sft) on the evaluated checkpoint's own samples; `split: ood` evaluates the task's
out-of-distribution prompts instead of its held-out ones). `--from STAGE`
reruns that stage and every later one; earlier stages are reused as they are.

A stage is complete only for the spec it ran with: its fingerprint (a hash of its kind and spec, the
text of its recipe file, the command-line overrides, and the fingerprints of the stages it reads
from) is kept in `run_dir/.fdpo_stages/<name>.json`. A stage whose fingerprint changed (an edited
recipe or override) is rerun from scratch, and so is every stage that consumes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fdpo.errors import RecipeError, nearest
from fdpo.recipe.load import parse_overrides, read_yaml
from fdpo.trainers.checkpoints import RUN_MARKER, run_is_complete, write_json

logger = logging.getLogger("fdpo")

STAGE_KINDS = ("tiny", "data", "train", "presample", "eval")
STAGE_KEYS = {
    "tiny": {"name", "kind", "arch", "seed", "task"},
    "data": {"name", "kind", "task", "seed"},
    "train": {"name", "kind", "recipe", "overrides", "resume"},
    "presample": {"name", "kind", "recipe", "overrides"},
    "eval": {"name", "kind", "checkpoint", "task", "ks", "num_samples", "num_prompts", "temperature",
             "max_new_tokens", "seed", "data", "kl_to", "split"},
}
SUMMARY_JSON = "pipeline_summary.json"
# columns of the on-screen summary (the JSON keeps every metric)
HEADLINE_METRICS = ("final_loss", "pass@1", "pass@4", "pass@16", "mean_reward", "distinct_correct")
SUMMARY_PNG = "pipeline_summary.png"


@dataclass
class Stage:
    name: str
    kind: str
    spec: dict[str, Any]
    out: Path


@dataclass
class StageResult:
    name: str
    kind: str
    status: str  # ran | resumed | skipped
    wall_time_s: float
    metrics: dict[str, Any] = field(default_factory=dict)


def parse_pipeline(path: str | Path) -> tuple[Path, list[Stage]]:
    """Read and check a pipeline recipe: stage names unique, kinds and keys valid, references backwards."""
    path = Path(path)
    data = read_yaml(path)
    unknown = set(data) - {"run_dir", "stages", "description"}
    if unknown:
        key = sorted(unknown)[0]
        hint = nearest(key, ["run_dir", "stages", "description"])
        raise RecipeError(f"{path}: unknown pipeline key '{key}'." + (f" Did you mean '{hint}'?" if hint else ""))
    if "run_dir" not in data or "stages" not in data:
        raise RecipeError(f"{path}: a pipeline needs 'run_dir' and 'stages' (a list of stages).")
    run_dir = Path(data["run_dir"])
    stages: list[Stage] = []
    for i, spec in enumerate(data["stages"]):
        where = f"{path}: stage {i}"
        if not isinstance(spec, dict) or "name" not in spec or "kind" not in spec:
            raise RecipeError(f"{where}: each stage is a mapping with at least 'name' and 'kind'.")
        kind = spec["kind"]
        if kind not in STAGE_KINDS:
            hint = nearest(str(kind), STAGE_KINDS)
            raise RecipeError(
                f"{where} ('{spec['name']}'): kind {kind!r} is not one of {list(STAGE_KINDS)}."
                + (f" Did you mean '{hint}'?" if hint else "")
            )
        for key in spec:
            if key not in STAGE_KEYS[kind]:
                hint = nearest(key, STAGE_KEYS[kind])
                raise RecipeError(
                    f"{where} ('{spec['name']}'): unknown key '{key}' for a {kind} stage."
                    + (f" Did you mean '{hint}'?" if hint else f" Valid: {sorted(STAGE_KEYS[kind])}.")
                )
        if any(s.name == spec["name"] for s in stages):
            raise RecipeError(f"{where}: duplicate stage name '{spec['name']}'.")
        if kind in ("train", "presample") and "recipe" not in spec:
            raise RecipeError(f"{where} ('{spec['name']}'): a {kind} stage needs 'recipe'.")
        stages.append(Stage(name=str(spec["name"]), kind=kind, spec=dict(spec), out=run_dir / str(spec["name"])))
    names = [s.name for s in stages]
    for i, stage in enumerate(stages):
        for ref in _references(stage.spec):
            if ref not in names[:i]:
                raise RecipeError(
                    f"{path}: stage '{stage.name}' uses from_stage '{ref}', which is not an earlier stage "
                    f"(earlier: {names[:i]})."
                )
    return run_dir, stages


def _references(value: Any) -> list[str]:
    if isinstance(value, dict):
        if "from_stage" in value:
            return [str(value["from_stage"])]
        return [r for v in value.values() for r in _references(v)]
    if isinstance(value, list):
        return [r for v in value for r in _references(v)]
    return []


def _resolve(value: Any, outputs: dict[str, Path]) -> Any:
    """Replace {from_stage: X, file: F} by the path of X's output (joined with F)."""
    if isinstance(value, dict):
        if "from_stage" in value:
            base = outputs[str(value["from_stage"])]
            return str(base / value["file"]) if value.get("file") else str(base)
        return {k: _resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, outputs) for v in value]
    return value


def _eval_json(stage: Stage) -> Path:
    return stage.out / "eval.json"


def stage_is_complete(stage: Stage) -> bool:
    if stage.kind == "tiny":
        return (stage.out / "fdpo_tiny.json").is_file()
    if stage.kind == "data":
        return (stage.out / "manifest.json").is_file()
    if stage.kind == "train":
        return run_is_complete(stage.out)
    if stage.kind == "presample":  # the store is written atomically: its manifest means complete
        return (stage.out / "manifest.json").is_file()
    return _eval_json(stage).is_file()


def _run_stage(stage: Stage, outputs: dict[str, Path], extra_overrides: dict[str, Any]) -> dict[str, Any]:
    spec = _resolve(stage.spec, outputs)
    if stage.kind == "tiny":
        from fdpo.models.tiny import build_tiny_model

        build_tiny_model(
            stage.out, arch=spec.get("arch", "llama"), seed=spec.get("seed", 0), task=spec.get("task", "sum_pairs")
        )
        return {}
    if stage.kind == "data":
        from fdpo.data.tasks import write_task_data

        write_task_data(spec.get("task", "sum_pairs"), stage.out, seed=spec.get("seed", 0))
        return {}
    if stage.kind == "train":
        from fdpo.recipe import load_recipe
        from fdpo.train import run_training

        overrides = {**spec.get("overrides", {}), **extra_overrides, "output_dir": str(stage.out)}
        recipe = load_recipe(spec["recipe"], overrides)
        # a stage folder that does not exist yet has nothing to resume (and nothing to warn about)
        # `resume: false` starts the stage over (its folder's earlier contents are deleted, not mixed in)
        resume = spec.get("resume", True)
        metrics = run_training(recipe, resume=resume and stage.out.exists(), overwrite=not resume)
        history = [h for h in metrics.get("log_history", []) if "loss" in h]
        return {"steps": metrics["global_step"], "final_loss": history[-1]["loss"] if history else None}
    if stage.kind == "presample":
        from fdpo.recipe import presample_recipe

        overrides = {**spec.get("overrides", {}), **extra_overrides, "presample_dir": str(stage.out)}
        return _presample_metrics(presample_recipe(spec["recipe"], overrides))
    from fdpo.eval import evaluate_checkpoint, render_eval_table

    ks = tuple(spec.get("ks", (1, 4, 16)))
    stage.out.mkdir(parents=True, exist_ok=True)
    result = evaluate_checkpoint(
        spec["checkpoint"],
        task=spec.get("task", "sum_pairs"),
        ks=ks,
        num_samples=spec.get("num_samples", max(ks)),
        num_prompts=spec.get("num_prompts", 64),
        temperature=spec.get("temperature", 1.0),
        max_new_tokens=spec.get("max_new_tokens", 16),
        seed=spec.get("seed", 0),
        out_json=str(_eval_json(stage)),
        data_file=spec.get("data"),
        kl_references=spec.get("kl_to"),
        split=spec.get("split", "eval"),
    )
    render_eval_table(result)
    return _eval_metrics(result)


def _eval_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an evaluation (flattened pass@k, reward, diversity)."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value
        elif key == "pass_at_k" and isinstance(value, dict):
            out.update({f"pass@{k}": v for k, v in value.items()})
    return out


def _presample_metrics(manifest: dict[str, Any]) -> dict[str, Any]:
    c = manifest["counts"]
    return {"frac_pef": manifest["frac_pef"], "pass_rate": manifest["pass_rate"], "d_pef": c["d_pef_prompts"],
            "d_exp": c["d_exp_prompts"], "stored_samples": c["stored_samples"]}


def _previous_metrics(stage: Stage) -> dict[str, Any]:
    if stage.kind == "presample" and (stage.out / "manifest.json").is_file():
        return _presample_metrics(json.loads((stage.out / "manifest.json").read_text()))
    if stage.kind == "eval" and _eval_json(stage).is_file():
        return _eval_metrics(json.loads(_eval_json(stage).read_text()))
    if stage.kind == "train" and (stage.out / RUN_MARKER).is_file():
        info = json.loads((stage.out / RUN_MARKER).read_text())
        history = [h for h in info.get("log_history", []) if "loss" in h]
        return {"steps": info.get("global_step"), "final_loss": history[-1]["loss"] if history else None}
    return {}


STAGE_HASHES = ".fdpo_stages"


def stage_fingerprint(stage: Stage, upstream: dict[str, str], extra: dict[str, Any]) -> str:
    """Hash of what a stage's output depends on: spec, recipe file text, overrides, upstream fingerprints."""
    payload: dict[str, Any] = {"kind": stage.kind, "spec": stage.spec,
                               "upstream": {ref: upstream[ref] for ref in sorted(set(_references(stage.spec)))}}
    if stage.kind in ("train", "presample"):
        recipe = Path(str(stage.spec["recipe"]))
        payload["recipe_text"] = recipe.read_text(errors="replace") if recipe.is_file() else None
        payload["extra_overrides"] = extra
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _recorded_fingerprint(run_dir: Path, stage: Stage) -> str | None:
    try:
        return json.loads((run_dir / STAGE_HASHES / f"{stage.name}.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def _record_fingerprint(run_dir: Path, stage: Stage, fingerprint: str) -> None:
    (run_dir / STAGE_HASHES).mkdir(parents=True, exist_ok=True)
    write_json(run_dir / STAGE_HASHES / f"{stage.name}.json", {"fingerprint": fingerprint})


def run_pipeline(
    path: str | Path, *, from_stage: str | None = None, overrides: list[str] | None = None
) -> list[StageResult]:
    """Run the stages of pipeline `path` in order; see the module docstring."""
    run_dir, stages = parse_pipeline(path)
    names = [s.name for s in stages]
    if from_stage is not None and from_stage not in names:
        hint = nearest(from_stage, names)
        raise RecipeError(f"--from {from_stage}: no such stage in {path}; stages: {names}."
                          + (f" Did you mean '{hint}'?" if hint else ""))
    extra = parse_overrides(overrides or [])
    rerun_from = names.index(from_stage) if from_stage else len(stages)
    outputs: dict[str, Path] = {}
    results: list[StageResult] = []
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprints: dict[str, str] = {}
    for idx, stage in enumerate(stages):
        outputs[stage.name] = stage.out
        stage_extra = extra if stage.kind in ("train", "presample") else {}
        fingerprints[stage.name] = fingerprint = stage_fingerprint(stage, fingerprints, stage_extra)
        recorded = _recorded_fingerprint(run_dir, stage)
        if idx >= rerun_from and stage.out.exists():
            logger.info("stage %s: rerunning (--from %s), removing %s", stage.name, from_stage, stage.out)
            shutil.rmtree(stage.out)
        elif stage.out.exists() and recorded is not None and recorded != fingerprint:
            logger.info("stage %s: its spec, recipe or an upstream stage changed since it ran: rerunning, removing %s",
                        stage.name, stage.out)
            shutil.rmtree(stage.out)
        _record_fingerprint(run_dir, stage, fingerprint)
        if stage_is_complete(stage):
            logger.info("stage %s: complete, skipped", stage.name)
            results.append(StageResult(stage.name, stage.kind, "skipped", 0.0, _previous_metrics(stage)))
            continue
        status = "resumed" if stage.out.exists() else "ran"
        logger.info("stage %s (%s): %s", stage.name, stage.kind, "resuming" if status == "resumed" else "running")
        start = time.time()
        metrics = _run_stage(stage, outputs, stage_extra)
        results.append(StageResult(stage.name, stage.kind, status, round(time.time() - start, 1), metrics))
    write_summary(run_dir, results)
    return results


def write_summary(run_dir: Path, results: list[StageResult]) -> None:
    """Print the summary table and save it as JSON and as a PNG plot of the eval metrics across stages."""
    from rich.console import Console
    from rich.table import Table

    present = {key for r in results for key in r.metrics}
    metric_names = [k for k in HEADLINE_METRICS if k in present]
    metric_names += sorted(k for k in present if k.startswith("pass@") and k not in metric_names)
    metric_names += sorted(k for k in present if k.startswith("kl_to_"))
    table = Table(title=f"fdpo pipeline summary ({run_dir})")
    for col in ["stage", "kind", "status", "time (s)", *metric_names]:
        table.add_column(col, no_wrap=True)
    for r in results:
        cells = [_fmt(r.metrics.get(m)) for m in metric_names]
        table.add_row(r.name, r.kind, r.status, f"{r.wall_time_s:.1f}", *cells)
    total = sum(r.wall_time_s for r in results)
    console = Console()
    needed = Console(width=1000).measure(table).maximum
    if console.width < needed:  # a pipe or a narrow terminal: keep every cell whole rather than squeezed
        console = Console(width=needed)
    console.print(table)
    console.print(f"total wall time: {total:.1f} s")
    payload = {"total_wall_time_s": total, "stages": [r.__dict__ for r in results]}
    write_json(run_dir / SUMMARY_JSON, payload)
    _plot(run_dir / SUMMARY_PNG, results)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _plot(path: Path, results: list[StageResult]) -> None:
    evals = [r for r in results if r.kind == "eval" and r.metrics]
    if not evals:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in evals for k in r.metrics if k.startswith(("pass@", "kl_to_")) or k == "distinct_correct"})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        ax.plot([r.name for r in evals], [r.metrics.get(key, float("nan")) for r in evals], marker="o", label=key)
    ax.set_xlabel("stage")
    ax.set_title("evaluation across pipeline stages")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
