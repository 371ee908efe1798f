"""Full-vocabulary divergence: fdpo's chunked paths vs the naive one-shot computation vs TRL 1.16
(and liger-kernel's chunked JSD when it is importable).

    python benchmarks/bench_divergences.py            # logits (4, 512, 32000) fp32; hidden 256
    python benchmarks/bench_divergences.py --quick    # (4, 256, 8000), hidden 128: seconds
    python benchmarks/bench_divergences.py --parts logits --divergences js --reps 7

What runs (forward + backward, fp32, CPU unless ``--device``):

- from logits, z (requiring grad) and z_ref of shape (batch, seq, vocab), loss Σ_i w_i D_i with
  fixed random positive per-position weights w (like a masked token mean, so the backward pass
  gets a non-trivial upstream gradient):
  ``fdpo`` = :func:`fdpo.divergences.full_vocab_divergence`;
  ``naive`` = ``log_softmax`` of both full tensors, the per-token formula summed over the
  vocabulary, autograd for the gradient (the honest one-shot implementation).
- from hidden states h (N, hidden) with lm_head W (vocab, hidden), both requiring grad, and a
  frozen reference (h_ref, W_ref): ``fdpo`` = :func:`full_vocab_divergence_from_hidden`
  returning per-position values (gradients recomputed in backward, like TRL), ``fdpo-sum`` = the
  same with ``reduction="sum", weights=w`` (gradients computed in the forward pass);
  ``naive`` = materialise both logits, then as above; ``trl`` = TRL 1.16's
  ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (beta 1 = reverse KL, 0 = forward
  KL, 0.5 = JS; torch fallback on CPU) with CPU-sized tiles ``--trl-tiles``; ``liger`` =
  liger-kernel's ``LigerFusedLinearJSDLoss`` (JS only, pure torch with ``compiled=False``, no
  hard loss, ``--liger-chunk`` rows per chunk; its loss is a scalar, so it is unweighted).
  Any other registered divergence (``--divergences alpha(0.5),jeffreys``) runs fdpo vs naive, the
  naive one being Σ_v q f(p/q) with the registry's f(ℓ) on the full tensors.

Time: median of ``--reps`` runs after one warm-up run per variant; the variants are interleaved
(each repetition runs every variant, in a rotating order) in one process, so load from other
processes hits all of them alike. ``--threads`` torch threads (default 1: on a shared CPU,
OpenMP's spin-waiting barriers make parallel regions erratic).

Memory: "extra peak" = the peak of torch's live allocations during one forward + backward, minus
the bytes of the gradients it returns (the gradient buffers) — i.e. the peak memory beyond the
inputs and the gradient buffer. Measured with :func:`fdpo.divergences.profiling.peak_memory`: on
CPU it replays the profiler's record of every allocation and free of torch's CPU allocator (exact,
unlike process RSS); on CUDA ``max_memory_allocated``. Subtracting the gradient bytes assumes the
gradients are alive at the peak, which favours the baselines (for naive and TRL they are only
allocated late in backward). Ratios are fdpo / the other variant, from this one run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIVERGENCES = {"reverse_kl": 1.0, "forward_kl": 0.0, "js": 0.5}  # name → TRL beta


def _naive_divergence(z, zr, name):
    """One-shot D_f per position from full logits: log_softmax of both, per-token formula, Σ_v."""
    import torch

    logp = torch.log_softmax(z.float(), dim=-1)
    logq = torch.log_softmax(zr.float(), dim=-1)
    if name == "reverse_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if name == "forward_kl":
        return (logq.exp() * (logq - logp)).sum(-1)
    if name == "js":
        log_m = torch.logaddexp(logp, logq) - math.log(2.0)
        return 0.5 * (logp.exp() * (logp - log_m) + logq.exp() * (logq - log_m)).sum(-1)
    from fdpo.divergences import get_divergence  # any other f: Σ_v q f(p/q) with the registry's f(ℓ)

    return (logq.exp() * get_divergence(name).f(logp - logq)).sum(-1)


def _liger_available() -> bool:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # type: ignore  # noqa: F401
    except Exception:
        return False
    return True


def _inputs(args: argparse.Namespace, part: str) -> dict:
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    b, t, v, hdim = args.batch, args.seq, args.vocab, args.hidden
    weights = torch.rand(b * t, device=device) + 0.5
    if part == "logits":
        z = (3.0 * torch.randn(b * t, v, device=device)).requires_grad_(True)
        zr = 3.0 * torch.randn(b * t, v, device=device)
        return {"z": z, "zr": zr, "params": [z], "weights": weights}
    n = b * t
    h = torch.randn(n, hdim, device=device).requires_grad_(True)
    w = (torch.randn(v, hdim, device=device) / math.sqrt(hdim) * 3).requires_grad_(True)
    hr = torch.randn(n, hdim, device=device)
    wr = torch.randn(v, hdim, device=device) / math.sqrt(hdim) * 3
    return {"h": h, "w": w, "hr": hr, "wr": wr, "params": [h, w], "weights": weights}


def _step(args: argparse.Namespace, part: str, variant: str, name: str, x: dict):
    """One forward + backward of the (weighted) sum of D_f over positions, as a callable."""
    import torch

    from fdpo.divergences import full_vocab_divergence, full_vocab_divergence_from_hidden

    chunk = args.chunk_size or None
    wts = x["weights"]

    def loss():
        if part == "logits":
            if variant == "fdpo":
                return (full_vocab_divergence(x["z"], x["zr"], name, chunk_size=chunk) * wts).sum()
            return (_naive_divergence(x["z"], x["zr"], name) * wts).sum()
        h, w, hr, wr = x["h"], x["w"], x["hr"], x["wr"]
        if variant == "fdpo":
            return (full_vocab_divergence_from_hidden(h, w, hr, wr, name, chunk_size=chunk) * wts).sum()
        if variant == "fdpo-sum":
            return full_vocab_divergence_from_hidden(
                h, w, hr, wr, name, chunk_size=chunk, reduction="sum", weights=wts
            )
        if variant == "naive":
            with torch.no_grad():
                logits_r = hr @ wr.t()
            return (_naive_divergence(h @ w.t(), logits_r, name) * wts).sum()
        if variant == "trl":
            import trl.kernels.chunked_divergence as tcd

            tcd.TOKEN_CHUNK_SIZE, tcd.VOCAB_CHUNK_SIZE = args.trl_tiles
            return (
                tcd.ChunkedDivergenceFunction.apply(h, w, None, hr, wr, None, DIVERGENCES[name])[0] * wts
            ).sum()
        if variant == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # type: ignore

            fn = LigerFusedLinearJSDLoss(
                weight_hard_loss=0.0,
                weight_soft_loss=1.0,
                beta=0.5,
                compiled=False,
                chunk_size=args.liger_chunk,
            )
            return fn(h, w, hr, wr, torch.zeros(h.shape[0], dtype=torch.long, device=h.device))
        raise ValueError(variant)

    def step():
        loss().backward()
        for p in x["params"]:
            p.grad = None

    return step


def _measure(args: argparse.Namespace, part: str, name: str, variants: list[str]) -> dict[str, dict]:
    import torch

    from fdpo.divergences.profiling import peak_memory

    x = _inputs(args, part)
    grad_bytes = sum(p.numel() * p.element_size() for p in x["params"])
    steps = {v: _step(args, part, v, name, x) for v in variants}
    res: dict[str, dict] = {}
    for v in variants:
        steps[v]()  # warm-up
        _, peak, _ = peak_memory(steps[v], args.device)
        res[v] = {"extra_mb": max(peak - grad_bytes, 0) / 2**20, "times": []}
    for r in range(args.reps):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[v]()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            res[v]["times"].append(time.perf_counter() - t0)
    for v in variants:
        res[v]["time_s"] = statistics.median(res[v]["times"])
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=0, help="fdpo positions per chunk (0: memory budget)")
    p.add_argument("--trl-tiles", type=int, nargs=2, default=(256, 8192), metavar=("TOKENS", "VOCAB"))
    p.add_argument("--liger-chunk", type=int, default=256, help="liger rows per chunk")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="small shapes (4, 256, 8000), hidden 128, 3 reps")
    p.add_argument("--parts", default="logits,hidden")
    p.add_argument(
        "--divergences",
        default=",".join(DIVERGENCES),
        help="registered names/labels; TRL runs for reverse_kl, forward_kl, js; liger for js",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.vocab, args.hidden, args.reps = 4, 256, 8000, 128, 3

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.divergences.split(",") if n]
    print(
        f"shape (batch, seq, vocab) = ({args.batch}, {args.seq}, {args.vocab}), hidden {args.hidden}, "
        f"fp32, device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"median of {args.reps} interleaved runs"
    )
    print("extra peak = peak torch allocation beyond inputs and gradient buffers (see module docstring)\n")
    liger = _liger_available()
    for part in args.parts.split(","):
        variants = ["fdpo", "naive"] if part == "logits" else ["fdpo", "fdpo-sum", "naive", "trl"]
        if part == "hidden" and liger:
            variants.append("liger")
        head = f"## from {part}"
        if part == "hidden":
            head += f" (TRL tiles {args.trl_tiles[0]}×{args.trl_tiles[1]}, liger chunk {args.liger_chunk})"
        print(head)
        mine = [v for v in variants if v.startswith("fdpo")]
        cols = ["divergence", "variant", "time (s)", "extra peak (MiB)"]
        for m in mine:
            cols += [f"time {m}/this", f"memory {m}/this"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for name in names:
            run = [
                v for v in variants if (v != "liger" or name == "js") and (v != "trl" or name in DIVERGENCES)
            ]
            res = _measure(args, part, name, run)
            for v in run:
                cells = [name, v, f"{res[v]['time_s']:.3f}", f"{res[v]['extra_mb']:.1f}"]
                for m in mine:
                    if v.startswith("fdpo"):
                        cells += ["—", "—"]
                        continue
                    cells.append(f"{res[m]['time_s'] / res[v]['time_s']:.2f}×")
                    other = res[v]["extra_mb"]
                    cells.append(f"{res[m]['extra_mb'] / other:.3f}×" if other > 0 else "n/a")
                print("| " + " | ".join(cells) + " |", flush=True)
        if part == "hidden" and not liger:
            print("(liger-kernel is not importable: its chunked JSD was skipped)")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
