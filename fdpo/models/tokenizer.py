"""The tiny model's tokenizer: byte-level BPE trained with `tokenizers`, single-digit numbers, chat template.

Built from the synthetic tasks' text with the `tokenizers` library (no download), then wrapped as a
`transformers.PreTrainedTokenizerFast` so it saves and loads with `save_pretrained` /
`AutoTokenizer.from_pretrained` like any hub tokenizer.

- Model: byte-level BPE (256-byte initial alphabet, so any NFC-normalised text round-trips exactly:
  `decode(encode(s)) == s`). Pre-tokenisation is Qwen2's: NFC, then a regex split that isolates
  every digit (Unicode class `N`), so numbers are always one token per digit and arithmetic is learnable;
  merges are learned only inside words. Why Qwen2's and not GPT-2's: transformers 5's
  `AutoTokenizer` loads a directory whose config says `model_type: qwen2` with its own
  `Qwen2Tokenizer`, which REBUILDS normaliser and pre-tokeniser from this fixed recipe and keeps
  only vocab and merges; using the same recipe for both archs makes the loaded tokenizer behave
  exactly like the trained one, whatever class `AutoTokenizer` picks.
- Special tokens (ids 0–5): `<|pad|>` (pad), `<|bos|>` (bos), `<|end|>` (eos and end of every
  turn), `<|system|>`, `<|user|>`, `<|assistant|>`. No token is added automatically on encode;
  the chat template writes bos and the turn markers itself. No unk token (byte-level needs none;
  `unk_token: null` is saved so `Qwen2Tokenizer` does not add its default `<|endoftext|>`).
- Chat template (`CHAT_TEMPLATE`): `<|bos|>` then, per message, `<|role|>content<|end|>`, and with
  `add_generation_prompt=True` a final `<|assistant|>`. So
  `render(prompt, add_generation_prompt=True)` is a token prefix of `render(prompt + completion)`,
  and every assistant turn ends with the eos token — what TRL's SFT/DPO/GRPO trainers need for
  conversational prompt/completion data (TRL adds no eos to conversational data). The assistant
  content and its `<|end|>` sit inside `{% generation %}` so `assistant_only_loss=True` works.
"""

from __future__ import annotations

from collections.abc import Iterable

# Qwen2's pre-tokenisation regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX)
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
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
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
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
        unk_token=None,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
