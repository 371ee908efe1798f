"""Token masks for SparsePO, computed from the REFERENCE model (docs/objectives.md §4).

Learned ("sparse", SparsePO, Findings of EMNLP 2025): for each transformer layer ℓ = 1..L (not the
embeddings), at the position that predicts token t,

    g_ℓ = ReLU(w_ℓ · LayerNorm(h_ℓ) + b_ℓ)          (one LayerNorm shared across layers)
    m_t = ReLU(Σ_ℓ v_ℓ g_ℓ)                          (bias-free mixer)

`SparseTokenMask` is one such network; `TokenMaskNetworks` holds one ("common": m^u = m^d) or one per
target ("independent"), for the targets asked for (reward, KL or both; an unmasked target gets all ones).
Masks are ≥ 0 and not detached: they train with the policy (L1 in the loss, weight decay in the optimizer).

Activation-based ("activations", MaPO): per token, the feature-mean of each reference activation (MLP
outputs, attention outputs, residual stream per layer, and the logits), min–max scaled to [0, 1] over
the completion tokens of its sequence, averaged over layers within a type and then across types;
detached; one mask for reward and KL. A constant activation over the completion (e.g. a one-token
completion) scales to 1 (no evidence to down-weight the token); rows with no completion token give 0;
nothing divides by zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

MASK_TARGETS = ("reward", "kl")


class SparseTokenMask(nn.Module):
    """m_t = ReLU(Σ_ℓ v_ℓ ReLU(w_ℓ · LN(h_ℓ,t) + b_ℓ)), one shared LayerNorm, bias-free mixer."""

    def __init__(self, hidden_size: int, num_layers: int, *, init_bias: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.weight = nn.Parameter(torch.empty(num_layers, hidden_size))  # w_ℓ: Linear(h, 1) per layer
        self.bias = nn.Parameter(torch.full((num_layers,), float(init_bias)))  # b_ℓ
        self.mixer = nn.Linear(num_layers, 1, bias=False)  # v_ℓ
        nn.init.normal_(self.weight, std=hidden_size**-0.5)
        nn.init.constant_(self.mixer.weight, 1.0 / num_layers)
        self.num_layers = num_layers

    def forward(self, layer_states: Sequence[Tensor] | Tensor) -> Tensor:
        """``layer_states``: L tensors (..., H) (or one (L, ..., H) tensor) → mask (...) ≥ 0, fp32."""
        stacked = layer_states if isinstance(layer_states, Tensor) else torch.stack(tuple(layer_states))
        if stacked.shape[0] != self.num_layers:
            raise ValueError(f"mask network built for {self.num_layers} layers, got {stacked.shape[0]}")
        x = self.norm(stacked.to(self.weight.dtype))  # (L, ..., H)
        g = torch.relu(torch.einsum("l...h,lh->...l", x, self.weight) + self.bias)  # (..., L)
        return torch.relu(self.mixer(g).squeeze(-1))


class TokenMaskNetworks(nn.Module):
    """The learned masks of one SparsePO run: ``mode`` "common" (one network for every target) or
    "independent" (one network per target); ``targets`` ⊆ {"reward", "kl"}."""

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        *,
        mode: str = "common",
        targets: Sequence[str] = MASK_TARGETS,
    ) -> None:
        super().__init__()
        if mode not in ("common", "independent"):
            raise ValueError(f"mask_mode must be 'common' or 'independent', got {mode!r}")
        targets = tuple(targets)
        bad = [t for t in targets if t not in MASK_TARGETS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"mask_targets must be a non-empty subset of {list(MASK_TARGETS)}, got {list(targets)}"
            )
        self.mode, self.targets = mode, targets
        names = ("common",) if mode == "common" else targets
        self.nets = nn.ModuleDict({n: SparseTokenMask(hidden_size, num_layers) for n in names})

    @property
    def shared(self) -> bool:
        """Whether reward and KL use the same mask (both masked by one network)."""
        return self.mode == "common" and len(self.targets) == 2

    def forward(self, layer_states: Sequence[Tensor] | Tensor) -> dict[str, Tensor]:
        """{target: mask} for the masked targets; with "common" every target maps to the same tensor."""
        stacked = layer_states if isinstance(layer_states, Tensor) else torch.stack(tuple(layer_states))
        if self.mode == "common":
            m = self.nets["common"](stacked)
            return dict.fromkeys(self.targets, m)
        return {t: self.nets[t](stacked) for t in self.targets}


def minmax_over_completion(values: Tensor, completion_mask: Tensor) -> Tensor:
    """Per row, (x − min)/(max − min) over the completion positions; 1 where max = min; 0 off the
    completion (and on rows with no completion token). Never NaN for finite input."""
    cm = completion_mask.to(torch.bool)
    x = values.float()
    big = torch.finfo(x.dtype).max
    lo = torch.where(cm, x, big).amin(dim=-1, keepdim=True)
    hi = torch.where(cm, x, -big).amax(dim=-1, keepdim=True)
    span = hi - lo
    flat = ~(span > 0)  # also catches rows without completion tokens (span = −inf after the sentinel)
    scaled = (x - torch.where(flat, x, lo)) / torch.where(flat, torch.ones_like(span), span)
    scaled = torch.where(flat, torch.ones_like(x), scaled)
    return torch.where(cm, scaled.clamp(0.0, 1.0), torch.zeros_like(x))


@torch.no_grad()
def activation_mask(activations: dict[str, Sequence[Tensor]], completion_mask: Tensor) -> Tensor:
    """MaPO mask: ``activations`` maps a type ("mlp", "attention", "residual", "logits") to per-layer
    tensors (..., T, F) (or already feature-averaged (..., T)); each is reduced to its feature mean,
    min–max scaled over the completion, averaged within its type, then across types. Detached."""
    per_type = []
    for layers in activations.values():
        scaled = [
            minmax_over_completion(
                a.float().mean(dim=-1) if a.dim() == completion_mask.dim() + 1 else a, completion_mask
            )
            for a in layers
        ]
        if not scaled:
            continue
        per_type.append(torch.stack(scaled).mean(dim=0))
    if not per_type:
        raise ValueError(f"activation_mask needs at least one activation, got types {list(activations)}")
    return torch.stack(per_type).mean(dim=0)
