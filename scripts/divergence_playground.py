"""Mode seeking vs mass covering: fit one Gaussian to a two-Gaussian mixture with every divergence.

    python scripts/divergence_playground.py [--out runs/divergence_playground.png] [--steps 400]

In fdpo's convention π is the distribution being trained and π_ref the fixed one, so each panel
minimises D_f(π ‖ π_ref) with π = N(μ, σ²) (parameters μ, log σ, by Adam) and π_ref = the mixture.
Both densities are evaluated on a 1-D grid and normalised over it, which makes them categoricals
over the grid points; the divergence is then exactly fdpo's ``full_vocab_divergence`` with the log
densities as logits (one "position", the grid as the "vocabulary"). Reverse KL (KL(π‖π_ref)) locks
onto one mode; forward KL (KL(π_ref‖π)) spreads over both (its optimum matches the mixture's
mean and variance). Prints the fitted mean and standard deviation per divergence and saves one
panel per divergence. Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from fdpo.divergences import available_divergences, full_vocab_divergence, get_divergence

# the fixed mixture π_ref: weights, means, standard deviations
WEIGHTS = (0.55, 0.45)
MEANS = (-2.5, 2.5)
STDS = (0.7, 0.7)


def _log_normal(x: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float) -> torch.Tensor:
    std_t = torch.as_tensor(std, dtype=x.dtype)
    return -0.5 * ((x - mean) / std_t) ** 2 - torch.log(std_t) - 0.5 * math.log(2 * math.pi)


def mixture_log_density(x: torch.Tensor) -> torch.Tensor:
    parts = [math.log(w) + _log_normal(x, m, s) for w, m, s in zip(WEIGHTS, MEANS, STDS)]
    return torch.logsumexp(torch.stack(parts), dim=0)


def fit(divergence: str, grid: torch.Tensor, steps: int, lr: float = 0.05) -> tuple[float, float, float]:
    """Minimise D_f(N(μ, σ²) ‖ mixture) on the grid by Adam (gradient norm clipped at 1); returns
    (μ, σ, final divergence)."""
    div = get_divergence(divergence)
    ref_logits = mixture_log_density(grid)[None, None, :]
    # start between the modes, narrow, nearer the right one: mode-seeking divergences settle on that
    # mode, mass-covering ones spread out over both
    mean = torch.tensor(1.0, dtype=grid.dtype, requires_grad=True)
    log_std = torch.tensor(math.log(0.5), dtype=grid.dtype, requires_grad=True)
    opt = torch.optim.Adam([mean, log_std], lr=lr)
    value = torch.tensor(float("nan"))
    for _ in range(steps):
        opt.zero_grad()
        logits = _log_normal(grid, mean, log_std.exp())[None, None, :]
        value = full_vocab_divergence(logits, ref_logits, div).sum()
        value.backward()
        # χ²-type divergences start out astronomically large (1e50 for a narrow π): clip so that
        # Adam's second-moment estimate is not dominated for hundreds of steps by the first ones
        torch.nn.utils.clip_grad_norm_([mean, log_std], 1.0)
        opt.step()
    return float(mean.detach()), float(log_std.detach().exp()), float(value.detach())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/divergence_playground.png", help="PNG to write")
    p.add_argument("--steps", type=int, default=400, help="Adam steps per divergence")
    p.add_argument("--alpha", type=float, default=0.5, help="α of the alpha panel (f-DPO convention)")
    p.add_argument("--beta", type=float, default=0.1, help="β of the generalized_jsd panel (weight of π)")
    p.add_argument("--no-plot", action="store_true", help="only print the fitted parameters")
    args = p.parse_args(argv)

    grid = torch.linspace(-10.0, 10.0, 2001, dtype=torch.float64)
    labels = []
    for name in available_divergences():
        params = {"alpha": {"alpha": args.alpha}, "generalized_jsd": {"beta": args.beta}}.get(name, {})
        labels.append(get_divergence(name, **params).label)

    t0 = time.perf_counter()
    results = {label: fit(label, grid, args.steps) for label in labels}
    mix_mean = sum(w * m for w, m in zip(WEIGHTS, MEANS))
    mix_std = math.sqrt(sum(w * (s**2 + m**2) for w, m, s in zip(WEIGHTS, MEANS, STDS)) - mix_mean**2)
    print(f"π_ref = {WEIGHTS[0]}·N({MEANS[0]}, {STDS[0]}²) + {WEIGHTS[1]}·N({MEANS[1]}, {STDS[1]}²): "
          f"mean {mix_mean:.3f}, std {mix_std:.3f}")  # fmt: skip
    print(f"{'divergence':<22} {'mean':>8} {'std':>8} {'D_f at fit':>12}")
    for label, (mean, std, value) in results.items():
        print(f"{label:<22} {mean:8.3f} {std:8.3f} {value:12.5f}")
    print(f"({len(results)} fits of {args.steps} steps in {time.perf_counter() - t0:.1f} s)")

    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = 5
        rows = math.ceil(len(results) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), sharex=True, sharey=True)
        ref_density = mixture_log_density(grid).exp()
        for ax, (label, (mean, std, _)) in zip(axes.flat, results.items()):
            fitted = _log_normal(grid, mean, std).exp()
            ax.fill_between(grid, ref_density, color="0.8", label="π_ref (mixture)")
            ax.plot(grid, fitted, color="C3", lw=2, label="π (fitted Gaussian)")
            ax.set_title(f"{label}\nμ={mean:.2f}, σ={std:.2f}", fontsize=9)
            ax.set_xlim(-7, 7)
        for ax in list(axes.flat)[len(results) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, loc="upper left")
        fig.suptitle(
            "argmin over Gaussians π of D_f(π ‖ π_ref): reverse KL seeks a mode, forward KL covers both"
        )
        fig.tight_layout()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
