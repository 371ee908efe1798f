"""`run_sweep`: shared stages once, then every cell as its own `fdpo pipeline`, side by side, with a live report.

Everything a sweep runs goes through `fdpo.pipeline` (no second copy of its skip/resume logic):

1. the shared stages, plus one eval stage of the start checkpoint per split, are written as the
   pipeline `run_dir/shared.pipeline.yaml` and run by `run_pipeline` (complete stages skipped);
2. each cell is written as `run_dir/cells/<cell>/recipe.yaml` (the base recipe with its overrides)
   and `cell.yaml` (a pipeline: the train stage, then one eval stage per split, KL to the start),
   and launched as a subprocess `python -m fdpo pipeline cell.yaml` (its output in `cell.log`).
   A complete cell is skipped without starting a process; a partial one resumes from its last
   complete checkpoint (the pipeline's train stage resumes); `--from CELL` deletes that cell and
   every later one first. With `launcher.accelerate_config`, a cell's training is launched as a
   single run is, `accelerate launch --config_file FILE -m fdpo train recipe.yaml --resume`, before
   its pipeline (which then only evaluates);
3. after every finished cell the report (`fdpo.sweep.report`) is rewritten from what is complete,
   so it can be read while the others run; progress lines name the running cells and how many are left.

Launchers: `local` (default; `--jobs N` cells at once) and `submitit` (optional extra `fdpo[sweep]`:
each cell becomes one submitit job running the same commands; `cluster: local` runs them as local
processes, `cluster: slurm` submits them to SLURM with the `slurm:` parameters).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fdpo.errors import RecipeError, nearest
from fdpo.pipeline import run_pipeline
from fdpo.recipe.load import load_recipe, read_yaml
from fdpo.sweep.report import write_report
from fdpo.sweep.spec import (
    CELL_PIPELINE,
    START_ROW,
    Cell,
    SweepSpec,
    cell_is_complete,
    eval_splits,
    parse_sweep,
    resolve_shared,
)

logger = logging.getLogger("fdpo")

SHARED_PIPELINE = "shared.pipeline.yaml"
CELL_RECIPE = "recipe.yaml"
CELL_LOG = "cell.log"


def _eval_stage(spec: SweepSpec, name: str, checkpoint: Any, split: str, kl_to: dict[str, Any] | None) -> dict:
    ev = spec.eval
    num_samples = int(ev.get("num_samples", 64))
    stage = {
        "name": name,
        "kind": "eval",
        "checkpoint": checkpoint,
        "task": ev.get("task", "sum_pairs"),
        "split": split,
        "ks": list(ev.get("ks", [1, num_samples])),
        "num_samples": num_samples,
        "num_prompts": ev.get("num_prompts", 64),
        "temperature": ev.get("temperature", 1.0),
        "seed": ev.get("seed", 1234),
    }
    if ev.get("max_new_tokens") is not None:
        stage["max_new_tokens"] = ev["max_new_tokens"]
    if kl_to:
        stage["kl_to"] = kl_to
    return stage


def _write_if_changed(path: Path, text: str, *, what: str, fix: str) -> None:
    """Write `text` to `path`; a different existing file is an error (a changed sweep over old results)."""
    if path.is_file() and path.read_text() != text:
        raise RecipeError(f"{path} exists with different contents: the sweep's {what} changed since it ran. {fix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def shared_pipeline(spec: SweepSpec) -> Path:
    """Write the shared stages (and the start checkpoint's evals) as a pipeline recipe; returns its path."""
    stages = list(spec.shared)
    if spec.start is not None:
        for split in eval_splits(spec):
            stages.append(_eval_stage(spec, f"eval_{START_ROW}_{split}", spec.start, split, None))
    payload = {"description": "shared stages of a sweep", "run_dir": str(spec.shared_dir),
               "stages": stages}
    path = spec.run_dir / SHARED_PIPELINE
    _write_if_changed(path, yaml.safe_dump(payload, sort_keys=False), what="shared stages or evaluation",
                      fix=f"Choose a new run_dir, or delete {spec.run_dir} to start over.")
    return path


def cell_files(spec: SweepSpec, cell: Cell) -> tuple[Path, Path]:
    """Write (recipe.yaml, cell.yaml) of `cell`; returns their paths (validated by `load_recipe`)."""
    folder = spec.cell_dir(cell)
    overrides = resolve_shared(cell.overrides, spec)
    recipe = {**read_yaml(spec.base_recipe), **overrides, "output_dir": str(folder / "train")}
    text = f"# sweep cell {cell.name} (base: {spec.base_recipe})\n" + yaml.safe_dump(recipe, sort_keys=False)
    recipe_path = folder / CELL_RECIPE
    fix = (f"Rerun it with `fdpo sweep {spec.path} --from {cell.name}` (deletes it and the later cells) "
           "or choose a new run_dir.")
    _write_if_changed(recipe_path, text, what=f"recipe of cell {cell.name}", fix=fix)
    load_recipe(recipe_path)  # every key checked now, before anything runs
    kl_to = {START_ROW: resolve_shared(spec.start, spec)} if spec.start is not None else None
    stages = [{"name": "train", "kind": "train", "recipe": str(recipe_path)}]
    stages += [_eval_stage(spec, f"eval_{split}", {"from_stage": "train"}, split, kl_to) for split in eval_splits(spec)]
    pipeline = {"description": f"sweep cell {cell.name}", "run_dir": str(folder), "stages": stages}
    pipeline_path = folder / CELL_PIPELINE
    _write_if_changed(pipeline_path, yaml.safe_dump(pipeline, sort_keys=False), what=f"evaluation of cell {cell.name}",
                      fix=fix)
    return recipe_path, pipeline_path


def cell_commands(spec: SweepSpec, cell: Cell) -> list[list[str]]:
    """The commands that run `cell` (see the module docstring); run in order, in the current directory."""
    recipe_path, pipeline_path = cell_files(spec, cell)
    commands = []
    config = spec.launcher.get("accelerate_config")
    if config:
        commands.append([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                         "-m", "fdpo", "train", str(recipe_path), "--resume"])
    commands.append([sys.executable, "-m", "fdpo", "pipeline", str(pipeline_path)])
    return commands


def run_commands(commands: list[list[str]], log_path: str) -> int:
    """Run `commands` one after the other, output appended to `log_path`; the first non-zero code stops them."""
    with open(log_path, "a", encoding="utf-8") as log:
        for cmd in commands:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            if code != 0:
                return code
    return 0


@dataclass
class _Running:
    cell: Cell
    handle: Any
    started: float


class _LocalLauncher:
    """Each cell as a child process running its commands through `run_commands` (Ctrl-C stops it too)."""

    def start(self, commands: list[list[str]], log_path: Path) -> Any:
        return subprocess.Popen([sys.executable, "-c", "import sys, json; from fdpo.sweep.run import run_commands; "
                                 "sys.exit(run_commands(json.loads(sys.argv[1]), sys.argv[2]))",
                                 _json(commands), str(log_path)])

    def poll(self, handle: Any) -> int | None:
        return handle.poll()


class _SubmititLauncher:
    """Each cell as one submitit job (local processes or SLURM) running the same commands."""

    def __init__(self, spec: SweepSpec) -> None:
        try:
            import submitit  # optional extra: fdpo[sweep]
        except ImportError as exc:
            raise RecipeError(f"{spec.path}: launcher kind 'submitit' needs the optional extra: "
                              "pip install 'fdpo[sweep]' (or pip install submitit).") from exc
        opts = spec.launcher
        folder = Path(opts.get("folder") or spec.run_dir / "submitit")
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=opts.get("cluster", "local"))
        params = {"timeout_min": int(opts.get("timeout_min", 60))}
        if opts.get("slurm"):
            params.update({f"slurm_{k}": v for k, v in dict(opts["slurm"]).items()})
        self.executor.update_parameters(**params)

    def start(self, commands: list[list[str]], log_path: Path) -> Any:
        return self.executor.submit(run_commands, commands, str(log_path))

    def poll(self, handle: Any) -> int | None:
        if not handle.done():
            return None
        try:
            return int(handle.result())
        except Exception as exc:  # a failed job is reported, the sweep goes on
            logger.error("submitit job %s failed: %s", handle.job_id, exc)
            return 1


