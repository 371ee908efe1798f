"""The tiny model's tokenizer: byte-level BPE trained with `tokenizers`, single-digit numbers, chat template.

Built from the synthetic tasks' text with the `tokenizers` library (no download), then wrapped as a
`transformers.PreTrainedTokenizerFast` so it saves and loads with `save_pretrained` /
`AutoTokenizer.from_pretrained` like any hub tokenizer.

- Model: byte-level BPE (GPT-2 style: 256-byte initial alphabet, so ANY text round-trips exactly:
  `decode(encode(s)) == s`). Pre-tokenisation first splits every digit into its own piece
  (`Digits(individual_digits=True)`), so numbers are always one token per digit and arithmetic is
  learnable; merges are learned only inside words.
- Special tokens (ids 0–5): `<|pad|>` (pad), `<|bos|>` (bos), `<|end|>` (eos and end of every
  turn), `<|system|>`, `<|user|>`, `<|assistant|>`. No token is added automatically on encode;
  the chat template writes bos and the turn markers itself.
- Chat template (`CHAT_TEMPLATE`): `<|bos|>` then, per message, `<|role|>content<|end|>`, and with
  `add_generation_prompt=True` a final `<|assistant|>`. So
  `render(prompt, add_generation_prompt=True)` is a token prefix of `render(prompt + completion)`,
  and every assistant turn ends with the eos token — what TRL's SFT/DPO/GRPO trainers need for
  conversational prompt/completion data (TRL adds no eos to conversational data). The assistant
  content and its `<|end|>` sit inside `{% generation %}` so `assistant_only_loss=True` works.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS.values()]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('fdpo tiny chat template: unknown role ' ~ message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 256):
    """Train the byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast`.

    Deterministic: the same texts (in the same order) give the same vocabulary and merges.
    `vocab_size` is an upper bound; training stops earlier when no pair occurs twice.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
