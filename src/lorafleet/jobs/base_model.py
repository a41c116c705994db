"""Resolve a job's base model: a local Hugging Face directory, or a built-in debug model that the
project builds (and caches) itself, with the project's own tokenizer.

A debug base can be given ``pretrain_steps`` of *generic* full-parameter pretraining on a copy
task ("cp: aZ3k = aZ3k": random strings of letters of both cases and digits) so that attention
already knows how to find a prompt position and every letter token -- upper case too -- has a
trained embedding and output row; the adapters then learn their own tasks on top (nothing of
rev / sort / upper / rot is in the corpus). As in the prompt/completion data, the loss is only on
the copy (after ``=``) and ``<eos>``: the random string itself is unpredictable, and its loss
would only add noise (with it, a 3-layer base had not learned to copy after 500 steps; without
it, it copies exactly after 300-350). The pretrained base is cached under ``$LORAFLEET_CACHE``
(default ``~/.cache/lorafleet``) keyed by a hash of everything that determines it (the recipe's
version included), written atomically, and built under a lock (utils/cache.py) so that
concurrent processes -- a `lorafleet train` and a `lorafleet serve`, say -- build it once.

``EMBEDDED_BASES`` names the pretrained bases that ``lorafleet serve --base NAME`` accepts;
``lorafleet:qwen3_moe-copy`` is the base of examples/quickstart.yaml (the same spec, hence the
same cache entry) and the service's default.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import string
from pathlib import Path

import torch

from ..utils.atomic import atomic_dir
from ..utils.cache import cache_entry_lock, cache_root
from .config import BaseSpec

TOKENIZER_FILE_MARKER = "tokenizer.json"
CACHE_VERSION = 2  # bump whenever copy_corpus / pretrain change what they build

# Pretrained embedded bases by name. The service's default must stay examples/quickstart.yaml's
# `base:` exactly (tests/test_service_default_base.py checks it): then `lorafleet train` on the
# quickstart and `lorafleet serve` share one cache entry and nothing is built twice.
EMBEDDED_BASES: dict[str, BaseSpec] = {
    "lorafleet:qwen3_moe-copy": BaseSpec(
        debug="qwen3_moe", pretrain_steps=400,
        overrides={"hidden_size": 96, "num_hidden_layers": 3, "moe_intermediate_size": 48, "num_experts": 8}),
}
DEFAULT_SERVICE_BASE = "lorafleet:qwen3_moe-copy"


COPY_ALPHABET = string.ascii_letters + string.digits
COPY_MIN_LEN, COPY_MAX_LEN = 1, 8


def copy_corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """Generic pretraining pairs (prompt, completion): copy a random string of letters (both
    cases) and digits, ``("cp: aZ3k =", " aZ3k")``."""
    rng = random.Random(f"lorafleet-copy:{seed}")
    out = []
    for _ in range(n):
        s = "".join(rng.choice(COPY_ALPHABET) for _ in range(rng.randint(COPY_MIN_LEN, COPY_MAX_LEN)))
        out.append((f"cp: {s} =", f" {s}"))
    return out


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
    name = f"debug:{spec.debug}+copy{spec.pretrain_steps}"

    def load_cached():
        if not (cached / "config.json").is_file():
            return None
        try:
            model = AutoModelForCausalLM.from_pretrained(cached, local_files_only=True, dtype=torch.float32)
            return model.eval(), load_tokenizer(cached), name
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            log(f"cached base {cached} unreadable ({e}); rebuilding it")
            return None

    if (hit := load_cached()) is not None:  # the common case takes no lock
        return hit
    # the waiter speaks too: of torchrun ranks racing for the lock, the one that prints (rank 0) may wait
    waiting = f"waiting for another process to finish the {spec.debug} debug base (cached in {cached})"
    with cache_entry_lock(cached, on_wait=lambda: log(waiting)):
        if (hit := load_cached()) is not None:  # another process built it while we waited
            return hit
        model = build_debug_model(spec.debug, seed=0, **overrides)
        log(f"building the {spec.debug} debug base: {spec.pretrain_steps} steps of generic copy pretraining "
            f"(once; cached in {cached})")
        pretrain(model, tok, spec.pretrain_steps)
        with atomic_dir(cached) as tmp:
            model.save_pretrained(tmp)
            save_tokenizer(tok, tmp)
    # the builder runs what every later process runs: the cached files (the model it built keeps
    # eager attention where a loaded one takes sdpa, 1e-7 off in logits: torchrun ranks would differ)
    if (hit := load_cached()) is not None:
        return hit
    return model.eval(), tok, name


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def pretrain(model, tok, steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0,
             warmup: int = 20, min_lr_ratio: float = 0.1):
    """Full-parameter next-token training on the copy corpus (deterministic): AdamW, ``warmup``
    linear warm-up steps then cosine decay to ``lr * min_lr_ratio``; loss on the completion and
    ``<eos>`` only. Returns the last step's loss."""
    torch.manual_seed(seed)
    pairs = copy_corpus(steps * batch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_factor(t: int) -> float:
        cos = 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))
        return min(1.0, (t + 1) / warmup) * (min_lr_ratio + (1.0 - min_lr_ratio) * cos)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    pad = tok.pad_token_id
    loss = torch.tensor(float("nan"))
    for s in range(steps):
        rows = []
        for prompt, completion in pairs[s * batch : (s + 1) * batch]:
            p = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
            c = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
            rows.append((p, c))
        T = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), T), pad)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        labels = torch.full((len(rows), T), -100)
        for i, (p, c) in enumerate(rows):
            n = len(p) + len(c)
            ids[i, :n] = torch.tensor(p + c)
            mask[i, :n] = 1
            labels[i, len(p) : n] = torch.tensor(c)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())
