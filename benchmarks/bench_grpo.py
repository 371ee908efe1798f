"""GRPO step time and peak memory: FGRPOTrainer vs TRL's GRPOTrainer, and DPH-RL rehearsal vs an online reference.

    python benchmarks/bench_grpo.py                  # `base`: random Llama (hidden 512, 8 layers), tiny tokenizer
    python benchmarks/bench_grpo.py --configs base,long  # + `long`: 12 layers, ~64-word context, 32 new tokens
    python benchmarks/bench_grpo.py --quick          # the tiny model itself, about a minute
    python benchmarks/bench_grpo.py --model DIR      # any local causal LM directory

Variants, same data / seed / batch / completion length / learning rate (same settings):

- ``trl``:   trl.GRPOTrainer, ``beta = η`` (reverse KL, k3 × importance ratio: TRL's default), reference model.
- ``fdpo``:  FGRPOTrainer, ``divergence: reverse_kl``, ``divergence_coef: η``, ``estimator: k3_ratio`` (the same
             objective; the tests check the losses and weights agree with ``trl``).
- ``dph``:   FGRPOTrainer, no KL (``divergence_coef: 0``) + DPH-RL forward-KL rehearsal on stored π_ref samples
             (``rehearsal_ratio`` 0.125: 1 stored sample per 8 rollouts), NO reference model. The store is
             written once by ``fdpo presample`` before timing (not timed).

Each (round, variant) runs in a fresh subprocess, variants interleaved round by round (so drifting load on a
shared machine hits all of them alike).

Step time: the wall time of each optimizer step (a callback from ``on_step_begin`` to ``on_step_end``:
generation, reference pass, loss, backward AND the optimizer step; TRL's own ``step_time`` leaves the optimizer
out) over the steps after the first, median over rounds. The step is split by timing the trainer's methods from
this script only (the trainer code is not changed):

- ``sample``: ``_generate`` (the rollouts' decoding);
- ``ref``:    the reference model's log-prob pass (``_get_per_token_logps_and_entropies`` on ``ref_model``);
- ``score``:  the rest of ``_generate_and_score_completions`` (rewards, advantages, padding);
- ``loss``:   ``_compute_loss`` (the policy forward; for ``dph`` also the rehearsal forward, shown as ``reh``);
- ``bwd+opt``: the rest of the step (backward of everything, gradient clipping, optimizer step).

So ``dph / fdpo`` of the whole step is 1 − (ref − rehearsal forward and backward) / step: what DPH-RL removes is
the reference pass alone, and the whole-step ratio depends on how much of the step the generation takes.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``. On CPU, allocator-exact: one more run per variant
(``--mem-steps`` steps) under ``torch.profiler.profile(profile_memory=True)`` from BEFORE the model is loaded to
the end of training; the running sum of every allocation/free of torch's CPU allocator gives the peak of live
tensor bytes (model weights, reference model, gradients, optimizer state, activations, generation caches)
exactly (``fdpo.divergences.profiling``'s method). The peak is deterministic, so one run suffices. The table
also gives the bytes of the reference model's parameters and buffers (``ref MB``), so "DPH-RL holds one model
copy less" is checkable: ``fdpo − dph`` peak against ``ref MB``. (It is one copy because FGRPOTrainer runs the
rehearsal forward before the policy forward, so the backward does not allocate every parameter's gradient while
the policy's activations are alive; in the opposite order the DPH-RL peak was as high as the online-reference one.)

Why ``dph / fdpo`` ≤ 0.85 is hard on the whole step: DPH-RL removes one no-grad forward over the B rollouts (≈ F)
and adds a forward + backward over ρ·B stored samples (≈ 3ρF, ρ = 0.125); the policy's forward + backward is ≈ 3F.
Even with free generation and optimizer the ratio is ≈ (3F + 3ρF) / (4F) ≈ 0.84; every second of generation or
optimizer step moves it towards 1. The table states the generation share and the best ratio at the measured
generation time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = ("trl", "fdpo", "dph")


def hash_reward(prompts, completions, **kwargs):
    """Deterministic 0/1 reward (crc32 parity of the text): ~half correct for any model, so advantages are non-zero."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(float(zlib.crc32(text.encode()) % 2))
    return out


