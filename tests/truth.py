"""Independent oracles for the tests: every divergence written out from docs/objectives.md, never from fdpo.

Nothing here imports fdpo's math; the test modules compare fdpo against these. Two oracles of the same
divergences, written differently on purpose (tests/test_truth.py checks that they agree):

- `generator(name, params)`: (f, f′, f″) of each registry entry as functions of u, straight from the
  docs/objectives.md §0 table, for two back ends (float64 torch tensors and 50-digit mpmath), and
  `divergence_by_generator`: D_f(p‖q) = Σ_v q_v f(p_v/q_v) by direct summation over the vocabulary.
- `divergence_closed_form`: the distribution-level closed form of each entry (KL(p‖q) = Σ p log(p/q),
  JS through the mixture, Σ(√p − √q)², …) from log-probabilities, in float64.

Plus the oracles built on them: `mp_method` (value and ℓ-derivative of each `Divergence` method, in
mpmath), `bdkd_closed_form` (fdpo's BD-KD-style balance, docs/objectives.md §9.2) and
`token_mean_divergence` (a model pair's per-token divergence on given completions, from their logits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mpmath as mp
import torch

# (canonical name, parameters) of every case the divergence tests run
CASES: list[tuple[str, dict[str, float]]] = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("alpha", {"alpha": 0.1}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 0.9}),
    ("jeffreys", {}),
    ("squared_hellinger", {}),
    ("neyman_chi2", {}),
    ("pearson_chi2", {}),
    ("total_variation", {}),
    ("generalized_jsd", {"beta": 0.2}),
    ("generalized_jsd", {"beta": 0.7}),
]

#: parameters for the entries that need one, where a test runs every registry name once
ENTRY_PARAMS: dict[str, dict[str, float]] = {"alpha": {"alpha": 0.3}, "generalized_jsd": {"beta": 0.2}}


def case_id(case: tuple[str, dict[str, float]]) -> str:
    name, params = case
    return name + "".join(f"-{k}{v:g}" for k, v in params.items())


class TorchOps:
    log = staticmethod(torch.log)
    sqrt = staticmethod(torch.sqrt)
    sign = staticmethod(torch.sign)
    abs = staticmethod(torch.abs)

    @staticmethod
    def const(x: float) -> float:
        return x


class MpOps:
    log = staticmethod(mp.log)
    sqrt = staticmethod(mp.sqrt)
    sign = staticmethod(mp.sign)
    abs = staticmethod(abs)

    @staticmethod
    def const(x: float) -> Any:
        return mp.mpf(x)


def generator(
    name: str, params: dict[str, float], ops: Any = TorchOps
) -> tuple[Callable, Callable, Callable]:
    """(f, f′, f″) as functions of u, straight from the docs/objectives.md §0 table."""
    log, sqrt, sign, ab, c = ops.log, ops.sqrt, ops.sign, ops.abs, ops.const
    if name == "reverse_kl":
        return (lambda u: u * log(u), lambda u: log(u) + 1, lambda u: 1 / u)
    if name == "forward_kl":
        return (lambda u: -log(u), lambda u: -1 / u, lambda u: 1 / u**2)
    if name in ("js", "generalized_jsd"):
        b = c(params.get("beta", 0.5))
        return (
            lambda u: b * u * log(u) - (b * u + 1 - b) * log(b * u + 1 - b),
            lambda u: b * log(u / (b * u + 1 - b)),
            lambda u: b * (1 - b) / (u * (b * u + 1 - b)),
        )
    if name == "alpha":
        a = c(params["alpha"])
        return (
            lambda u: (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1)),
            lambda u: (1 - u ** (-a)) / a,
            lambda u: u ** (-a - 1),
        )
    if name == "jeffreys":
        return (lambda u: (u - 1) * log(u), lambda u: log(u) + 1 - 1 / u, lambda u: 1 / u + 1 / u**2)
    if name == "squared_hellinger":
        return (lambda u: (sqrt(u) - 1) ** 2, lambda u: 1 - 1 / sqrt(u), lambda u: 0.5 / (u * sqrt(u)))
    if name == "neyman_chi2":
        return (lambda u: (1 - u) ** 2 / u, lambda u: 1 - 1 / u**2, lambda u: 2 / u**3)
    if name == "pearson_chi2":
        return (lambda u: (u - 1) ** 2, lambda u: 2 * (u - 1), lambda u: 2 + 0 * u)
    if name == "total_variation":
        return (lambda u: ab(u - 1) / 2, lambda u: sign(u - 1) / 2, lambda u: 0 * u)
    raise KeyError(name)


def divergence_by_generator(name: str, params: dict[str, float], p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_v q_v f(p_v/q_v) over the last dimension, by direct summation (float64 probabilities, p, q > 0)."""
    f = generator(name, params)[0]
    return (q * f(p / q)).sum(-1)