def _json(value: Any) -> str:
    import json  # local: only the child-process argument needs it

    return json.dumps(value)


def plan(spec: SweepSpec, from_cell: str | None = None) -> list[tuple[Cell, str]]:
    """(cell, what will happen: 'skip' | 'resume' | 'run' | 'rerun') for every cell, in order."""
    cells = spec.cells()
    names = [c.name for c in cells]
    if from_cell is not None and from_cell not in names:
        hint = nearest(from_cell, names)
        raise RecipeError(f"--from {from_cell}: no such cell in {spec.path}." + (f" Did you mean '{hint}'?" if hint
                                                                                 else f" Cells: {names}."))
    first = names.index(from_cell) if from_cell else len(cells)
    out = []
    for i, cell in enumerate(cells):
        folder = spec.cell_dir(cell)
        if i >= first and folder.exists():
            out.append((cell, "rerun"))
        elif cell_is_complete(spec, cell):
            out.append((cell, "skip"))
        elif (folder / "train").exists():
            out.append((cell, "resume"))
        else:
            out.append((cell, "run"))
    return out


def print_plan(spec: SweepSpec, steps: list[tuple[Cell, str]]) -> None:
    todo = sum(1 for _, what in steps if what != "skip")
    print(f"sweep {spec.path}: {len(steps)} cells ({len(spec.groups())} methods × {len(spec.seeds)} seeds), "
          f"{todo} to run, run_dir {spec.run_dir}")
    shared = [s["name"] for s in spec.shared]
    print(f"  shared stages (run once, skipped when complete): {', '.join(shared) or '-'}"
          + (f"; start = {spec.start}" if spec.start is not None else ""))
    for cell, what in steps:
        print(f"  {what:>6}  {cell.name:<48} {spec.cell_dir(cell)}")


