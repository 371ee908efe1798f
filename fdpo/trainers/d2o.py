"""`FD2OTrainer`: D2O (negatives only) on top of TRL's DPOTrainer.

Loss (D2O, "Negating Negatives", Findings of EMNLP 2024; docs/objectives.md §5): for prompt x with a
dispreferred y_l and K completions y_1..y_K sampled once from the frozen reference,
−log σ((β/K) Σ_k ℓ(y_k) − α ℓ(y_l)), ℓ = log π − log π_ref summed over the completion. The math
lives in `fdpo.losses.d2o`; this class prepares the data and gathers sequence log-probabilities.

Why a DPOTrainer subclass (and not a lean Trainer): D2O needs exactly what DPOTrainer already
provides around its loss: sequence log-probs of several completions of one prompt through TRL's
fused LM head (per-token log-probs gathered in chunks, no (batch, seq, vocab) logits), the reference
handled as a separate model, or as the LoRA base with the adapter disabled, with gradient
checkpointing switched off for it, and `precompute_ref_log_probs` (with its dataset cache and
DeepSpeed inference engine). Since the K samples are fixed before training, precomputing the
reference log-probs is exact, and it is the default here: no reference model is kept in memory.
What changes is small and local:

- `_prepare_dataset`: draws (or reuses) the K reference samples per distinct prompt
  (`fdpo.data.reference_samples`: cached beside the run with the sampling settings, tokenizer and
  reference fingerprints; a mismatching cache is an error) and tokenises prompt / rejected / samples;
- the collator puts the K sample rows of each prompt first, then the rejected rows: B·(K+1) rows;
- `compute_ref_log_probs` returns ((B, K), (B,)) instead of (chosen, rejected); TRL's precompute stores
  the samples' reference log-probs in its `ref_chosen_logps` column (a list of K per row);
- `_compute_loss` calls `fdpo.losses.d2o.d2o_loss`.

The samples are drawn from the model passed to the trainer before any step (the reference); with a
model name, it is loaded once here and handed to TRL (not loaded twice). Sampling runs on the main
process (the others wait and read the cache); for very large models, produce the cache beforehand
(same settings) so that training only reads it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import PartialState
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOConfig, DPOTrainer
from trl.data_utils import common_prefix_length, is_conversational
from trl.trainer.utils import create_model_from_path, pad

from fdpo.data.reference_samples import SamplingSettings, load_or_generate_reference_samples, prompt_key
from fdpo.losses.d2o import d2o_loss
from fdpo.trainers.guards import check_finite_terms
from fdpo.trainers.model_access import reference_forward

_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_samples_logps", "ref_rejected_logps"})
_TRL_DEFAULT_ALPHA_COEF = 0.5


@dataclass
class FD2OConfig(DPOConfig):
    """Configuration of `FD2OTrainer`: every field of `trl.DPOConfig` (β is `beta`), plus D2O's own.

    TRL's `loss_type`, `f_divergence_type`, `ld_alpha` and `use_weighting` do not apply and must stay
    at their defaults. `precompute_ref_log_probs` defaults to True (the samples are fixed, so the
    reference log-probs can be computed once and no reference model stays in memory).
    """

    d2o_alpha: float = field(
        default=0.1,
        metadata={"help": "α of D2O: weight of the negative's log-ratio ℓ(y_l) (0.1 in the paper)."},
    )
    num_reference_samples: int = field(
        default=11,
        metadata={
            "help": "K: completions sampled once from the frozen reference per prompt (11 in the paper)."
        },
    )
    sample_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of the reference samples (> 0)."}
    )
    sample_top_p: float = field(default=1.0, metadata={"help": "Nucleus top-p of the reference samples."})
    sample_max_new_tokens: int = field(
        default=256, metadata={"help": "Maximum length of each reference sample, in tokens."}
    )
    sample_batch_size: int = field(
        default=64, metadata={"help": "Sequences generated per batch while drawing the reference samples."}
    )
    samples_path: str | None = field(
        default=None,
        metadata={
            "help": "Cache file of the reference samples (JSONL + `.meta.json` sidecar). Default: "
            "`<output_dir>/d2o_reference_samples.<split>.jsonl`. A cache made with other sampling settings, "
            "tokenizer, reference or prompts is an error (see `regenerate_samples`)."
        },
    )
    regenerate_samples: bool = field(
        default=False,
        metadata={
            "help": "Sample again and overwrite the cache even if one exists (e.g. after changing settings)."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Compute the reference log-probs of the negatives and the reference samples once before "
            "training (exact, since both are fixed); no reference model is kept in memory."
        },
    )

    def __post_init__(self):
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if loss_types != ["sigmoid"]:
            raise ValueError(f"FD2OConfig: D2O has its own loss; leave `loss_type` unset (got {loss_types}).")
        if self.f_divergence_type != "reverse_kl" or self.f_alpha_divergence_coef != _TRL_DEFAULT_ALPHA_COEF:
            raise ValueError(
                "FD2OConfig: TRL's f_divergence_type / f_alpha_divergence_coef do not apply to D2O."
            )
        if self.ld_alpha is not None or self.use_weighting:
            raise ValueError(
                "FD2OConfig: `ld_alpha` and `use_weighting` are not defined for D2O; leave them unset."
            )
        if self.beta <= 0 or self.d2o_alpha <= 0:
            raise ValueError(
                f"FD2OConfig: beta and d2o_alpha must be positive, got {self.beta}, {self.d2o_alpha}."
            )
        try:
            self.sampling_settings()
        except ValueError as exc:
            raise ValueError(f"FD2OConfig: {exc} (keys num_reference_samples / sample_*).") from exc
        super().__post_init__()

    def sampling_settings(self) -> SamplingSettings:
        return SamplingSettings(
            num_samples=self.num_reference_samples,
            temperature=self.sample_temperature,
            top_p=self.sample_top_p,
            max_new_tokens=self.sample_max_new_tokens,
            seed=self.seed,
        )


@dataclass
class DataCollatorForD2O(DataCollatorMixin):
    """Pads B examples into B·(K+1) rows: rows i·K..i·K+K−1 are example i's samples, rows B·K+i its negative.

    Examples carry `prompt_ids`, `sample_ids` (K lists) and `rejected_ids`, and after the reference
    precompute `ref_chosen_logps` (K floats: TRL's column name, holding the samples') and
    `ref_rejected_logps`, returned as `ref_samples_logps` (B, K) and `ref_rejected_logps` (B,).
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids: list[list[int]] = []
        masks: list[list[int]] = []
        completions = [c for ex in examples for c in ex["sample_ids"]] + [
            ex["rejected_ids"] for ex in examples
        ]
        prompts = [ex["prompt_ids"] for ex in examples for _ in ex["sample_ids"]] + [
            ex["prompt_ids"] for ex in examples
        ]
        for p, c in zip(prompts, completions):
            seq, m = p + c, [0] * len(p) + [1] * len(c)
            if self.max_length is not None:
                seq, m = seq[: self.max_length], m[: self.max_length]
            ids.append(seq)
            masks.append(m)
        out = {
            "input_ids": pad(
                [torch.tensor(s) for s in ids], self.pad_token_id, "right", self.pad_to_multiple_of
            ),
            "attention_mask": pad(
                [torch.ones(len(s), dtype=torch.long) for s in ids], 0, "right", self.pad_to_multiple_of
            ),
            "completion_mask": pad(
                [torch.tensor(m, dtype=torch.long) for m in masks], 0, "right", self.pad_to_multiple_of
            ),
        }
        if "ref_chosen_logps" in examples[0]:
            out["ref_samples_logps"] = torch.tensor([ex["ref_chosen_logps"] for ex in examples])
        if "ref_rejected_logps" in examples[0]:
            out["ref_rejected_logps"] = torch.tensor([ex["ref_rejected_logps"] for ex in examples])
        return out


