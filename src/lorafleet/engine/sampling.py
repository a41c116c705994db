"""Batched multi-adapter sampling with a KV cache, and prompt logprobs.

One decode batch holds rows of many adapters and the base model, laid out adapter-major; each
step feeds one token per row through the routed model, so a new token costs one token of compute.
Rows that finish (a stop token or string, or ``max_tokens``) leave the batch and the cache.

Reported logprobs are the model's own (temperature 1, no top-k/top-p filtering) logprobs of the
sampled tokens: the same numbers the training forward computes for those tokens, so the
importance ratio of a fresh policy starts at exactly 1.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass, field

import torch

from ..types import Example
from .training import check_token_ids


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str | int] | None = None  # stop strings (need a tokenizer) and/or token ids
    seed: int | None = None
    stop_on_eos: bool = True  # the model config's eos_token_id(s) also stop a row

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):  # nan passes every comparison: refused by name
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"SamplingParams.{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, (str, int)):
            raise ValueError(f"SamplingParams.stop must be a list of stop strings / token ids, got {self.stop!r} "
                             f"(write [{self.stop!r}])")
        for s in self.stop or []:
            if not isinstance(s, (str, int)) or isinstance(s, bool) or s == "":
                raise ValueError(f"SamplingParams.stop entries must be non-empty strings or token ids, got {s!r}")


@dataclass
class SampleRequest:
    adapter: str | None
    prompt_tokens: list[int]
    num_samples: int = 1

    def __post_init__(self):
        if not self.prompt_tokens:
            raise ValueError("SampleRequest.prompt_tokens is empty")
        if not _is_int(self.num_samples) or self.num_samples < 1:
            raise ValueError(f"SampleRequest.num_samples must be >= 1, got {self.num_samples!r}")


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" (a stop token / string / eos) or "length"
    text: str | None = None


@dataclass
class _Row:
    request: int
    sample: int
    slot: int
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


class SamplingMixin:
    tokenizer = None  # set `fleet.tokenizer` to honour string stops and fill `text`

    def compute_logprobs(self, adapter: str | None, tokens: list[int]) -> list[float | None]:
        """Logprob of every token given the ones before it; None at position 0."""
        check_token_ids(tokens, self.vocab_sizes()[0], "compute_logprobs:")
        if adapter is not None:
            self.slot_of(adapter)
        if len(tokens) < 2:
            return [None] * len(tokens)
        res = self.forward_backward([Example(adapter, list(tokens[:-1]), list(tokens[1:]))], forward_only=True)
        return [None] + res.logprobs[0]

    @torch.no_grad()
    def sample(self, requests: list[SampleRequest], params: SamplingParams | None = None) -> list[list[SampledSequence]]:
        """``num_samples`` sequences per request, all requests in shared decode batches."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a lorafleet.SamplingParams, got {type(params).__name__}")
        if isinstance(requests, SampleRequest):
            raise ValueError("sample takes a list of SampleRequests, got one (write [request])")
        if not requests:
            return []
        self._stops(params)
        vocab = self.vocab_sizes()[0]
        for i, r in enumerate(requests):  # every request is checked before any work (or collective)
            if not isinstance(r, SampleRequest):
                raise ValueError(f"request {i} is a {type(r).__name__}, not a lorafleet.SampleRequest")
            check_token_ids(r.prompt_tokens, vocab, f"request {i}: prompt")
            if r.adapter is not None:
                self.slot_of(r.adapter)
        if self.comm is not None:  # distributed: this rank samples its share, results are gathered
            return self.comm.sample(self, requests, params)
        return self._sample_local(requests, params)

    @torch.no_grad()
    def _sample_local(self, requests, params, request_ids: list[int] | None = None):
        """Sample checked ``requests``; ``request_ids[i]``: request i's index in the caller's
        whole list (its rows' seeds derive from it, so a share sampled apart draws the same)."""
        stop_ids, stop_strs = self._stops(params)
        ids = range(len(requests)) if request_ids is None else request_ids
        rows = []
        for i, (r, rid) in enumerate(zip(requests, ids)):
            slot = -1 if r.adapter is None else self.slot_of(r.adapter)
            for j in range(r.num_samples):
                g = torch.Generator().manual_seed(_row_seed(params.seed, rid, j))
                rows.append(_Row(i, j, slot, g))
        rows.sort(key=lambda row: row.slot)  # adapter-major; stays so as rows leave
        self._decode(rows, requests, params, stop_ids, stop_strs)
        out = [[None] * r.num_samples for r in requests]
        for row in rows:
            text = self._text(row.tokens) if self.tokenizer is not None else None
            out[row.request][row.sample] = SampledSequence(row.tokens, row.logprobs, row.stop_reason, text)
        return out

    def _text(self, tokens: list[int]) -> str:
        """The completion as text, without special tokens (an eos marker is not part of the answer)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _stops(self, params):
        stop_ids = {s for s in params.stop or [] if isinstance(s, int)}
        stop_strs = [s for s in params.stop or [] if isinstance(s, str)]
        if stop_strs and self.tokenizer is None:
            raise ValueError("string stop sequences need a tokenizer: set fleet.tokenizer")
        if params.stop_on_eos:
            eos = getattr(self.model.config, "eos_token_id", None)
            stop_ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return stop_ids, stop_strs

    def _decode(self, rows, requests, params, stop_ids, stop_strs):
        dev = self.lora_device
        prompts = [requests[r.request].prompt_tokens for r in rows]
        L = max(map(len, prompts))
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token goes at the end
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        live = list(range(len(rows)))
        step_ids, step_pos = ids, pos
        for t in range(params.max_tokens):
            out = self.run_routed(self.model, [rows[i].slot for i in live], input_ids=step_ids,
                                  attention_mask=mask, position_ids=step_pos, use_cache=True,
                                  **{_cache_keyword(type(self.model)): cache})
            logits = out.logits[:, -1].float()
            logp = torch.log_softmax(logits, -1)
            nxt = _choose(logits, params, [rows[i].gen for i in live])
            if self.comm is not None:  # ranks decoding in lockstep must agree on every token
                nxt = self.comm.agree_tokens(nxt)
            keep = []
            for k, i in enumerate(live):
                row, tok = rows[i], int(nxt[k])
                row.tokens.append(tok)
                row.logprobs.append(float(logp[k, tok]))
                if tok in stop_ids or (stop_strs and _hits(self._text(row.tokens), stop_strs)):
                    row.stop_reason = "stop"
                elif t + 1 == params.max_tokens:
                    row.stop_reason = "length"
                else:
                    keep.append(k)
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch and the cache
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, nxt, step_pos = mask[sel], nxt[sel], step_pos[sel]
                live = [live[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            step_ids = nxt.view(-1, 1).to(dev)
            step_pos = step_pos[:, -1:] + 1


@functools.cache
def _cache_keyword(model_cls) -> str:
    """The forward's KV-cache argument: transformers 5.2x renamed ``past_key_values`` to ``cache``
    (the old name warns on every decode step and goes away in 5.40); 5.17 knows only the old one."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _row_seed(seed, request: int, sample: int) -> int:
    base = 0 if seed is None else int(seed)
    return (base * 1_000_003 + request * 7919 + sample) % (2**63)


def _hits(text: str, stops: list[str]) -> bool:
    return any(s in text for s in stops)


def _choose(logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]) -> torch.Tensor:
    """Greedy at temperature 0; else temperature / top-k / top-p filtering and one draw per row
    from that row's own generator (a row's sample does not depend on its batch neighbours)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    z = logits / params.temperature
    if params.top_k > 0 and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=True, dim=-1)
        probs = torch.softmax(sorted_z, -1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest set reaching top_p
        sorted_z = sorted_z.masked_fill(drop, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(-1, order, sorted_z)
    probs = torch.softmax(z, -1).cpu()
    picks = [int(torch.multinomial(probs[k], 1, generator=g)) for k, g in enumerate(gens)]
    return torch.tensor(picks, device=logits.device)
