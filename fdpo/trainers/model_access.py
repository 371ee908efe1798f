"""Reference-model context and LM-head access: the ONE place every trainer reads them from.

fdpo's full-vocabulary terms (f-SFT with γ > 0, GRPO ``estimator: full_vocab``, the token-level DPO
family) project final hidden states through the LM head chunk by chunk, outside the head's own
forward (docs/objectives.md §2, §4, §6: never the (batch, seq, vocab) logits). Under data parallelism
the head is an ordinary parameter. Under sharding it is not:

- FSDP2 keeps a parameter as a DTensor shard except inside the forward of its FSDP unit (the head
  belongs to the root unit). `in_forward` runs the computation inside the wrapper's forward (TRL's
  forward redirection), where the root unit's parameters are unsharded plain tensors: the chunks
  read the full head and its gradient lands on the unsharded parameter, which FSDP reduce-scatters
  into the shard exactly as for the model's own forward. Outside that, a DTensor head is gathered
  with ``full_tensor()`` for reading only (no gradient: the reference's head).
- DeepSpeed ZeRO-3 partitions every parameter to ``numel 0`` outside its module's forward. The same
  `in_forward` arms ZeRO-3's hooks (its gradient reduction relies on them), and `lm_head` gathers
  the head with ``deepspeed.zero.GatheredParameters`` and hands the chunks a full copy whose
  gradient flows back to the partitioned parameter (`_GatheredCopy`), so a backward pass that
  recomputes the chunks still finds the full weight after the gather context has closed.

Without sharding, `in_forward` calls the function directly and `lm_head` returns the parameters
themselves: the numbers of a DDP or single-process run are those of a direct call.

Reference context (`reference_forward`): a separate reference model, or under PEFT the policy with
the adapter named ``"ref"`` active when there is one (TRL's convention), else with every adapter
disabled; no grad, gradient checkpointing off, accelerate's autocast.

Plain head check (`check_plain_head`, `check_plain_logits`): the chunked projection is h·Wᵀ + b; a
model that scales or soft-caps its logits would be regularised on the wrong distribution, so it is
refused with the key named.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from trl.models.utils import _ForwardRedirection, disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

#: config keys of transformers models whose logits are not h·Wᵀ + b when set (≠ 1 / not None)
LOGIT_TRANSFORM_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
#: the adapter that PEFT trainers (TRL's and fdpo's) use as the reference when a model carries it
REF_ADAPTER = "ref"

_redirect = _ForwardRedirection()


# ------------------------------------------------------------------------------------------------
# the model behind the wrappers
# ------------------------------------------------------------------------------------------------


def causal_lm(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The causal-LM module that carries the LM head: unwrapped from DDP/FSDP/DeepSpeed, and the
    PEFT base model under PEFT."""
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped


