"""Resolve a job's base model: a local Hugging Face directory, or a built-in debug model that the
project builds (and caches) itself, with the project's own tokenizer.

A debug base can be given ``pretrain_steps`` of *generic* full-parameter pretraining on a copy
task ("cp: abc = abc") so that attention already knows how to look back at the prompt; the
adapters then learn their own tasks on top. The pretrained base is cached under
``$LORAFLEET_CACHE`` (default ``~/.cache/lorafleet``) keyed by a hash of everything that
determines it, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from pathlib import Path

import torch

from ..utils.atomic import atomic_dir

TOKENIZER_FILE_MARKER = "tokenizer.json"
CACHE_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


def copy_corpus(n: int, seed: int) -> list[str]:
    """Generic pretraining text: copy a random string of letters and digits."""
    rng = random.Random(f"lorafleet-copy:{seed}")
    alphabet = string.ascii_lowercase + string.digits
    return [f"cp: {s} = {s}" for s in
            ("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(n))]


def load_base(spec, log=print):
    """-> (model, tokenizer, name). ``spec`` is a jobs.config.BaseSpec."""
    if spec.path is not None:
        return _load_hf_dir(Path(spec.path))
    return _debug_base(spec, log)


def _load_hf_dir(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ValueError(f"base path {str(path)!r} is not a Hugging Face model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.eval(), tok, str(path)


def _debug_base(spec, log):
    from transformers import AutoModelForCausalLM

    from ..data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
    from ..models.debug import build_debug_model

    tok = build_tokenizer()
    overrides = dict(spec.overrides)
    overrides.setdefault("vocab_size", _round_up(len(tok), 8))
    if not spec.pretrain_steps:
        return build_debug_model(spec.debug, seed=0, **overrides), tok, f"debug:{spec.debug}"
    key = hashlib.sha256(json.dumps(
        {"arch": spec.debug, "overrides": overrides, "steps": spec.pretrain_steps, "v": CACHE_VERSION,
         "vocab": tok.get_vocab()}, sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_root() / "bases" / f"{spec.debug}-{key}"
    if (cached / "config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(cached, local_files_only=True, dtype=torch.float32)
            return model.eval(), load_tokenizer(cached), f"debug:{spec.debug}+copy{spec.pretrain_steps}"
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            log(f"cached base {cached} unreadable ({e}); rebuilding it")
    model = build_debug_model(spec.debug, seed=0, **overrides)
    log(f"building the {spec.debug} debug base: {spec.pretrain_steps} steps of generic copy pretraining "
        f"(cached in {cached})")
    pretrain(model, tok, spec.pretrain_steps)
    with atomic_dir(cached) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tok, tmp)
    return model.eval(), tok, f"debug:{spec.debug}+copy{spec.pretrain_steps}"


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def pretrain(model, tok, steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0):
    """Plain full-parameter next-token training on the copy corpus (deterministic)."""
    torch.manual_seed(seed)
    texts = copy_corpus(steps * batch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 20))
    model.train()
    pad = tok.pad_token_id
    for s in range(steps):
        enc = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
               for t in texts[s * batch : (s + 1) * batch]]
        T = max(map(len, enc))
        ids = torch.full((len(enc), T), pad)
        mask = torch.zeros(len(enc), T, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss)
