"""The `fdpo` command line.

    fdpo train RECIPE [--resume] [--key value ...]   train one recipe (also under `accelerate launch -m fdpo`)
    fdpo pipeline RECIPE [--from STAGE]              run a multi-stage recipe (tiny → data → sft → … → eval)
    fdpo sweep SWEEP [--jobs N] [--dry-run] [--from CELL]   a grid of overrides × seeds, report with intervals
    fdpo presample RECIPE [--key value ...]          DPH-RL: sample the initial policy, split D_pef/D_exp, store log π_ref
    fdpo eval CHECKPOINT --task TASK -k 1,4,16       pass@k, mean reward and diversity of a checkpoint
    fdpo tiny OUT_DIR                                build the offline tiny model + tokenizer
    fdpo data TASK OUT_DIR                           write a synthetic task's data for every stage
    fdpo divergences                                 the registry of divergences as a table
    fdpo keys TRAINER                                every valid recipe key of a trainer, with help

A mistake in a recipe, data file, model directory or command line is reported in one message naming
the place and the fix, with exit code 2 and no traceback; `--debug` (or FDPO_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fdpo.errors import RecipeError, UserError


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from fdpo.recipe import load_recipe, parse_overrides
    from fdpo.train import end_distributed, run_training, use_cpu_backend_if_no_gpu

    use_cpu_backend_if_no_gpu()
    recipe = load_recipe(args.recipe, parse_overrides(extra))
    metrics = run_training(recipe, resume=args.resume, overwrite=args.overwrite)
    end_distributed()
    done = "was already complete at" if metrics.get("already_complete") else "trained for"
    print(f"fdpo: {recipe.path} {done} {metrics['global_step']} steps → {recipe.training_args.output_dir}")
    return 0


def _cmd_pipeline(args: argparse.Namespace, extra: list[str]) -> int:
    from fdpo.pipeline import run_pipeline

    run_pipeline(args.recipe, from_stage=args.from_stage, overrides=extra)
    return 0


def _cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from fdpo.sweep import run_sweep

    run_sweep(args.sweep, jobs=args.jobs, dry_run=args.dry_run, from_cell=args.from_cell)
    return 0


def _cmd_presample(args: argparse.Namespace, extra: list[str]) -> int:
    from fdpo.recipe import parse_overrides, presample_recipe

    manifest = presample_recipe(args.recipe, parse_overrides(extra))
    c = manifest["counts"]
    print(
        f"fdpo: presampled {c['prompts']} prompts × {manifest['generation']['n']}: D_pef {c['d_pef_prompts']} prompts "
        f"({100 * manifest['frac_pef']:.1f}%; {c['d_pef']} rows), D_exp {c['d_exp_prompts']} prompts ({c['d_exp']} rows), "
        f"{c['stored_samples']} rehearsal samples → "
        f"{manifest['out_dir']}"
    )
    return 0


def _cmd_tiny(args: argparse.Namespace, extra: list[str]) -> int:
    from fdpo.models.tiny import build_tiny_model

    path = build_tiny_model(args.out_dir, arch=args.arch, seed=args.seed, task=args.task)
    print(f"fdpo: tiny {args.arch} model and tokenizer saved to {path}")
    return 0


def _cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    from fdpo.data.tasks import write_task_data

    files = write_task_data(args.task, args.out_dir, seed=args.seed)
    for kind, path in files.items():
        print(f"{kind:>12}: {path}")
    return 0


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise RecipeError(f"command line: -k {text!r}: expected comma-separated positive integers, e.g. -k 1,4,16.")
    return ks


def _check_eval_args(args: argparse.Namespace) -> None:
    """Refuse meaningless `fdpo eval` values before any model loads (each names its flag)."""
    for flag, value in (("--num-samples", args.num_samples), ("--num-prompts", args.num_prompts),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise RecipeError(f"command line: {flag} {value}: must be ≥ 1.")
    if not args.temperature >= 0:  # also catches NaN
        raise RecipeError(
            f"command line: --temperature {args.temperature}: must be ≥ 0 (0 samples greedily, 1.0 is the default)."
        )


def _cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from fdpo.eval import evaluate_checkpoint, render_eval_table
    from fdpo.models.checks import check_model_dir

    ks = _parse_ks(args.k)
    _check_eval_args(args)
    check_model_dir(args.checkpoint, where="command line: CHECKPOINT")
    if args.data is not None:
        from fdpo.data.loading import check_local_file

        check_local_file(args.data, key="command line: --data")
    result = evaluate_checkpoint(
        args.checkpoint,
        task=args.task,
        ks=ks,
        num_samples=max(args.num_samples, max(ks)),
        num_prompts=args.num_prompts,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        out_json=args.out,
        data_file=args.data,
        split=args.split,
    )
    render_eval_table(result)
    return 0


def _cmd_divergences(args: argparse.Namespace, extra: list[str]) -> int:
    from fdpo.divergences import print_divergence_table

    print_divergence_table()
    return 0


def _cmd_keys(args: argparse.Namespace, extra: list[str]) -> int:
    from fdpo.recipe import all_keys

    for key, help_text in sorted(all_keys(args.trainer).items()):
        print(f"{key:40s} {help_text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdpo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also FDPO_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one recipe; extra --key value pairs override recipe keys")
    p.add_argument("recipe")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="delete what output_dir holds (another run's files) and start fresh"
    )
    p.set_defaults(func=_cmd_train, allow_extra=True)

    p = sub.add_parser("pipeline", help="run the stages of a pipeline recipe in order")
    p.add_argument("recipe")
    p.add_argument("--from", dest="from_stage", default=None, help="rerun from this stage on")
    p.set_defaults(func=_cmd_pipeline, allow_extra=True)

    p = sub.add_parser("sweep", help="run a sweep: shared stages once, then every cell (method × grid × seed), "
                       "then the report (run_dir/report/report.md)")
    p.add_argument("sweep")
    p.add_argument("--jobs", type=int, default=1, help="cells run side by side on this machine (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and what would run; run nothing")
    p.add_argument("--from", dest="from_cell", default=None, help="rerun this cell and every later one")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "presample",
        help="DPH-RL: sample the recipe's initial policy n times per training prompt, split D_pef/D_exp, "
        "store the correct D_pef samples with log π_ref (extra --key value pairs override recipe keys)",
    )
    p.add_argument("recipe")
    p.set_defaults(func=_cmd_presample, allow_extra=True)

    p = sub.add_parser("tiny", help="build the offline tiny model and tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="sum_pairs")
    p.set_defaults(func=_cmd_tiny)

    p = sub.add_parser("data", help="write a synthetic task's data files (SFT, preference, negatives, RL, eval)")
    p.add_argument("task")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("eval", help="pass@k, mean reward and diversity of a checkpoint on a task")
    p.add_argument("checkpoint")
    p.add_argument("--task", default="sum_pairs")
    p.add_argument("-k", default="1,4,16", help="comma-separated k values for pass@k")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="eval prompts (JSONL); default: the task's held-out prompts")
    p.add_argument("--split", default="eval", choices=["eval", "ood"],
                   help="without --data: the task's held-out prompts (eval) or out-of-distribution ones (ood)")
    p.add_argument("--out", default=None, help="JSON output path (default: CHECKPOINT/eval_TASK.json)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("divergences", help="list the registered divergences")
    p.set_defaults(func=_cmd_divergences)

    p = sub.add_parser("keys", help="list every valid recipe key of a trainer")
    p.add_argument("trainer")
    p.set_defaults(func=_cmd_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # `fdpo train R --debug` as well as `fdpo --debug train R`
        extra = [e for e in extra if e != "--debug"]
        args.debug = True
    if extra and not getattr(args, "allow_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get("FDPO_DEBUG", "") not in ("", "0")
    try:
        code = args.func(args, extra)
    except UserError as exc:
        if debug:
            raise
        print(f"fdpo: error: {exc}", file=sys.stderr)
        code = 2
    if __name__ == "__main__" or argv is None:
        sys.exit(code)
    return code