def _tensor_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (each storage once: tied weights count once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class _Timers:
    """Wall time of trainer methods (wrapped on the instance, from this script only) and of whole steps."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self._t0 = 0.0
        self.prompt_width = 0
        self.completion_width = 0

    def wrap(self, obj, name: str, key: str, when=None) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            if when is not None and not when(*args, **kwargs):
                return inner(*args, **kwargs)
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.acc[key] = self.acc.get(key, 0.0) + time.perf_counter() - t

        setattr(obj, name, timed)

    def callback(self):
        from transformers import TrainerCallback

        timers = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timers.acc = {}
                timers._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timers.steps.append({"step": time.perf_counter() - timers._t0, **timers.acc})

        return StepTimer()


def child(variant: str, ns: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(ns.threads)
    cuda = torch.cuda.is_available()
    memory_run = ns.measure == "memory"
    prof = None
    if memory_run and not cuda:
        from fdpo.divergences.profiling import cpu_memory_profile

        profiling = cpu_memory_profile()  # kineto's start/stop lines kept off the table
        prof = profiling.__enter__()  # before the model (and the reference model) is allocated
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from fdpo.trainers.grpo_trainer import FGRPOConfig, FGRPOTrainer

    data = load_dataset("json", data_files=ns.data, split="train")
    common = dict(
        output_dir=str(Path(ns.work) / f"out_{variant}"),
        max_steps=ns.mem_steps if memory_run else ns.steps,
        per_device_train_batch_size=ns.batch,
        num_generations=ns.generations,
        max_completion_length=ns.completion,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        bf16=cuda,
        use_cpu=not cuda,
    )
    if variant == "trl":
        cls, tcls, kw = GRPOConfig, GRPOTrainer, dict(beta=ns.eta)
    elif variant == "fdpo":
        cls, tcls, kw = FGRPOConfig, FGRPOTrainer, dict(divergence_coef=ns.eta, estimator="k3_ratio")
    else:
        cls, tcls, kw = FGRPOConfig, FGRPOTrainer, dict(
            divergence_coef=0.0, rehearsal_file=ns.store, rehearsal_divergence="forward_kl", rehearsal_coef=0.05,
            rehearsal_ratio=0.125, rehearsal_train_on_exp=False,
        )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    model = AutoModelForCausalLM.from_pretrained(ns.model, dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        model = model.cuda()
    trainer = tcls(
        model=model, reward_funcs=[hash_reward], args=cls(**common, **kw), train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(ns.model),
    )
    timers = _Timers()
    if not memory_run:
        ref = getattr(trainer, "ref_model", None)
        timers.wrap(trainer, "_generate", "sample")
        timers.wrap(trainer, "_get_per_token_logps_and_entropies", "ref", when=lambda m, *a, **k: m is ref)
        gen_and_score = trainer._generate_and_score_completions

        def gen_and_score_widths(inputs):
            out = gen_and_score(inputs)
            timers.prompt_width, timers.completion_width = out["prompt_ids"].size(1), out["completion_ids"].size(1)
            return out

        trainer._generate_and_score_completions = gen_and_score_widths
        timers.wrap(trainer, "_generate_and_score_completions", "gen_total")
        timers.wrap(trainer, "_compute_loss", "loss")
        if variant == "dph":
            timers.wrap(trainer, "_rehearsal_term", "reh")
        trainer.add_callback(timers.callback())
    trainer.train()
    ref_model = getattr(trainer, "ref_model", None)
    out = {
        "variant": variant,
        "ref_model": ref_model is not None,
        "ref_mb": (_tensor_bytes(ref_model) if ref_model is not None else 0) / 2**20,
        "model_mb": _tensor_bytes(trainer.model) / 2**20,
        "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    if memory_run:
        if cuda:
            out["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            from fdpo.divergences.profiling import allocator_trace_peak

            profiling.__exit__(None, None, None)
            peak, final = allocator_trace_peak(prof)
            out["peak_mb"], out["held_mb"] = peak / 2**20, final / 2**20
        return out
    steps = timers.steps[1:]  # the first step pays one-off costs (allocator warm-up, lazy init)
    parts = {k: statistics.mean(s.get(k, 0.0) for s in steps) for k in ("step", "sample", "ref", "gen_total", "loss", "reh")}
    out.update(
        step_time=parts["step"], sample=parts["sample"], ref=parts["ref"],
        score=parts["gen_total"] - parts["sample"] - parts["ref"], loss=parts["loss"], reh=parts["reh"],
        bwd_opt=parts["step"] - parts["gen_total"] - parts["loss"],
        trl_step_time=statistics.mean(h["step_time"] for h in trainer.state.log_history if "step_time" in h),
        prompt_width=timers.prompt_width, completion_width=timers.completion_width,
    )
    return out


def build_random_model(tiny_dir: Path, out: Path, hidden: int, layers: int) -> Path:
    """A randomly initialised Llama of the given size with the tiny model's tokenizer (no download)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_dir)
    cfg.hidden_size, cfg.num_hidden_layers = hidden, layers
    cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 3 * hidden, hidden // 64, hidden // 64
    cfg.head_dim = 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def make_store(ns: argparse.Namespace) -> str:
    """`fdpo presample` on the benchmark data (the hash reward, pef_threshold 0.5): the DPH-RL store."""
    from fdpo.recipe.presample import presample_recipe

    recipe = Path(ns.work) / "presample.yaml"
    recipe.write_text(
        f"trainer: grpo\nmodel_name_or_path: {ns.model}\ndataset_name: {ns.data}\noutput_dir: {ns.work}/store\n"
        f"reward_funcs: ['bench_grpo:hash_reward']\npresample_n: 4\npef_threshold: 0.5\n"
        f"max_completion_length: {ns.completion}\nnum_generations: {ns.generations}\n"
        f"per_device_train_batch_size: {ns.batch}\n"
    )
    sys.path.insert(0, str(HERE))
    manifest = presample_recipe(recipe)
    return manifest["out_dir"]


#: benchmark settings; ``base`` is the default (a few minutes on one CPU thread), ``long`` is closer to the regime
#: where the reference pass matters: a longer prompt (context before the question), longer completions, more layers.
CONFIGS = {
    "base": dict(hidden=512, layers=8, completion=16, prompt_words=0),
    "long": dict(hidden=512, layers=12, completion=32, prompt_words=64),
}


def write_data(path: Path, ns: argparse.Namespace) -> None:
    """The sum_pairs RL prompts; with ``prompt_words`` > 0 each is preceded by a context of about that many words."""
    from fdpo.data.tasks import build_rows, write_jsonl

    rows = build_rows("sum_pairs", "rl", seed=0, size=ns.prompts)
    if ns.prompt_words:
        sentence = ["Split", "{n}", "into", "two", "numbers."]
        for i, row in enumerate(rows):
            words = [sentence[j % 5].format(n=(i + j // 5) % 9 + 1) for j in range(ns.prompt_words)]
            row["prompt"][-1]["content"] = " ".join(words) + " " + row["prompt"][-1]["content"]
    write_jsonl(path, rows)


def run_config(name: str, ns: argparse.Namespace, tiny: Path) -> dict:
    """Presample, then interleaved timing rounds and one allocator-exact memory run per variant."""
    work = Path(ns.work) / name
    work.mkdir(parents=True, exist_ok=True)
    cfg = argparse.Namespace(**vars(ns))
    cfg.work = str(work)
    if ns.model is None:
        cfg.model = str(tiny if ns.quick else build_random_model(tiny, work / "random", cfg.hidden, cfg.layers))
    cfg.data = str(work / "rl.jsonl")
    write_data(Path(cfg.data), cfg)
    cfg.store = make_store(cfg)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(ns.threads), "TQDM_DISABLE": "1"}

    def launch(v: str, measure: str) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", v, "--measure", measure, "--work", cfg.work,
               "--data", cfg.data, "--store", cfg.store, "--model", cfg.model, "--steps", str(cfg.steps),
               "--mem-steps", str(cfg.mem_steps), "--batch", str(cfg.batch), "--generations", str(cfg.generations),
               "--completion", str(cfg.completion), "--eta", str(cfg.eta), "--threads", str(cfg.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"[{name}] variant {v} ({measure}) failed:\n{out.stderr[-3000:]}")
        res = json.loads(line[7:])
        print(f"[{name}] {measure} {v}: {res}", file=sys.stderr, flush=True)
        return res

    timing: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(ns.rounds):
        for v in VARIANTS:
            timing[v].append(launch(v, "time"))
    memory = {v: launch(v, "memory") for v in VARIANTS}
    keys = ("step_time", "sample", "ref", "score", "loss", "reh", "bwd_opt")
    med = {v: {k: statistics.median(x[k] for x in timing[v]) for k in keys} for v in VARIANTS}
    for v in VARIANTS:
        med[v].update(peak_mb=memory[v]["peak_mb"], ref_mb=memory[v]["ref_mb"], ref_model=memory[v]["ref_model"])
    return {"name": name, "cfg": cfg, "med": med, "info": {**memory["trl"], **timing["trl"][0]}}


def report(res: dict) -> None:
    cfg, med, info = res["cfg"], res["med"], res["info"]
    print(f"\n[{res['name']}] model {Path(cfg.model).name} ({info['params_m']:.1f}M params, {info['model_mb']:.1f} MB), "
          f"{cfg.layers if cfg.model.endswith('random') else '-'} layers, batch {cfg.batch} "
          f"({cfg.batch // cfg.generations} prompts × {cfg.generations}), prompt width {info['prompt_width']}, "
          f"completion width {info['completion_width']} (max {cfg.completion}), {cfg.steps} steps × {cfg.rounds} rounds "
          f"(median), memory over {cfg.mem_steps} steps, η = {cfg.eta}, {cfg.threads} thread(s), {info['device']}")
    cols = ("step_time", "sample", "ref", "score", "loss", "reh", "bwd_opt")
    head = ("step s", "sample", "ref", "score", "loss", "(reh)", "bwd+opt")
    print(f"{'variant':<8}" + "".join(f"{h:>9}" for h in head) + f"{'peak MB':>10}{'ref MB':>9}")
    for v in VARIANTS:
        m = med[v]
        print(f"{v:<8}" + "".join(f"{m[c]:>9.3f}" for c in cols) + f"{m['peak_mb']:>10.1f}{m['ref_mb']:>9.1f}")
    f, d, t = med["fdpo"], med["dph"], med["trl"]
    print(f"fdpo / trl   step {f['step_time'] / t['step_time']:.3f}x (target ≤ 1.05)   "
          f"non-generation {(f['step_time'] - f['sample']) / (t['step_time'] - t['sample']):.3f}x   "
          f"peak memory {f['peak_mb'] / t['peak_mb']:.3f}x")
    non_gen_f, non_gen_d = f["step_time"] - f["sample"], d["step_time"] - d["sample"]
    print(f"dph / fdpo   step {d['step_time'] / f['step_time']:.3f}x (target ≤ 0.85)   "
          f"non-generation {non_gen_d / non_gen_f:.3f}x   generation share of the fdpo step "
          f"{f['sample'] / f['step_time']:.0%}, reference pass {f['ref'] / f['step_time']:.0%}")
    reh_cost = non_gen_d - (non_gen_f - f["ref"])
    print(f"dph step     removes the reference pass ({f['ref']:.3f} s), adds the rehearsal (forward + backward "
          f"≈ {reh_cost:.3f} s): best possible whole-step ratio with this generation time "
          f"{1 - f['ref'] / f['step_time']:.3f}x, without the rehearsal")
    print(f"dph memory   peak {d['peak_mb'] / f['peak_mb']:.3f}x, saves {f['peak_mb'] - d['peak_mb']:.1f} MB; "
          f"the reference model holds {f['ref_mb']:.1f} MB (saved / ref model = "
          f"{(f['peak_mb'] - d['peak_mb']) / max(f['ref_mb'], 1e-9):.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model dir (default: random Llama built from the tiny model)")
    p.add_argument("--configs", default="base", help=f"comma-separated settings from {sorted(CONFIGS)} (default base)")
    p.add_argument("--hidden", type=int, default=None, help="override the config's hidden size")
    p.add_argument("--layers", type=int, default=None, help="override the config's number of layers")
    p.add_argument("--completion", type=int, default=None, help="override the config's max completion length")
    p.add_argument("--prompt-words", type=int, default=None, help="override the config's context words per prompt")
    p.add_argument("--quick", action="store_true", help="the tiny model, fewer steps")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--mem-steps", type=int, default=2, help="steps of the allocator-exact memory run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--eta", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=VARIANTS, default=None)
    p.add_argument("--measure", choices=("time", "memory"), default="time")
    p.add_argument("--work", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--store", default=None)
    ns = p.parse_args()
    if ns.child:
        print("RESULT " + json.dumps(child(ns.child, ns)), flush=True)
        return

    from fdpo.models.tiny import build_tiny_model

    ns.work = str(Path(ns.work or tempfile.mkdtemp(prefix="bench_grpo_")))
    tiny = build_tiny_model(Path(ns.work) / "tiny", arch="llama", seed=0, task="sum_pairs")
    if ns.quick:
        ns.steps, ns.rounds = min(ns.steps, 4), min(ns.rounds, 2)
    results = []
    for name in ns.configs.split(","):
        if name not in CONFIGS:
            sys.exit(f"--configs: unknown setting {name!r}; choose from {sorted(CONFIGS)}")
        cfg = argparse.Namespace(**vars(ns))
        for key, value in CONFIGS[name].items():
            if getattr(ns, key) is None:
                setattr(cfg, key, value)
        results.append(run_config(name, cfg, tiny))
    print("\nGRPO benchmark (seconds per optimizer step; peak MB = torch allocator peak from before model load; "
          "ref MB = reference model parameters + buffers)")
    for res in results:
        report(res)


if __name__ == "__main__":
    main()
