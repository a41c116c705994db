"""A small, real ``tokenizers`` tokenizer built in code: nothing is downloaded.

The default (``build_tokenizer()``) is character-level: one token per printable ASCII character
(0x20-0x7E) plus ``\\n`` and ``\\t``, so any task text round-trips exactly with no unknown-token
holes; anything else (e.g. non-ASCII) becomes ``<unk>``.  It is a ``tokenizers.models.BPE`` with an
empty merge list, so ``build_tokenizer(corpus_texts)`` can add BPE merges learned from a corpus
(``tokenizers.trainers.BpeTrainer``) on top of the same alphabet, up to ``vocab_size`` entries
(default 256, the debug models' vocab).

Fixed ids (match the debug configs' pad/bos/eos 0/1/2)::

    0 <pad>   1 <bos>   2 <eos>   3 <|user|>   4 <|assistant|>   5 <|end|>   6 <|system|>   7 <unk>

then the characters (ids 8..104 for the character-level tokenizer, 105 entries in all).

``tokenizer(text)`` / ``tokenizer.encode(text)`` prepend ``<bos>`` (the Llama convention); pass
``add_special_tokens=False`` for the bare characters.  The chat template renders::

    <bos><|system|>S<|end|><|user|>U<|end|><|assistant|>A<|end|>...

with ``{% generation %}`` around each assistant turn's content and its ``<|end|>``, so
``apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)`` gives the
training mask.  A chat generation should stop on ``<|end|>`` (id 5) as well as ``<eos>`` (id 2).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "PAD",
    "BOS",
    "EOS",
    "USER",
    "ASSISTANT",
    "END",
    "SYSTEM",
    "UNK",
    "ALPHABET",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
USER, ASSISTANT, END, SYSTEM = "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"
UNK = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, USER, ASSISTANT, END, SYSTEM, UNK)

# Printable ASCII (space .. tilde) plus newline and tab: 97 characters.
ALPHABET: tuple[str, ...] = tuple(chr(c) for c in range(0x20, 0x7F)) + ("\n", "\t")

# Keep spaces attached to the following word; digits always alone (so arithmetic stays digit by
# digit even when merges are learned); runs of other punctuation together; whitespace runs alone.
_SPLIT_PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{{- '<|system|>' + message['content'] + '<|end|>' }}"
    "{%- elif message['role'] == 'user' %}"
    "{{- '<|user|>' + message['content'] + '<|end|>' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|assistant|>' }}"
    "{%- generation %}{{ message['content'] + '<|end|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ ' (expected system, user or assistant)') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)


def _char_vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALPHABET)}


def build_tokenizer(
    corpus_texts: list[str] | None = None,
    *,
    vocab_size: int = 256,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Build the project tokenizer (deterministic; no download).

    ``corpus_texts=None``: character-level, 105 tokens.  With a corpus: BPE merges learned by
    ``BpeTrainer`` on top of the same specials + alphabet, at most ``vocab_size`` tokens in all
    (merges never cross a space-word boundary and never join digits).
    """
    if vocab_size < len(SPECIAL_TOKENS) + len(ALPHABET):
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(SPECIAL_TOKENS) + len(ALPHABET)} "
            "special + character tokens"
        )
    pre = pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated")
    if corpus_texts is None:
        tk = Tokenizer(models.BPE(vocab=_char_vocab(), merges=[], unk_token=UNK))
        tk.pre_tokenizer = pre
    else:
        tk = Tokenizer(models.BPE(unk_token=UNK))
        tk.pre_tokenizer = pre
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=list(ALPHABET),
            limit_alphabet=len(ALPHABET),
            show_progress=False,
        )
        # Only the fixed alphabet may appear: other characters would claim vocab slots.
        allowed = set(ALPHABET)
        texts = ["".join(ch for ch in t if ch in allowed) for t in corpus_texts]
        tk.train_from_iterator(texts, trainer=trainer)
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tk.token_to_id(tok) != i:  # pragma: no cover - BpeTrainer puts specials first
                raise RuntimeError(f"BpeTrainer put {tok} at id {tk.token_to_id(tok)}, expected {i}")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B:1",
        special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, END, SYSTEM],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="right",
    )
    if len(tok) > vocab_size:  # pragma: no cover - guarded above / by the trainer
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, more than vocab_size {vocab_size}")
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Write ``tok`` (tokenizer.json, tokenizer_config.json, chat_template.jinja) to ``directory``;
    ``transformers.AutoTokenizer.from_pretrained(directory)`` loads it back offline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: str | Path):
    """``AutoTokenizer.from_pretrained(directory, local_files_only=True)``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