def run_sweep(path: str | Path, *, jobs: int = 1, dry_run: bool = False, from_cell: str | None = None,
              poll_s: float = 2.0) -> dict[str, Any] | None:
    """Run the sweep at `path` (module docstring); returns the report dict (None for a dry run)."""
    spec = parse_sweep(path)
    if jobs < 1:
        raise RecipeError(f"--jobs must be at least 1, got {jobs}.")
    steps = plan(spec, from_cell)
    if dry_run:
        for cell, _ in steps:
            cell_files_preview(spec, cell)
        print_plan(spec, steps)
        return None
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    for cell, what in steps:
        if what == "rerun":
            shutil.rmtree(spec.cell_dir(cell))
    print_plan(spec, steps)
    start = time.time()
    for cell, _ in steps:  # every cell's files, finished ones too: a changed sweep is caught before anything runs
        cell_files(spec, cell)
    run_pipeline(shared_pipeline(spec))
    queue = [cell for cell, what in steps if what != "skip"]
    launcher = _SubmititLauncher(spec) if spec.launcher.get("kind") == "submitit" else _LocalLauncher()
    running: list[_Running] = []
    failed: list[str] = []
    total = len(queue)
    write_report(spec)
    while queue or running:
        while queue and len(running) < jobs:
            cell = queue.pop(0)
            commands = cell_commands(spec, cell)
            log_path = spec.cell_dir(cell) / CELL_LOG
            running.append(_Running(cell, launcher.start(commands, log_path), time.time()))
            _progress(running, queue, total, failed)
        time.sleep(poll_s if running else 0)
        for item in list(running):
            code = launcher.poll(item.handle)
            if code is None:
                continue
            running.remove(item)
            took = time.time() - item.started
            if code != 0:
                failed.append(item.cell.name)
                print(f"[sweep] cell {item.cell.name} FAILED (exit {code}) after {took:.0f} s; "
                      f"see {spec.cell_dir(item.cell) / CELL_LOG}", flush=True)
            else:
                print(f"[sweep] cell {item.cell.name} done in {took:.0f} s", flush=True)
            write_report(spec)
            _progress(running, queue, total, failed)
    report = write_report(spec)
    print(f"[sweep] finished in {time.time() - start:.0f} s; report: {spec.run_dir / 'report' / 'report.md'}")
    if failed:
        raise RecipeError(f"{len(failed)} cell(s) failed: {', '.join(failed)}; their logs are in "
                          f"{spec.run_dir / 'cells'}/<cell>/{CELL_LOG}. Rerun the sweep to resume them.")
    return report


def cell_files_preview(spec: SweepSpec, cell: Cell) -> None:
    """Validate a cell's recipe without writing anything (for --dry-run)."""
    overrides = resolve_shared(cell.overrides, spec)
    overrides["output_dir"] = str(spec.cell_dir(cell) / "train")
    load_recipe(spec.base_recipe, overrides)


def _progress(running: list[_Running], queue: list[Cell], total: int, failed: list[str]) -> None:
    done = total - len(queue) - len(running)
    names = ", ".join(f"{r.cell.name} ({time.time() - r.started:.0f} s)" for r in running) or "-"
    print(f"[sweep] running: {names} | done {done}/{total}, left {len(queue) + len(running)}"
          + (f", failed {len(failed)}" if failed else ""), flush=True)

