"""Full-vocabulary divergence: fdpo's chunked paths vs naive one-shot log_softmax vs TRL 1.16.

    python benchmarks/bench_divergences.py            # logits (4, 512, 32000) fp32, hidden 256
    python benchmarks/bench_divergences.py --quick    # small shapes, seconds
    python benchmarks/bench_divergences.py --batch 2 --seq 256 --vocab 32000 --reps 3

Part 1 (from logits): forward + backward of Σ_positions D_f(π‖π_ref) with the policy logits
requiring grad, for reverse KL, forward KL and JS: ``fdpo`` = :func:`full_vocab_divergence`,
``naive`` = log_softmax of both full tensors and the per-token formula, autograd for the rest.
Part 2 (from hidden states, lm_head vocab × hidden): ``fdpo`` = the fused
:func:`full_vocab_divergence_from_hidden` returning per-position values (gradients recomputed in
backward, like TRL), ``fdpo-sum`` = the same with ``reduction="sum"`` (gradients computed in the
forward pass, for a loss that is a weighted sum), ``naive`` = materialise both logits then as above,
``trl`` = ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (beta 1 = reverse KL,
0 = forward KL, 0.5 = JS) with CPU-sized tiles, ``liger`` = liger-kernel's chunked JSD if it is
importable (JS only; skipped otherwise).

Time: best of ``--reps`` forward+backward runs after one warm-up run (wall clock), with
``--threads`` torch threads (default: torch's default). On a CPU shared with other busy processes
use ``--threads 1``: OpenMP's spin-waiting barriers make every parallel region slow when another
process holds a core, which distorts any comparison.
Memory: each variant runs in a fresh subprocess; torch's CPU allocator does not cache, and glibc
returns large freed blocks to the OS, so the process RSS follows live memory. After building the
inputs, a dummy tensor of the size of the gradient buffers is written and freed, then the
high-water RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is read: the baseline. "extra
peak" = high-water RSS after the warm-up forward+backward − baseline, i.e. the peak memory beyond
the inputs and the gradient buffers. On CUDA it is torch.cuda.max_memory_allocated beyond the
same baseline. Ratios are fdpo / other, from one run of this script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DIVERGENCES = {"reverse_kl": 1.0, "forward_kl": 0.0, "js": 0.5}  # name → TRL beta


# ----------------------------------------------------------------------------- worker side


def _naive_divergence(z, zr, name):
    import torch

    logp = torch.log_softmax(z.float(), dim=-1)
    logq = torch.log_softmax(zr.float(), dim=-1)
    if name == "reverse_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if name == "forward_kl":
        return (logq.exp() * (logq - logp)).sum(-1)
    log_m = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * (logp.exp() * (logp - log_m) + logq.exp() * (logq - log_m)).sum(-1)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _inputs(args: argparse.Namespace, part: str) -> dict:
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    b, t, v, hdim = args.batch, args.seq, args.vocab, args.hidden
    if part == "logits":
        z = (3.0 * torch.randn(b, t, v, device=device)).requires_grad_(True)
        zr = 3.0 * torch.randn(b, t, v, device=device)
        return {"z": z, "zr": zr, "params": [z], "grad_numel": z.numel()}
    n = b * t
    h = torch.randn(n, hdim, device=device).requires_grad_(True)
    w = (torch.randn(v, hdim, device=device) / math.sqrt(hdim) * 3).requires_grad_(True)
    hr = torch.randn(n, hdim, device=device)
    wr = torch.randn(v, hdim, device=device) / math.sqrt(hdim) * 3
    return {"h": h, "w": w, "hr": hr, "wr": wr, "params": [h, w], "grad_numel": h.numel() + w.numel()}


def _step(args: argparse.Namespace, part: str, variant: str, name: str, x: dict):
    """One forward + backward of Σ_positions D_f for ``variant``, as a callable."""
    import torch

    from fdpo.divergences import full_vocab_divergence, full_vocab_divergence_from_hidden

    if variant == "trl":
        import trl.kernels.chunked_divergence as tcd

        tcd.TOKEN_CHUNK_SIZE = args.trl_token_chunk
        tcd.VOCAB_CHUNK_SIZE = args.trl_vocab_chunk
    chunk = args.chunk_size or None

    def forward():
        if part == "logits":
            if variant == "fdpo":
                return full_vocab_divergence(x["z"], x["zr"], name, chunk_size=chunk)
            return _naive_divergence(x["z"], x["zr"], name)
        h, w, hr, wr = x["h"], x["w"], x["hr"], x["wr"]
        if variant == "fdpo":
            return full_vocab_divergence_from_hidden(h, w, hr, wr, name, chunk_size=chunk)
        if variant == "fdpo-sum":
            return full_vocab_divergence_from_hidden(h, w, hr, wr, name, chunk_size=chunk, reduction="sum")
        if variant == "naive":
            with torch.no_grad():
                logits_r = hr @ wr.t()
            return _naive_divergence(h @ w.t(), logits_r, name)
        if variant == "trl":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            return ChunkedDivergenceFunction.apply(h, w, None, hr, wr, None, DIVERGENCES[name])[0]
        if variant == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # type: ignore

            n = h.shape[0]
            return LigerFusedLinearJSDLoss(jsd_beta=0.5)(h, w, hr, wr, torch.zeros(n, dtype=torch.long))
        raise ValueError(variant)

    def step():
        forward().sum().backward()
        for p in x["params"]:
            p.grad = None

    return step


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _worker_memory(args: argparse.Namespace) -> dict:
    """Peak memory beyond inputs and gradient buffers of one forward+backward (fresh process)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    x = _inputs(args, args.part)
    step = _step(args, args.part, args.variant, args.divergence, x)
    if args.device.startswith("cuda"):
        _sync(args.device)
        dummy = torch.ones(x["grad_numel"], device=args.device)
        base = torch.cuda.max_memory_allocated()
        del dummy
        torch.cuda.reset_peak_memory_stats()
        step()
        _sync(args.device)
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        dummy = torch.ones(x["grad_numel"])  # written, so its pages count in RSS
        base = _rss_mb()
        del dummy
        step()
        extra = _rss_mb() - base
    return {"extra_mb": max(extra, 0.0)}


