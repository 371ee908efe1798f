"""Chunked full-vocabulary divergence (from logits and fused from hidden states) against the
unchunked computation written here with autograd (float64), and against TRL 1.16's own
chunked_divergence where the two overlap."""

from __future__ import annotations

import math

import pytest
import torch
from truth import CASES, case_id, generator

from fdpo.divergences import (
    Divergence,
    available_divergences,
    full_vocab_divergence,
    full_vocab_divergence_from_hidden,
    get_divergence,
    register,
)
from fdpo.divergences.base import VocabChunk
from fdpo.divergences.registry import _ENTRIES, _NAMES

B, T, VOCAB = 2, 10, 13


def _logits(seed: int, dtype=torch.float64, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(B, T, VOCAB, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    zr = (scale * torch.randn(B, T, VOCAB, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    mask = torch.rand(B, T, generator=g) > 0.35
    return z, zr, mask


def _unchunked(name, params, z, zr, mask=None, temperature=1.0):
    """Σ_v q f(p/q) straight from the reference generator, one shot, autograd for the gradient."""
    f = generator(name, params)[0]
    p = (z.double() / temperature).softmax(-1)
    q = (zr.double() / temperature).softmax(-1)
    d = (q * f(p / q)).sum(-1)
    return d if mask is None else d * mask


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunked_values_and_gradients_equal_unchunked(case):
    name, params = case
    div = get_divergence(name, **params)
    z, zr, mask = _logits(0)
    w = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    truth = _unchunked(name, params, z, zr, mask)
    tgz, tgzr = torch.autograd.grad((truth * w).sum(), [z, zr])
    for chunk, m in ((1, mask), (7, mask), (3, None), (64, None)):  # 3 and 7 do not divide 20 positions
        out = full_vocab_divergence(z, zr, div, m, chunk_size=chunk)
        assert out.shape == (B, T) and out.dtype == torch.float64
        gz, gzr = torch.autograd.grad((out * w).sum(), [z, zr])
        if m is None:
            ref = _unchunked(name, params, z, zr)
            rgz, rgzr = torch.autograd.grad((ref * w).sum(), [z, zr])
        else:
            ref, rgz, rgzr = truth, tgz, tgzr
            assert bool((out[~mask] == 0).all()) and bool((gz[~mask] == 0).all())
        torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gz, rgz, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gzr, rgzr, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_generic_vocab_terms_equal_each_entrys_closed_forms(case):
    """Divergence.vocab_value / vocab_dlogp (the generic versions any new entry gets) agree with the
    closed forms the built-in entries override them with."""
    name, params = case
    div = get_divergence(name, **params)
    z, zr, _ = _logits(1)
    c = VocabChunk(z.detach().log_softmax(-1), zr.detach().log_softmax(-1), log_cap=600.0)
    torch.testing.assert_close(Divergence.vocab_value(div, c), div.vocab_value(c), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(Divergence.vocab_dlogp(div, c), div.vocab_dlogp(c), rtol=1e-10, atol=1e-13)


def test_temperature_and_gradient_to_the_reference_side_only():
    z, zr, mask = _logits(2)
    out = full_vocab_divergence(z.detach(), zr, "forward_kl", mask, temperature=1.7, chunk_size=4)
    ref = _unchunked("forward_kl", {}, z.detach(), zr, mask, temperature=1.7)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), zr)
    (rg,) = torch.autograd.grad(ref.sum(), zr)
    torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        full_vocab_divergence(z, zr, "js", temperature=0.0)


def test_all_masked_and_shape_errors():
    z, zr, _ = _logits(3)
    out = full_vocab_divergence(z, zr, "js", torch.zeros(B, T, dtype=torch.bool))
    (g,) = torch.autograd.grad(out.sum(), z)
    assert float(out.detach().abs().sum()) == 0.0 and float(g.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="shape"):
        full_vocab_divergence(z, zr[:, :3], "js")
    with pytest.raises(ValueError, match="mask"):
        full_vocab_divergence(z, zr, "js", torch.ones(B, T + 1, dtype=torch.bool))


def test_bfloat16_logits_compute_in_float32_and_return_bfloat16_gradients():
    z, zr, mask = _logits(4, dtype=torch.bfloat16)
    out = full_vocab_divergence(z, zr, "js", mask, chunk_size=3)
    assert out.dtype == torch.float32
    (g,) = torch.autograd.grad(out.sum(), z)
    assert g.dtype == torch.bfloat16
    ref = _unchunked("js", {}, z.detach(), zr.detach(), mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", available_divergences())
def test_minus_inf_and_huge_logits_give_finite_values_and_gradients(name):
    div = get_divergence(
        name, **({"alpha": 0.3} if name == "alpha" else {"beta": 0.4} if name == "generalized_jsd" else {})
    )
    z = torch.randn(3, 6, dtype=torch.float32)
    zr = torch.randn(3, 6, dtype=torch.float32)
    z[:, -1] = zr[:, -1] = -math.inf  # a padded vocabulary entry, impossible under both models
    z[1, 0], zr[2, 1] = 1e4, -1e4  # log-ratios of ±1e4
    z.requires_grad_(True)
    zr.requires_grad_(True)
    out = full_vocab_divergence(z, zr, div, chunk_size=2)
    gz, gzr = torch.autograd.grad(out.sum(), [z, zr])
    assert (
        bool(torch.isfinite(out).all()) and bool(torch.isfinite(gz).all()) and bool(torch.isfinite(gzr).all())
    )
    # the −inf entry contributes nothing: same as dropping it
    row0 = full_vocab_divergence(z[:1, :-1], zr[:1, :-1], div)
    torch.testing.assert_close(out[:1], row0, rtol=1e-5, atol=1e-6)


def test_forward_keeps_no_graph_only_inputs_and_per_position_normalisers():
    """Memory: what the forward saves for backward is the inputs themselves plus O(positions)."""
    z, zr, mask = _logits(5)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = full_vocab_divergence(z, zr, "reverse_kl", mask, chunk_size=3)
    big = [t for t in saved if t.numel() > 2 * B * T]
    assert all(t.data_ptr() in (z.data_ptr(), zr.data_ptr()) for t in big)
    out.sum().backward()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_peak_memory_is_one_chunk_beyond_inputs_and_gradient_buffers(case):
    """Allocator-exact accounting (torch's own record of every allocation): a forward + backward
    never holds more than LIVE_CHUNK_TENSORS (chunk, vocab) temporaries beyond the inputs and the
    returned gradients, for either or both sides carrying the gradient, with and without a mask and
    a temperature; while the one-shot computation holds several full (positions, vocab) tensors."""
    from fdpo.divergences.full_vocab import LIVE_CHUNK_TENSORS
    from fdpo.divergences.profiling import peak_memory

    name, params = case
    div = get_divergence(name, **params)
    n, vocab, rows = 48, 2048, 4
    g = torch.Generator().manual_seed(11)
    z0, zr0 = 3 * torch.randn(n, vocab, generator=g), 3 * torch.randn(n, vocab, generator=g)
    mask = torch.rand(n, generator=g) > 0.3
    chunk_bytes = rows * vocab * 4
    for sides, m, temp in (("p", None, 1.0), ("q", mask, 1.3), ("pq", mask, 1.0), ("pq", None, 0.7)):
        z, zr = z0.clone().requires_grad_("p" in sides), zr0.clone().requires_grad_("q" in sides)

        def step(z=z, zr=zr, m=m, temp=temp):
            full_vocab_divergence(z, zr, div, m, chunk_size=rows, temperature=temp).sum().backward()

        _, peak, net = peak_memory(step)
        grad_bytes = len(sides) * n * vocab * 4
        assert net == grad_bytes  # what stays is the gradients, nothing else
        assert peak - grad_bytes <= LIVE_CHUNK_TENSORS * chunk_bytes + 64 * n, (sides, peak - grad_bytes)
    z = z0.clone().requires_grad_(True)
    _, naive_peak, _ = peak_memory(lambda: _unchunked(name, params, z, zr0).sum().backward())
    assert naive_peak - z.numel() * 4 >= 2 * n * vocab * 4  # the truth this saves us from (float64 here)


def test_default_chunk_keeps_the_working_set_within_the_memory_budget():
    """The default chunk size comes from the budget: measured extra peak ≤ min(CHUNK_BUDGET_BYTES,
    one full tensor / CHUNK_BUDGET_FRACTION) (or one row's LIVE_CHUNK_TENSORS when a row is larger)."""
    from fdpo.divergences.full_vocab import (
        CHUNK_BUDGET_BYTES,
        CHUNK_BUDGET_FRACTION,
        LIVE_CHUNK_TENSORS,
        default_chunk_size,
    )
    from fdpo.divergences.profiling import peak_memory

    for n, vocab in ((96, 1000), (40, 3000)):
        z = torch.randn(n, vocab, requires_grad=True)
        zr = torch.randn(n, vocab)
        full = n * vocab * 4
        budget = max(
            min(CHUNK_BUDGET_BYTES["cpu"], full // CHUNK_BUDGET_FRACTION), LIVE_CHUNK_TENSORS * vocab * 4
        )
        assert LIVE_CHUNK_TENSORS * default_chunk_size(vocab, "cpu", n) * vocab * 4 <= budget
        _, peak, _ = peak_memory(lambda z=z, zr=zr: full_vocab_divergence(z, zr, "js").sum().backward())
        assert peak - full <= budget + 64 * n
    assert (
        default_chunk_size(32000, "cpu", 2048) * LIVE_CHUNK_TENSORS * 32000 * 4 <= CHUNK_BUDGET_BYTES["cpu"]
    )


def test_gradients_precomputed_in_forward_survive_a_second_backward_and_no_grad():
    """The forward pass hands its gradient buffers to the first backward; a second backward through
    the same graph (retain_graph) recomputes them, exactly; without grad mode nothing is precomputed."""
    z, zr, mask = _logits(12)
    w = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    truth = _unchunked("generalized_jsd", {"beta": 0.3}, z, zr, mask)
    t1 = torch.autograd.grad((truth * w).sum(), [z, zr])
    out = full_vocab_divergence(z, zr, "generalized_jsd(0.3)", mask, chunk_size=3)
    g1 = torch.autograd.grad((out * w).sum(), [z, zr], retain_graph=True)
    g2 = torch.autograd.grad((out * 2 * w).sum(), [z, zr])
    for a, b, t in zip(g1, g2, t1):
        torch.testing.assert_close(a, t, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b, 2 * t, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(
            full_vocab_divergence(z, zr, "generalized_jsd(0.3)", mask), truth.detach(), rtol=1e-10, atol=1e-12
        )


# ------------------------------------------------------------------------------- from hidden states


@pytest.mark.parametrize(
    "name", ["reverse_kl", "forward_kl", "js", "alpha(0.3)", "pearson_chi2", "total_variation"]
)
def test_fused_hidden_path_equals_the_logits_path(name):
    g = torch.Generator().manual_seed(6)
    n_pos, h_dim, hr_dim = (B, T), 5, 4
    h = torch.randn(*n_pos, h_dim, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(VOCAB, h_dim, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(VOCAB, generator=g, dtype=torch.float64).requires_grad_(True)
    hr = torch.randn(*n_pos, hr_dim, generator=g, dtype=torch.float64).requires_grad_(True)
    wr = torch.randn(VOCAB, hr_dim, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.rand(*n_pos, generator=g) > 0.3
    wt = torch.randn(*n_pos, dtype=torch.float64)
    fused = full_vocab_divergence_from_hidden(
        h, w, hr, wr, name, mask, lm_head_bias=b, chunk_size=3, temperature=1.3
    )
    grads = torch.autograd.grad((fused * wt).sum(), [h, w, b, hr, wr])
    ref = full_vocab_divergence(h @ w.T + b, hr @ wr.T, name, mask, temperature=1.3)
    ref_grads = torch.autograd.grad((ref * wt).sum(), [h, w, b, hr, wr])
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["reverse_kl", "js", "neyman_chi2"])
def test_fused_hidden_weighted_sum_computes_gradients_in_one_pass(name):
    """reduction='sum': Σ weights·D with the gradients computed alongside the value; equal to the
    per-position path reduced afterwards, for any upstream scalar, on either side."""
    g = torch.Generator().manual_seed(9)
    h = torch.randn(B, T, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(VOCAB, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    hr = torch.randn(B, T, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    wr = torch.randn(VOCAB, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    weights = torch.rand(B, T, generator=g, dtype=torch.float64)
    total = full_vocab_divergence_from_hidden(
        h, w, hr, wr, name, mask, reduction="sum", weights=weights, chunk_size=4, temperature=0.8
    )
    grads = torch.autograd.grad(2.5 * total, [h, w, hr])
    per_pos = full_vocab_divergence_from_hidden(h, w, hr, wr, name, mask, chunk_size=7, temperature=0.8)
    ref_total = (per_pos * weights).sum()
    ref_grads = torch.autograd.grad(2.5 * ref_total, [h, w, hr])
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        plain = full_vocab_divergence_from_hidden(h, w, hr, wr, name, mask, reduction="sum", temperature=0.8)
        assert float(plain) == pytest.approx(float(per_pos.detach().sum()), rel=1e-10)
    with pytest.raises(ValueError, match="reduction"):
        full_vocab_divergence_from_hidden(h, w, hr, wr, name, reduction="mean")


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_fused_hidden_path_with_reference_logits_instead_of_a_reference_head(reduction):
    g = torch.Generator().manual_seed(10)
    h = torch.randn(B, T, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(VOCAB, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    ref_logits = torch.randn(B, T, VOCAB, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.rand(B, T, generator=g) > 0.3
    out = full_vocab_divergence_from_hidden(
        h, w, ref_logits, None, "js", mask, chunk_size=3, reduction=reduction
    )
    grads = torch.autograd.grad(out.sum(), [h, w, ref_logits])
    ref = full_vocab_divergence(h @ w.T, ref_logits, "js", mask)
    ref_grads = torch.autograd.grad(ref.sum(), [h, w, ref_logits])
    torch.testing.assert_close(out, ref.sum() if reduction == "sum" else ref, rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["forward_kl", "alpha(0.3)"])
def test_fused_hidden_path_with_a_frozen_head_computes_row_gradients_in_forward(name):
    """Frozen LM heads (e.g. LoRA elsewhere): the per-row gradients (hidden states, reference
    logits) are computed in the forward pass and scaled by the upstream gradient in backward."""
    g = torch.Generator().manual_seed(14)
    h = torch.randn(B, T, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(VOCAB, 5, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(B, T, VOCAB, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.rand(B, T, generator=g) > 0.3
    wt = torch.randn(B, T, generator=g, dtype=torch.float64)
    out = full_vocab_divergence_from_hidden(h, w, ref_logits, None, name, mask, chunk_size=3, temperature=1.2)
    grads = torch.autograd.grad((out * wt).sum(), [h, ref_logits])
    ref = full_vocab_divergence(h @ w.T, ref_logits, name, mask, temperature=1.2)
    ref_grads = torch.autograd.grad((ref * wt).sum(), [h, ref_logits])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


def test_fused_hidden_path_gradients_only_where_required_and_errors():
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4)
    hr, wr = torch.randn(6, 3), torch.randn(9, 3)
    out = full_vocab_divergence_from_hidden(h, w, hr, wr, "js", chunk_size=4)
    (gh,) = torch.autograd.grad(out.sum(), h)
    assert gh.shape == h.shape and bool(torch.isfinite(gh).all())
    with pytest.raises(ValueError, match="vocabulary"):
        full_vocab_divergence_from_hidden(h, w, hr, wr[:5], "js")


@pytest.mark.parametrize(
    ("trl_beta", "name"), [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0.3, "generalized_jsd(0.7)")]
)
def test_matches_trl_chunked_divergence(trl_beta, name):
    """TRL 1.16's kernel (torch fallback on CPU): beta 0 = KL(teacher‖student), 1 = KL(student‖teacher),
    else the generalised JSD with TRL's beta = 1 − fdpo's β. Student = π, teacher = π_ref."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    g = torch.Generator().manual_seed(7)
    h = torch.randn(12, 8, generator=g).requires_grad_(True)
    w = (torch.randn(40, 8, generator=g) * 0.7).requires_grad_(True)
    hr, wr = torch.randn(12, 6, generator=g), torch.randn(40, 6, generator=g) * 0.7
    theirs, _ = ChunkedDivergenceFunction.apply(h, w, None, hr, wr, None, trl_beta)
    their_grads = torch.autograd.grad(theirs.sum(), [h, w])
    ours = full_vocab_divergence_from_hidden(h, w, hr, wr, name, chunk_size=5)
    our_grads = torch.autograd.grad(ours.sum(), [h, w])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- one new entry


def test_adding_a_divergence_is_one_class_and_every_path_uses_it():
    """Triangular discrimination f(u) = (u − 1)²/(u + 1): only f and f′ given; the registry, the
    generic full-vocabulary terms, the estimators and the table pick it up."""
    from dataclasses import dataclass

    from fdpo.divergences import format_divergence_table, ref_sample_generator_loss

    @dataclass(frozen=True, repr=False)
    class Triangular(Divergence):
        canonical = "triangular_test"
        aliases = ("tri_test",)
        formula = "(u − 1)² / (u + 1)"
        f_prime_formula = "(u − 1)(u + 3) / (u + 1)²"
        equals = "Σ (π − π_ref)² / (π + π_ref)"
        f_dpo_valid = False
        mass_covering = True

        def _f(self, logr):
            return torch.expm1(logr) ** 2 / (torch.exp(logr) + 1)

        def _f_prime(self, logr):
            u = torch.exp(logr)
            return torch.expm1(logr) * (u + 3) / (u + 1) ** 2

    try:
        register(Triangular)
        div = get_divergence("tri_test")
        z, zr, mask = _logits(8)
        out = full_vocab_divergence(z, zr, div, mask, chunk_size=3)
        p, q = z.softmax(-1), zr.softmax(-1)
        ref = (((p - q) ** 2) / (p + q)).sum(-1) * mask
        torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            torch.autograd.grad(out.sum(), z)[0], torch.autograd.grad(ref.sum(), z)[0], rtol=1e-9, atol=1e-12
        )
        assert "triangular_test" in format_divergence_table()
        lp = torch.tensor([-1.0, -2.0])
        assert torch.isfinite(ref_sample_generator_loss(lp, lp - 0.5, "triangular_test")).all()
    finally:
        _ENTRIES.pop("triangular_test", None)
        for alias in ("triangular_test", "tri_test"):
            _NAMES.pop(alias, None)