def _tokenize(tokenizer, messages_or_text: Any, *, generation_prompt: bool = False) -> list[int]:
    if isinstance(messages_or_text, list):
        out = tokenizer.apply_chat_template(
            messages_or_text, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
        )
        return list(out["input_ids"])
    return list(tokenizer(text=messages_or_text)["input_ids"])


class FD2OTrainer(DPOTrainer):
    """D2O on TRL's DPOTrainer: negatives plus K cached reference samples per prompt."""

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "d2o", "fdpo"]

    def __init__(self, model: Any, *args: Any, **kwargs: Any):
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if not isinstance(config, FD2OConfig):
            raise TypeError(f"FD2OTrainer needs `args=FD2OConfig(...)`, got {type(config).__name__}.")
        if isinstance(model, str):  # load once: it is both the sampler (reference) and the policy
            init_kwargs = dict(config.model_init_kwargs or {})
            init_kwargs.setdefault("trust_remote_code", config.trust_remote_code)
            model = create_model_from_path(model, **init_kwargs)
            config.model_init_kwargs = None
        self._d2o_reference = model
        self._d2o_k = config.num_reference_samples
        if len(args) <= 2 and kwargs.get("data_collator") is None:
            tok = kwargs.get("processing_class")
            tok = getattr(tok, "tokenizer", tok)
            if tok is None:
                raise ValueError("FD2OTrainer needs `processing_class` (the tokenizer) or a `data_collator`.")
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            kwargs["data_collator"] = DataCollatorForD2O(
                pad_token_id=pad_id, max_length=config.max_length, pad_to_multiple_of=config.pad_to_multiple_of
            )
        super().__init__(model, *args, **kwargs)

    # -- data -----------------------------------------------------------------------------------

    def _samples_path(self, args: FD2OConfig, name: str) -> Path:
        if args.samples_path is None:
            return Path(args.output_dir) / f"d2o_reference_samples.{name}.jsonl"
        base = Path(args.samples_path)
        return base if name == "train" else base.with_name(f"{base.stem}.{name}{base.suffix}")

    def _draw_samples(
        self, prompts: list[Any], tokenizer, args: FD2OConfig, name: str
    ) -> dict[str, list[str]]:
        model = self._d2o_reference
        state = getattr(self, "state", None)
        allow = state is None or state.global_step == 0
        device = PartialState().device
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if device.type != "cpu" and getattr(model, "hf_device_map", None) is None and not quantized:
            model.to(device)
        with PartialState().main_process_first():
            return load_or_generate_reference_samples(
                model,
                tokenizer,
                prompts,
                args.sampling_settings(),
                self._samples_path(args, name),
                regenerate=args.regenerate_samples and PartialState().is_main_process,
                allow_generate=allow,
                batch_size=args.sample_batch_size,
            )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "sample_ids" in dataset.column_names:  # already prepared (TRL's evaluate re-prepares)
            return dataset
        missing = [c for c in ("prompt", "rejected") if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"D2O data ({dataset_name}) needs columns 'prompt' and 'rejected'; missing {missing} "
                f"(has {dataset.column_names})."
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        samples = self._draw_samples(list(dataset["prompt"]), tokenizer, args, dataset_name)
        eos = tokenizer.eos_token or ""

        def tokenize(example):
            prompt, rejected = example["prompt"], example["rejected"]
            texts = samples[prompt_key(prompt)]
            if is_conversational(example):
                completions = [rejected] + [[{"role": "assistant", "content": t}] for t in texts]
                prompt_ids = _tokenize(tokenizer, prompt, generation_prompt=True)
                full = [_tokenize(tokenizer, prompt + c) for c in completions]
            else:
                completions = [c if c.endswith(eos) else c + eos for c in [rejected, *texts]]
                prompt_ids = _tokenize(tokenizer, prompt)
                full = [_tokenize(tokenizer, prompt + c) for c in completions]
            n = min(common_prefix_length(prompt_ids, f) for f in full)
            return {
                "prompt_ids": prompt_ids[:n],
                "rejected_ids": full[0][n:],
                "sample_ids": [f[n:] for f in full[1:]],
            }

        dataset = dataset.map(tokenize, desc=f"Tokenizing D2O {dataset_name} data")
        if args.max_length is not None:
            dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids",
                "sample_ids",
                "rejected_ids",
                "ref_chosen_logps",
                "ref_rejected_logps",
            ]

    # -- log-probabilities ---------------------------------------------------------------------

    def _split(self, seq_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B·(K+1),) → samples (B, K), rejected (B,) (the collator's row order)."""
        k = self._d2o_k
        b = seq_logps.shape[0] // (k + 1)
        return seq_logps[: b * k].view(b, k), seq_logps[b * k :]

    def _forward_logps(self, model, inputs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        outputs = model(**kwargs, labels=labels, fused_lm_head=True)
        seq_len = inputs["completion_mask"].size(1) - 1
        # the fused head gives 0 where the label is −100; PEFT prompt learning prepends virtual tokens
        return outputs, outputs.log_probs[:, -seq_len:].sum(dim=1)

    def compute_ref_log_probs(self, model, inputs):
        """Reference sequence log-probs: samples (B, K) and negatives (B,) (TRL's reference contexts)."""
        with reference_forward(
            self.accelerator, self.model, self.ref_model,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ):
            _, seq = self._forward_logps(model, inputs)
        return self._split(seq)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        outputs, seq = self._forward_logps(model, inputs)
        samples_logps, rejected_logps = self._split(seq)
        if "ref_samples_logps" in inputs:
            ref_samples, ref_rejected = inputs["ref_samples_logps"], inputs["ref_rejected_logps"]
        else:
            ref_samples, ref_rejected = self.compute_ref_log_probs(
                self.model if self.ref_model is None else self.ref_model, inputs
            )
        per_prompt, metrics = d2o_loss(
            samples_logps,
            rejected_logps,
            ref_samples.to(samples_logps.device),
            ref_rejected.to(rejected_logps.device),
            beta=self.beta,
            alpha=self.args.d2o_alpha,
        )
        loss = per_prompt.mean()
        terms = {"d2o": loss}
        if self.aux_loss_enabled:
            terms["aux_loss"] = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        if self.model.training:
            check_finite_terms(terms, step=self.state.global_step + 1)

        gather = self.accelerator.gather
        for name, values in metrics.items():
            self._metrics[mode][name].append(gather(values).float().mean().item())
        self._metrics[mode]["logps/samples"].append(gather(samples_logps.detach().mean(1)).mean().item())
        self._metrics[mode]["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        if return_outputs:
            warnings.warn(
                "`return_outputs=True` recomputes the logits with an extra forward pass (the fused LM head "
                "does not build them), as in TRL.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
                outputs = model(**kwargs)
        return (loss, outputs) if return_outputs else loss
