"""Token-level losses (TDPO1, TDPO2, SparsePO) and token masks, against independent truth.

- KL_t = KL(π_ref ‖ π) per position equals a direct float64 sum over the vocabulary (from logits and from
  hidden states + LM head), including its gradient.
- All-ones masks with no L1 reproduce TDPO1 computed here from the paper's formula (−log σ(u − δ)).
- TDPO2: the value from the formula, and autograd shows no gradient into the chosen KL and α·β·σ(−βz)
  into the rejected KL.
- L1 terms (halved for a shared mask); gradients reach every mask parameter; the mask network equals a
  hand-written evaluation of its formula.
- MaPO min–max masks: one-token completions and fully padded rows are finite; detached.
"""

from __future__ import annotations

import pytest
import torch

from fdpo.losses.token_level import (
    sequential_divergence,
    sequential_divergence_from_hidden,
    token_level_loss,
    token_rewards,
)
from fdpo.losses.token_masks import (
    SparseTokenMask,
    TokenMaskNetworks,
    activation_mask,
    minmax_over_completion,
)


def _completion_mask(lengths: list[int], prompt: int, width: int) -> torch.Tensor:
    m = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        m[i, prompt : prompt + n] = True
    return m


def _batch(seed: int, pairs: int = 3, width: int = 7):
    g = torch.Generator().manual_seed(seed)
    cm = _completion_mask([4, 2, 5, 3, 1, 5][: 2 * pairs], 1, width)
    logp = -torch.rand(2 * pairs, width, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(2 * pairs, width, generator=g, dtype=torch.float64) * 3
    kl = torch.rand(2 * pairs, width, generator=g, dtype=torch.float64)
    return cm, logp, ref, kl


def _direct_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π) = Σ_v π_ref(v) (log π_ref(v) − log π(v)), in float64, by hand."""
    lp = policy_logits.double() - torch.logsumexp(policy_logits.double(), dim=-1, keepdim=True)
    lq = ref_logits.double() - torch.logsumexp(ref_logits.double(), dim=-1, keepdim=True)
    return (lq.exp() * (lq - lp)).sum(dim=-1)


def test_sequential_kl_equals_direct_float64_sum():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(2, 5, 13, generator=g) * 3).requires_grad_(True)
    zr = torch.randn(2, 5, 13, generator=g) * 3
    cm = _completion_mask([3, 5], 0, 5)
    got = sequential_divergence(z, zr, cm, chunk_size=3)
    truth = _direct_kl(z, zr) * cm
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-6)
    w = torch.randn(2, 5, generator=g)
    (g_got,) = torch.autograd.grad((got * w).sum(), z)
    zd = z.detach().double().requires_grad_(True)
    (g_true,) = torch.autograd.grad((_direct_kl(zd, zr) * cm * w.double()).sum(), zd)
    torch.testing.assert_close(g_got.double(), g_true, rtol=1e-4, atol=1e-6)


def test_sequential_kl_from_hidden_equals_direct_sum():
    g = torch.Generator().manual_seed(1)
    h, hr = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    w, wr = torch.randn(17, 6, generator=g), torch.randn(17, 6, generator=g)
    h.requires_grad_(True)
    cm = _completion_mask([2, 4], 0, 4)
    got = sequential_divergence_from_hidden(h, w, hr, wr, cm, chunk_size=2)
    truth = _direct_kl(h @ w.T, hr @ wr.T) * cm
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-5)
    assert got.sum().requires_grad


def _tdpo_by_hand(cm, logp, ref, kl, beta, alpha=None):
    """TDPO (Zeng et al. 2024): u = β Σ log(π/π_ref)(w) − β Σ log(π/π_ref)(l); δ = β KL_seq(l) − β KL_seq(w);
    TDPO1 −log σ(u − δ), TDPO2 −log σ(u − α δ₂) with δ₂ = β KL_seq(l) − sg(β KL_seq(w))."""
    c = cm.double()
    seq_r = ((logp - ref) * c).sum(1)
    seq_kl = (kl * c).sum(1)
    rw, rl = seq_r.chunk(2)
    kw, kl_ = seq_kl.chunk(2)
    u = beta * rw - beta * rl
    if alpha is None:
        delta = beta * kl_ - beta * kw
        return -torch.log(torch.sigmoid(u - delta))
    delta2 = beta * kl_ - (beta * kw).detach()
    return -torch.log(torch.sigmoid(u - alpha * delta2))


@pytest.mark.parametrize("seed", [0, 1])
def test_all_ones_masks_without_l1_reproduce_tdpo1(seed):
    cm, logp, ref, kl = _batch(seed)
    beta = 0.7
    truth = _tdpo_by_hand(cm, logp, ref, kl, beta)
    r = token_rewards(logp, ref, cm)
    tdpo1, _ = token_level_loss(r, kl, cm, beta=beta, objective="tdpo1")
    ones = torch.ones_like(kl)
    sparse, _ = token_level_loss(
        r, kl, cm, beta=beta, objective="sparsepo", reward_mask=ones, kl_mask=ones, l1_reward=0.0, l1_kl=0.0
    )
    torch.testing.assert_close(tdpo1.double(), truth, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.double(), truth, rtol=1e-12, atol=1e-12)


def test_tdpo2_value_and_stop_gradient_on_chosen_kl():
    cm, logp, ref, kl = _batch(3)
    beta, alpha = 0.5, 0.5
    kl = kl.clone().requires_grad_(True)
    loss, metrics = token_level_loss(
        token_rewards(logp, ref, cm), kl, cm, beta=beta, objective="tdpo2", tdpo_alpha=alpha
    )
    torch.testing.assert_close(loss, _tdpo_by_hand(cm, logp, ref, kl.detach(), beta, alpha))
    (grad,) = torch.autograd.grad(loss.sum(), kl)
    pairs = loss.shape[0]
    assert torch.all(grad[:pairs] == 0), "the chosen KL must get no gradient in TDPO2"
    # d/dKL_l,t of softplus(−βz), z = ... − α KL_seq(l): αβ σ(−βz) on the rejected completion tokens
    expected = (alpha * beta * torch.sigmoid(-beta * metrics["z"])).unsqueeze(1) * cm[pairs:].double()
    torch.testing.assert_close(grad[pairs:], expected)
    # TDPO1 does send gradient into the chosen KL (−β σ(−βz))
    (g1,) = torch.autograd.grad(
        token_level_loss(token_rewards(logp, ref, cm), kl, cm, beta=beta, objective="tdpo1")[0].sum(), kl
    )
    assert torch.all(g1[:pairs][cm[:pairs]] < 0)


def test_l1_terms_and_halving_for_a_shared_mask():
    cm, logp, ref, kl = _batch(4)
    r = token_rewards(logp, ref, cm)
    g = torch.Generator().manual_seed(0)
    mu, md = (
        torch.rand(kl.shape, generator=g, dtype=torch.float64),
        torch.rand(kl.shape, generator=g, dtype=torch.float64),
    )
    base, _ = token_level_loss(r, kl, cm, beta=1.0, reward_mask=mu, kl_mask=md)
    c = cm.double()
    z = ((mu * r * c).sum(1).chunk(2)[0] - (mu * r * c).sum(1).chunk(2)[1]) + (
        (md * kl * c).sum(1).chunk(2)[0] - (md * kl * c).sum(1).chunk(2)[1]
    )
    torch.testing.assert_close(base, -torch.log(torch.sigmoid(z)))
    l1u = sum((mu * c).chunk(2)).sum(1)
    l1d = sum((md * c).chunk(2)).sum(1)
    with_l1, _ = token_level_loss(r, kl, cm, beta=1.0, reward_mask=mu, kl_mask=md, l1_reward=0.3, l1_kl=0.2)
    torch.testing.assert_close(with_l1, base + 0.3 * l1u + 0.2 * l1d)
    shared, _ = token_level_loss(
        r, kl, cm, beta=1.0, reward_mask=mu, kl_mask=mu, l1_reward=0.3, l1_kl=0.2, shared_mask=True
    )
    base_shared, _ = token_level_loss(r, kl, cm, beta=1.0, reward_mask=mu, kl_mask=mu)
    torch.testing.assert_close(shared, base_shared + 0.5 * (0.3 + 0.2) * l1u)
    assert torch.isfinite(token_level_loss(r * 1e3, kl * 1e3, cm, beta=1.0)[0]).all()


def test_mask_network_formula_and_gradients():
    torch.manual_seed(0)
    layers, hidden, n = 3, 8, 10
    net = SparseTokenMask(hidden, layers)
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.normal_()
        net.mixer.weight.normal_()
    states = torch.randn(layers, n, hidden) * 4 + 1
    got = net(states)
    by_hand = torch.zeros(n)
    with torch.no_grad():  # the formula by hand, on the same parameters (values only)
        _mask_by_hand(net, states, layers, n, by_hand)
    torch.testing.assert_close(got.detach(), by_hand, rtol=1e-5, atol=1e-5)
    assert (got >= 0).all()


def _mask_by_hand(net, states, layers, n, by_hand):
    for t in range(n):
        total = 0.0
        for ell in range(layers):
            x = states[ell, t]
            x = (x - x.mean()) / torch.sqrt(
                x.var(unbiased=False) + net.norm.eps
            ) * net.norm.weight + net.norm.bias
            total = total + net.mixer.weight[0, ell] * max(float(x @ net.weight[ell] + net.bias[ell]), 0.0)
        by_hand[t] = max(float(total), 0.0)


@pytest.mark.parametrize(
    "mode,targets",
    [
        ("common", ["reward", "kl"]),
        ("independent", ["reward", "kl"]),
        ("common", ["reward"]),
        ("independent", ["kl"]),
    ],
)
def test_gradients_flow_into_every_mask_parameter(mode, targets):
    torch.manual_seed(1)
    cm, logp, ref, kl = _batch(5)
    nets = TokenMaskNetworks(8, 2, mode=mode, targets=targets)
    with torch.no_grad():  # positive mixer and bias: no ReLU is dead on every token
        for net in nets.nets.values():
            net.bias.fill_(1.0)
            net.mixer.weight.fill_(1.0)
    states = torch.randn(2, *cm.shape, 8)
    masks = nets(states)
    assert set(masks) == set(targets)
    loss, _ = token_level_loss(
        token_rewards(logp, ref, cm).float(),
        kl.float(),
        cm,
        beta=0.5,
        reward_mask=masks.get("reward"),
        kl_mask=masks.get("kl"),
        l1_reward=0.01,
        l1_kl=0.01,
        shared_mask=nets.shared,
    )
    loss.mean().backward()
    assert len(nets.nets) == (1 if mode == "common" else len(targets))
    for name, p in nets.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_minmax_mask_one_token_and_padded_rows_are_finite():
    cm = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    x = torch.tensor([[9.0, 2.0, 4.0, 3.0, -7.0], [1.0, 1.0, 5.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    m = minmax_over_completion(x, cm)
    assert torch.isfinite(m).all()
    torch.testing.assert_close(
        m[0], torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0])
    )  # prompt/pad excluded from min/max
    torch.testing.assert_close(m[1], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))  # one token: constant → 1
    torch.testing.assert_close(m[2], torch.zeros(5))  # fully padded row
    acts = {
        "mlp": [torch.randn(3, 5, 4, requires_grad=True) for _ in range(2)],
        "logits": [torch.randn(3, 5)],
    }
    mask = activation_mask(acts, cm)
    assert torch.isfinite(mask).all() and not mask.requires_grad
    assert ((mask >= 0) & (mask <= 1)).all() and (mask[~cm] == 0).all()
    # pairs (row 0 vs padded row 2) and (one-token row 1 vs row 1): finite loss and gradients
    order = torch.tensor([0, 1, 2, 1])
    r = torch.randn(4, 5, requires_grad=True)
    loss, _ = token_level_loss(
        r, torch.rand(4, 5), cm[order], beta=1.0, reward_mask=mask[order], kl_mask=mask[order]
    )
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(r.grad).all()


def test_activation_mask_averages_types_after_minmax():
    cm = torch.tensor([[1, 1, 1]], dtype=torch.bool)
    a = torch.tensor([[[0.0], [1.0], [2.0]]])  # feature mean 0, 1, 2 → 0, .5, 1
    b = torch.tensor([[10.0, 0.0, 10.0]])  # → 1, 0, 1
    got = activation_mask({"mlp": [a, a], "logits": [b]}, cm)
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.25, 1.0]]))


def test_rejects_masks_for_tdpo_and_bad_shapes():
    cm, _, _, kl = _batch(6)
    with pytest.raises(ValueError, match="no token masks"):
        token_level_loss(kl, kl, cm, beta=1.0, objective="tdpo1", reward_mask=torch.ones_like(kl))
    with pytest.raises(ValueError, match="same"):
        token_level_loss(kl[:, :3], kl, cm, beta=1.0)
    with pytest.raises(ValueError, match="mask_targets"):
        TokenMaskNetworks(4, 2, targets=["rewards"])
