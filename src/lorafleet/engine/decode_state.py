"""Resumable decoding: one shared decode batch that advances a bounded number of tokens per call.

`Fleet.sample` builds a `DecodeState` and runs it to the end in one call; the service's
scheduler instead calls `advance(k)` once per cycle, so a 128 × 4096 sample interleaves with
other tenants' work. The state owns everything a decode step reads — the KV cache, the
attention mask, each row's position, generator, tokens and logprobs — and a step is exactly the
step of the uninterrupted loop, so the samples do not depend on how the decode was cut into
pieces nor on what ran in between (other calls use their own caches and never touch these rows'
generators). The adapters' weights must not change between pieces: the scheduler keeps the
slots of running decodes from being evicted or reused.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch


@dataclass
class DecodeRow:
    request: int
    sample: int
    slot: int
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


class DecodeState:
    """Rows (adapter-major) of checked requests, decoded ``advance(k)`` steps at a time."""

    def __init__(self, fleet, rows: list[DecodeRow], requests, params, stop_ids: set, stop_strs: list[str]):
        from transformers import DynamicCache

        self.fleet, self.rows, self.requests, self.params = fleet, rows, requests, params
        self.stop_ids, self.stop_strs = stop_ids, stop_strs
        dev = fleet.lora_device
        prompts = [requests[r.request].prompt_tokens for r in rows]
        L = max(map(len, prompts))
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token goes at the end
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        self._mask = mask.to(dev)
        self._step_ids = ids.to(dev)
        self._step_pos = (self._mask.cumsum(-1) - 1).clamp(min=0)
        self._cache = DynamicCache(config=fleet.model.config)
        self._live = list(range(len(rows)))
        self.steps = 0  # decode steps taken (the first one also reads the prompts)
        self.done = not rows

    # ------------------------------------------------------------------ what is left
    def live_rows(self) -> list[DecodeRow]:
        return [] if self.done else [self.rows[i] for i in self._live]

    def next_step_tokens(self) -> int:
        """Tokens the next step feeds through the model (the padded prompts for the first)."""
        if self.done:
            return 0
        return int(self._step_ids.numel())

    # ------------------------------------------------------------------ decoding
    def advance(self, max_steps: int | None = None) -> int:
        """Take up to ``max_steps`` decode steps (None: until every row stopped); steps taken."""
        n = 0
        while not self.done and (max_steps is None or n < max_steps):
            self._step()
            n += 1
        return n

    @torch.no_grad()
    def _step(self):
        fleet, rows, live, params = self.fleet, self.rows, self._live, self.params
        out = fleet.run_routed(fleet.model, [rows[i].slot for i in live], input_ids=self._step_ids,
                               attention_mask=self._mask, position_ids=self._step_pos, use_cache=True,
                               **{cache_keyword(type(fleet.model)): self._cache})
        logits = out.logits[:, -1].float()
        logp = torch.log_softmax(logits, -1)
        nxt = choose_tokens(logits, params, [rows[i].gen for i in live])
        if fleet.comm is not None:  # ranks decoding in lockstep must agree on every token
            nxt = fleet.comm.agree_tokens(nxt)
        t, keep = self.steps, []
        self.steps += 1
        for k, i in enumerate(live):
            row, tok = rows[i], int(nxt[k])
            row.tokens.append(tok)
            row.logprobs.append(float(logp[k, tok]))
            if tok in self.stop_ids or (self.stop_strs and _hits(fleet._text(row.tokens), self.stop_strs)):
                row.stop_reason = "stop"
            elif t + 1 == params.max_tokens:
                row.stop_reason = "length"
            else:
                keep.append(k)
        if not keep:
            self._finish()
            return
        dev = self._mask.device
        step_pos = self._step_pos
        if len(keep) < len(live):  # finished rows leave the batch and the cache
            sel = torch.tensor(keep, device=dev)
            self._cache.batch_select_indices(sel)
            self._mask, nxt, step_pos = self._mask[sel], nxt[sel], step_pos[sel]
            self._live = [live[k] for k in keep]
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._live), 1)], dim=1)
        self._step_ids = nxt.view(-1, 1).to(dev)
        self._step_pos = step_pos[:, -1:] + 1

    def _finish(self):
        self.done = True
        self._cache = self._mask = self._step_ids = self._step_pos = None  # free the KV cache now
        self._live = []


@functools.cache
def cache_keyword(model_cls) -> str:
    """The forward's KV-cache argument: transformers 5.2x renamed ``past_key_values`` to ``cache``
    (the old name warns on every decode step and goes away in 5.40); 5.17 knows only the old one."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def _hits(text: str, stops: list[str]) -> bool:
    return any(s in text for s in stops)


def choose_tokens(logits: torch.Tensor, params, gens: list[torch.Generator]) -> torch.Tensor:
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
