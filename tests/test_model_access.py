"""fdpo/trainers/model_access.py: the reference context, the LM head, the plain-head check.

- reference context: a PEFT model with a "ref" adapter is the reference with "ref" active (TRL's convention),
  without one with every adapter disabled; the trainer's own adapter is active again afterwards; f-SFT's
  reference hidden states are those (it used `disable_adapter()` before, ignoring "ref");
- LM head under ZeRO-3, with a stand-in for DeepSpeed's partitioned parameters (deepspeed is not installed
  here): outside the gather the parameter holds no data; the chunked full-vocabulary divergence (whose
  backward recomputes the projections from the gathered copy) gives the value and the LM-head gradient
  of the unpartitioned head (autograd of the exact divergence on full logits as truth). What real
  DeepSpeed does between forward and backward (re-gathering for the gradient reduction) is not tested;
- plain head: a config that scales or soft-caps logits is refused with the key named; logits that are not
  h·Wᵀ + b are refused at run time.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from fdpo.divergences import full_vocab_divergence_from_hidden
from fdpo.trainers.model_access import (
    check_plain_head,
    check_plain_logits,
    lm_head,
    reference_adapter,
    reference_forward,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Acc:
    """The two accelerate methods model_access uses, for an unwrapped single-process model."""

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def _peft(tiny_model_dir, with_ref: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(**cfg))
    if with_ref:
        model.add_adapter("ref", LoraConfig(**cfg))
    model.set_adapter("default")
    return model


@pytest.mark.parametrize("with_ref", [True, False])
def test_reference_forward_is_the_ref_adapter_or_the_base(tiny_model_dir, with_ref):
    model = _peft(tiny_model_dir, with_ref)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    policy = model(input_ids=ids).logits
    if with_ref:
        model.set_adapter("ref")
        truth = model(input_ids=ids).logits
        model.set_adapter("default")
    else:
        with model.disable_adapter():
            truth = model(input_ids=ids).logits
    assert reference_adapter(model) == ("ref" if with_ref else None)
    with reference_forward(_Acc(), model, None) as ref:
        got = ref(input_ids=ids).logits
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got, truth)
    assert (got - policy).abs().max() > 1e-4  # the adapters differ, so the check is not vacuous
    torch.testing.assert_close(model(input_ids=ids).logits, policy)  # the policy adapter is back
    other = object()
    with reference_forward(_Acc(), model, other) as ref:
        assert ref is other


def test_fsft_reference_honours_the_ref_adapter(tiny_model_dir, task_data_dir, tmp_path):
    from datasets import load_dataset
    from trainer_args import CPU_TRAINER_ARGS
    from transformers import AutoTokenizer

    from fdpo.trainers.sft import FSFTConfig, FSFTTrainer

    model = _peft(tiny_model_dir, with_ref=True)
    data = load_dataset("json", data_files=str(task_data_dir / "sft.jsonl"), split="train").select(range(8))
    args = FSFTConfig(output_dir=str(tmp_path), divergence_coef=0.5, max_length=32, per_device_train_batch_size=4,
                      **CPU_TRAINER_ARGS)
    trainer = FSFTTrainer(model=model, args=args, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    batch = next(iter(trainer.get_train_dataloader()))
    got = trainer._reference_hidden(batch)
    inner = model.get_base_model().base_model
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    with torch.no_grad():
        model.set_adapter("ref")
        truth = inner(**kwargs).last_hidden_state
        model.set_adapter("default")
        with model.disable_adapter():
            base = inner(**kwargs).last_hidden_state
    torch.testing.assert_close(got, truth)
    assert (got - base).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# ZeRO-3 stand-in
# ------------------------------------------------------------------------------------------------


class _WithHead(torch.nn.Module):
    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def get_output_embeddings(self):
        return self.head


class _Status:
    AVAILABLE = "available"
    NOT_AVAILABLE = "not_available"


def _partition(p: torch.nn.Parameter) -> None:
    """What ZeRO-3 does to a parameter outside its module's forward: keep the object, drop its data."""
    p.ds_full = p.data
    p.data = torch.empty(0, dtype=p.dtype)
    p.ds_id, p.ds_status = id(p), _Status.NOT_AVAILABLE


