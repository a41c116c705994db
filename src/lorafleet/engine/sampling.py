"""Batched multi-adapter sampling with a KV cache, and prompt logprobs.

One decode batch holds rows of many adapters and the base model, laid out adapter-major; each
step feeds one token per row through the routed model, so a new token costs one token of compute.
Rows that finish (a stop token or string, or ``max_tokens``) leave the batch and the cache.

Reported logprobs are the model's own (temperature 1, no top-k/top-p filtering) logprobs of the
sampled tokens: the same numbers the training forward computes for those tokens, so the
importance ratio of a fresh policy starts at exactly 1.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..types import Example
from .decode_state import DecodeRow, DecodeState
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
        params = self._check_sample(requests, params)
        if not requests:
            return []
        if self.comm is not None:  # distributed: this rank samples its share, results are gathered
            return self.comm.sample(self, requests, params)
        return self._sample_local(requests, params)

    def start_sample(self, requests: list[SampleRequest], params: SamplingParams | None = None) -> DecodeState:
        """What `sample` does, as a resumable `DecodeState`: ``state.advance(k)`` decodes ``k``
        more tokens per row, and once ``state.done``, ``fleet.sample_results(state)`` equals
        ``fleet.sample(requests, params)`` however the decode was cut (single process only)."""
        params = self._check_sample(requests, params)
        if not requests:
            raise ValueError("start_sample needs at least one SampleRequest")
        if self.comm is not None:
            raise ValueError("start_sample runs in one process; a distributed fleet samples with sample()")
        return self._start_local(requests, params)

    def sample_results(self, state: DecodeState) -> list[list[SampledSequence]]:
        """The sequences of a finished `DecodeState`, per request and sample."""
        if not state.done:
            raise ValueError(f"the decode is not finished ({len(state.live_rows())} rows still running)")
        out = [[None] * r.num_samples for r in state.requests]
        for row in state.rows:
            text = self._text(row.tokens) if self.tokenizer is not None else None
            out[row.request][row.sample] = SampledSequence(row.tokens, row.logprobs, row.stop_reason, text)
        return out

    def _check_sample(self, requests, params) -> SamplingParams:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a lorafleet.SamplingParams, got {type(params).__name__}")
        if isinstance(requests, SampleRequest):
            raise ValueError("sample takes a list of SampleRequests, got one (write [request])")
        if not requests:
            return params
        self._stops(params)
        vocab = self.vocab_sizes()[0]
        for i, r in enumerate(requests):  # every request is checked before any work (or collective)
            if not isinstance(r, SampleRequest):
                raise ValueError(f"request {i} is a {type(r).__name__}, not a lorafleet.SampleRequest")
            check_token_ids(r.prompt_tokens, vocab, f"request {i}: prompt")
            if r.adapter is not None:
                self.slot_of(r.adapter)
        return params

    @torch.no_grad()
    def _sample_local(self, requests, params, request_ids: list[int] | None = None):
        """Sample checked ``requests``; ``request_ids[i]``: request i's index in the caller's
        whole list (its rows' seeds derive from it, so a share sampled apart draws the same)."""
        state = self._start_local(requests, params, request_ids)
        state.advance(None)
        return self.sample_results(state)

    def _start_local(self, requests, params, request_ids: list[int] | None = None) -> DecodeState:
        stop_ids, stop_strs = self._stops(params)
        ids = range(len(requests)) if request_ids is None else request_ids
        rows = []
        for i, (r, rid) in enumerate(zip(requests, ids)):
            slot = -1 if r.adapter is None else self.slot_of(r.adapter)
            for j in range(r.num_samples):
                g = torch.Generator().manual_seed(_row_seed(params.seed, rid, j))
                rows.append(DecodeRow(i, j, slot, g))
        rows.sort(key=lambda row: row.slot)  # adapter-major; stays so as rows leave
        return DecodeState(self, rows, requests, params, stop_ids, stop_strs)

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


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _row_seed(seed, request: int, sample: int) -> int:
    base = 0 if seed is None else int(seed)
    return (base * 1_000_003 + request * 7919 + sample) % (2**63)