def divergence_closed_form(name: str, params: dict, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-position D(p‖q) in float64 from log-probabilities (..., V), by the closed form of each entry."""
    logp, logq = logp.double(), logq.double()
    p, q = logp.exp(), logq.exp()
    kl = lambda a, la, lb: (a * (la - lb)).sum(-1)  # noqa: E731
    if name == "reverse_kl":
        return kl(p, logp, logq)
    if name == "forward_kl":
        return kl(q, logq, logp)
    if name in ("js", "generalized_jsd"):
        beta = params.get("beta", 0.5)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, logp, m.log()) + (1 - beta) * kl(q, logq, m.log())
    if name == "alpha":
        a = params["alpha"]
        return ((p ** (1 - a) * q**a).sum(-1) - 1) / (a * (a - 1))
    if name == "jeffreys":
        return ((p - q) * (logp - logq)).sum(-1)
    if name == "squared_hellinger":
        return ((p.sqrt() - q.sqrt()) ** 2).sum(-1)
    if name == "neyman_chi2":
        return ((q - p) ** 2 / p).sum(-1)
    if name == "pearson_chi2":
        return ((p - q) ** 2 / q).sum(-1)
    if name == "total_variation":
        return 0.5 * (p - q).abs().sum(-1)
    raise KeyError(name)


def bdkd_closed_form(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """(1 − w)·KL(q‖p) + w·KL(p‖q), w = H(p)/(H(p) + H(q)) without gradient (docs/objectives.md §9.2)."""
    h_s = -(logp.exp() * logp).sum(-1)
    h_t = -(logq.exp() * logq).sum(-1)
    w = (h_s / (h_s + h_t)).detach()
    return (1 - w) * divergence_closed_form("forward_kl", {}, logp, logq) + w * divergence_closed_form(
        "reverse_kl", {}, logp, logq
    )


def token_mean_divergence(policy, ref, rows, tok, name: str) -> float:
    """Token mean of D_name(π‖π_ref) in float64 over the completions of conversational `rows`, each position's
    divergence summed directly over the vocabulary from the two models' own logits (independent of fdpo)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False)
            full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)
            ids = torch.tensor([full])
            logp = policy(input_ids=ids).logits[0, len(prompt) - 1 : -1].double().log_softmax(-1)
            logq = ref(input_ids=ids).logits[0, len(prompt) - 1 : -1].double().log_softmax(-1)
            d = divergence_closed_form(name, {}, logp, logq)
            total, count = total + d.sum().item(), count + d.numel()
    return total / count


METHODS = ("f", "f_prime", "f_over_u", "u_f_prime", "f_normalized", "f_normalized_over_u")


def mp_method(name: str, params: dict[str, float], method: str, logr: float) -> tuple[Any, Any]:
    """(value, d value / dℓ) of one Divergence method at ℓ, in mpmath."""
    f, fp, fpp = generator(name, params, MpOps)
    u = mp.exp(mp.mpf(logr))
    c1 = fp(mp.mpf(1))
    fu, fpu, fppu = f(u), fp(u), fpp(u)
    if method == "f":
        return fu, u * fpu
    if method == "f_prime":
        return fpu, u * fppu
    if method == "f_over_u":
        return fu / u, fpu - fu / u
    if method == "u_f_prime":
        return u * fpu, u * fpu + u * u * fppu
    if method == "f_normalized":
        return fu - c1 * (u - 1), u * fpu - c1 * u
    if method == "f_normalized_over_u":
        g = fu - c1 * (u - 1)
        return g / u, (fpu - c1) - g / u
    raise KeyError(method)