@contextlib.contextmanager
def _gathered(params):
    """Stand-in for deepspeed.zero.GatheredParameters(params): the full data inside, none after."""
    for p in params:
        p.data, p.ds_status = p.ds_full, _Status.AVAILABLE
    try:
        yield
    finally:
        for p in params:
            p.ds_full = p.data
            p.data, p.ds_status = torch.empty(0, dtype=p.dtype), _Status.NOT_AVAILABLE


def test_zero3_head_is_gathered_and_its_gradient_reaches_the_partitioned_weight():
    torch.manual_seed(0)
    vocab, width, rows = 37, 8, 6
    head = torch.nn.Linear(width, vocab, bias=True)
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    hidden = torch.randn(rows, width, requires_grad=True)
    ref_hidden, ref_w = torch.randn(rows, width), torch.randn(vocab, width)
    upstream = torch.randn(rows)

    # truth: autograd of the exact divergence (forward KL of TDPO, per position) on the full logits
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    h = hidden.detach().clone().requires_grad_()
    logp, logq = (h @ w.T + b).log_softmax(-1), (ref_hidden @ ref_w.T).log_softmax(-1)
    truth = (logq.exp() * (logq - logp)).sum(-1)
    (truth * upstream).sum().backward()

    _partition(head.weight)
    _partition(head.bias)
    seen = {}
    for name, p in (("weight", head.weight), ("bias", head.bias)):  # what ZeRO-3 reduces: the accumulated grad
        p.register_post_accumulate_grad_hook(lambda p, name=name: seen.__setitem__(name, p.grad.clone()))
    model = _WithHead(head)
    with lm_head(_Acc(), model, gather=_gathered) as (weight, bias):
        assert weight.shape == (vocab, width) and bias.shape == (vocab,)
        value = full_vocab_divergence_from_hidden(hidden, weight, ref_hidden, ref_w, "forward_kl",
                                                  lm_head_bias=bias, chunk_size=2)
    assert head.weight.numel() == 0  # partitioned again between forward and backward
    # ZeRO-3's own hooks (armed because fdpo runs this inside the wrapper's forward, `in_forward`) re-gather
    # the parameter for the backward in which its gradient is reduced; the chunks recompute from the copy
    for p in (head.weight, head.bias):
        p.data = p.ds_full
    (value * upstream).sum().backward()
    torch.testing.assert_close(value.detach(), truth.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["weight"], w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(seen["bias"], b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hidden.grad, h.grad, rtol=1e-4, atol=1e-6)


def test_plain_parameters_are_returned_as_they_are():
    head = torch.nn.Linear(4, 9)
    with lm_head(_Acc(), _WithHead(head)) as (weight, bias):
        assert weight is head.weight and bias is head.bias


# ------------------------------------------------------------------------------------------------
# plain h·Wᵀ + b
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.5)])
def test_logit_transforms_are_refused_with_the_key_named(key, value):
    config = SimpleNamespace(model_type="x", **{key: value})
    with pytest.raises(ValueError, match=key):
        check_plain_head(config, "option")
    check_plain_head(SimpleNamespace(model_type="x", logit_scale=1.0), "option")  # 1 is plain


def test_runtime_check_compares_the_logits_with_the_projection():
    torch.manual_seed(0)
    h, w, b = torch.randn(3, 4), torch.randn(7, 4), torch.randn(7)
    check_plain_logits(h, h @ w.T + b, w, b, "option")
    with pytest.raises(NotImplementedError, match="soft-capping"):
        check_plain_logits(h, 30 * torch.tanh((h @ w.T + b) / 30) * 0.5, w, b, "option")