def _worker_time(args: argparse.Namespace) -> dict:
    """Best-of-reps time per variant; variants interleaved round-robin on the same inputs so that
    load from other processes hits all of them alike."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    x = _inputs(args, args.part)
    variants = args.variant.split(",")
    steps = {v: _step(args, args.part, v, args.divergence, x) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:
        steps[v]()  # warm-up
    for _ in range(args.reps):
        for v in variants:
            _sync(args.device)
            t0 = time.perf_counter()
            steps[v]()
            _sync(args.device)
            times[v].append(time.perf_counter() - t0)
    return {v: min(ts) for v, ts in times.items()}


# ----------------------------------------------------------------------------- driver side


def _run_worker(
    args: argparse.Namespace, mode: str, part: str, variants: list[str], name: str
) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--_worker", mode,
        "--part", part, "--variant", ",".join(variants), "--divergence", name,
        "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
        "--hidden", str(args.hidden), "--reps", str(args.reps), "--device", args.device,
        "--threads", str(args.threads),
        "--trl-token-chunk", str(args.trl_token_chunk), "--trl-vocab-chunk", str(args.trl_vocab_chunk),
    ]  # fmt: skip
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        print(f"  [{mode} {part}/{','.join(variants)}/{name}] failed: {msg}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _liger_available() -> bool:
    try:
        import liger_kernel  # type: ignore  # noqa: F401
    except Exception:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=0, help="fdpo positions per chunk (0: default)")
    p.add_argument("--trl-token-chunk", type=int, default=256)
    p.add_argument("--trl-vocab-chunk", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="small shapes (4, 256, 8000), hidden 128")
    p.add_argument("--parts", default="logits,hidden")
    p.add_argument("--divergences", default=",".join(DIVERGENCES))
    p.add_argument("--_worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--divergence", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(json.dumps(_worker_memory(args) if args._worker == "memory" else _worker_time(args)))
        return 0
    if args.quick:
        args.batch, args.seq, args.vocab, args.hidden = 4, 256, 8000, 128

    import torch

    names = [n for n in args.divergences.split(",") if n]
    print(
        f"shape (batch, seq, vocab) = ({args.batch}, {args.seq}, {args.vocab}), hidden {args.hidden}, "
        f"fp32, device {args.device}, torch threads {args.threads or torch.get_num_threads()}, "
        f"best of {args.reps}"
    )
    print("extra peak = peak memory beyond inputs and gradient buffers (see module docstring)\n")
    for part in args.parts.split(","):
        variants = ["fdpo", "naive"] if part == "logits" else ["fdpo", "fdpo-sum", "naive", "trl"]
        if part == "hidden" and _liger_available():
            variants.append("liger")
        print(
            f"## from {part}"
            + (f" (TRL tiles {args.trl_token_chunk}×{args.trl_vocab_chunk})" if part == "hidden" else "")
        )
        mine_names = [v for v in variants if v.startswith("fdpo")]
        cols = ["divergence", "variant", "time (s)", "extra peak (MiB)"]
        for m in mine_names:
            cols += [f"time {m}/this", f"memory {m}/this"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for name in names:
            run = [v for v in variants if not (v == "liger" and name != "js")]
            times = _run_worker(args, "time", part, run, name) or {}
            results = {}
            for variant in run:
                mem = _run_worker(args, "memory", part, [variant], name)
                results[variant] = (
                    None if (mem is None or variant not in times) else {"time_s": times[variant], **mem}
                )
            for variant, res in results.items():
                if res is None:
                    print(f"| {name} | {variant} | failed | |" + " |" * (2 * len(mine_names)))
                    continue
                cells = [name, variant, f"{res['time_s']:.3f}", f"{res['extra_mb']:.0f}"]
                for m in mine_names:
                    mine = results.get(m)
                    if mine is None or variant.startswith("fdpo"):
                        cells += ["—", "—"]
                        continue
                    cells.append(f"{mine['time_s'] / res['time_s']:.2f}×")
                    cells.append(
                        f"{mine['extra_mb'] / res['extra_mb']:.3f}×" if res["extra_mb"] > 0 else "n/a"
                    )
                print("| " + " | ".join(cells) + " |")
        if part == "hidden" and "liger" not in variants:
            print("(liger-kernel is not installed: its chunked JSD was skipped)")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