def backbone(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack whose ``last_hidden_state`` the LM head projects (TRL's fused head uses it too)."""
    return causal_lm(accelerator, model).base_model


def sharding(accelerator: Any) -> str | None:
    """``"fsdp"``, ``"zero3"`` or None: whether parameters are sharded outside their module's forward."""
    state = accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None and str(state.distributed_type).endswith("FSDP"):
        return "fsdp"
    ds = getattr(state, "deepspeed_plugin", None)
    if ds is not None and getattr(ds, "zero_stage", 0) == 3:
        return "zero3"
    return None


def in_forward(accelerator: Any, wrapped: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, run inside ``wrapped``'s forward when parameters are sharded, so FSDP
    unshards the root unit (LM head included) and registers its gradient reduction, and ZeRO-3 arms
    its hooks; a direct call otherwise. ``wrapped`` is what the trainer calls (``model`` in
    ``compute_loss``, or the prepared reference model)."""
    if sharding(accelerator) is None:
        return fn(*args, **kwargs)
    return _redirect(wrapped, accelerator.unwrap_model(wrapped), fn, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# the LM head
# ------------------------------------------------------------------------------------------------


def _is_partitioned(p: torch.Tensor | None) -> bool:
    """A DeepSpeed ZeRO-3 parameter (it carries ``ds_id``)."""
    return p is not None and hasattr(p, "ds_id")


class _GatheredCopy(torch.autograd.Function):
    """A full copy of a gathered ZeRO-3 parameter; its gradient (full shape) goes to the parameter."""

    @staticmethod
    def forward(ctx, p: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return p.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def _zero3_gather(params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    # deepspeed is an optional extra (`pip install -e ".[deepspeed]"`): imported only when a model has ZeRO-3 params
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = {id(p): p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE}
    if not todo:  # tied embeddings: already gathered by the embedding's own forward
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(todo.values()))


@contextlib.contextmanager
def lm_head(
    accelerator: Any, model: torch.nn.Module, *, gather: Callable[[list], Any] = _zero3_gather
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight (V, H), bias (V,) or None) of ``model``'s LM head, full, for the chunked projections.

    Plain parameters are returned as they are. A ZeRO-3 head is gathered for the duration of the
    context and returned as a full copy that passes its gradient to the partitioned parameter
    (``gather`` is the gathering context; tests pass a stand-in). A DTensor head (FSDP2 outside the
    root unit's forward) is gathered with ``full_tensor()`` for reading: its gradient would skip
    FSDP's reduction, so a DTensor head that needs one is an error (run the computation through
    `in_forward`, where the root unit's head is unsharded).
    """
    head = causal_lm(accelerator, model).get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        if torch.is_grad_enabled() and weight.requires_grad:
            raise RuntimeError(
                "fdpo: the LM head is an FSDP shard (DTensor) where its gradient is needed; run the computation "
                "through fdpo.trainers.model_access.in_forward (the root FSDP unit then holds the full head). If the "
                "head is its own FSDP unit, wrap it with the root module instead."
            )
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
        yield weight, bias
        return
    if not _is_partitioned(weight):
        yield weight, bias
        return
    with gather([p for p in (weight, bias) if p is not None]):
        copy = _GatheredCopy.apply if torch.is_grad_enabled() else (lambda p: p.detach().clone())
        yield copy(weight), (None if bias is None else copy(bias))


# ------------------------------------------------------------------------------------------------
# the reference model
# ------------------------------------------------------------------------------------------------


def reference_adapter(peft_model: Any) -> str | None:
    """The adapter that makes a PEFT model the reference: ``"ref"`` when it has one, else None (all disabled)."""
    return REF_ADAPTER if REF_ADAPTER in getattr(peft_model, "peft_config", {}) else None


@contextlib.contextmanager
def reference_forward(
    accelerator: Any,
    model: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    *,
    gradient_checkpointing_kwargs: dict | None = None,
    autocast: bool = True,
) -> Iterator[torch.nn.Module]:
    """Yield the (wrapped) module to call as π_ref, under no grad: ``ref_model`` when given, else
    ``model`` with the PEFT adapter ``"ref"`` active or every adapter disabled (gradient
    checkpointing off for it); neither (TRL precomputing reference log-probs from the initial
    policy): ``model`` as it is."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if ref_model is not None:
            target = ref_model
        else:
            unwrapped = accelerator.unwrap_model(model)
            if is_peft_model(unwrapped):
                stack.enter_context(disable_gradient_checkpointing(unwrapped, gradient_checkpointing_kwargs))
                stack.enter_context(use_adapter(unwrapped, adapter_name=reference_adapter(unwrapped)))
            target = model
        if autocast:
            stack.enter_context(accelerator.autocast())
        yield target


# ------------------------------------------------------------------------------------------------
# are the logits plain h·Wᵀ + b?
# ------------------------------------------------------------------------------------------------


def check_plain_head(config: Any, what: str) -> None:
    """Raise ValueError naming the config key when the model transforms its logits (scaling,
    soft-capping): the chunked projection computes h·Wᵀ + b only. ``what`` names the fdpo option."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in LOGIT_TRANSFORM_KEYS:
        value = getattr(text_config, key, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"{what} is not supported for models with `{key}` = {value} "
                f"({getattr(text_config, 'model_type', '?')}): the chunked divergence projects h·Wᵀ + b only."
            )


def check_plain_logits(
    last_hidden: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, what: str
) -> None:
    """Raise NotImplementedError unless ``logits`` equal ``last_hidden``·Wᵀ + b (float tolerance):
    the runtime form of `check_plain_head` for models whose config does not tell."""
    with torch.no_grad():
        mine = torch.nn.functional.linear(last_hidden.to(weight.dtype), weight, bias).float()
        theirs = logits.float()
        if not torch.allclose(mine, theirs, rtol=1e-2, atol=1e-2 * float(theirs.abs().max().clamp_min(1))):
            raise NotImplementedError(
                f"{what}: this model's logits are not `lm_head(last hidden state)` (logit scaling or soft-capping); "
                "the chunked divergence projects h·Wᵀ + b only."
            )
