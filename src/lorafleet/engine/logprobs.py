"""Token logprobs from hidden states without materializing full-vocabulary logits.

Semantics (the whole op)::

    logits = (hidden @ W.T).float()                  # [N, V]
           (+ (u @ B.T).float() on the tokens of an adapter with LoRA on the LM head,
              u = scale * dropout(hidden) @ A.T)
    logprobs = log_softmax(logits)[arange(N), targets]
    entropy  = -(softmax(logits) * log_softmax(logits)).sum(-1)   # no gradient

computed ``chunk`` rows at a time; the backward recomputes each chunk's logits, so peak memory
is ``chunk × V`` fp32 instead of ``N × V``. A head LoRA adds ``u`` (``[N, r]``) and its ``B``
(``[V, r]``) to the same pass: the low-rank part is never expanded to a ``[V, H]`` weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadLoRARun:
    """The LM head's LoRA on tokens ``[start, end)`` of the flattened hidden states (one adapter):
    ``A [r, H]`` and ``B [V, r]`` are views of its slot (gradients flow into the bank), ``scale``
    its LoRA scale, ``noise`` its dropout multiplier ``[end - start, H]`` (None: no dropout)."""

    start: int
    end: int
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    noise: torch.Tensor | None = None


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, u, b, targets, chunk):
        n = hidden.shape[0]
        lp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_empty(n, dtype=torch.float32)
        for s in range(0, n, chunk):
            logits = _logits(hidden, weight, u, b, s, chunk)
            z = torch.logsumexp(logits, dim=-1)
            lse[s : s + chunk] = z
            lp[s : s + chunk] = logits.gather(1, targets[s : s + chunk, None]).squeeze(1) - z
            logp = logits - z[:, None]
            ent[s : s + chunk] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(hidden, weight, u, b, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, _grad_ent):
        hidden, weight, u, b, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w, need_u, need_b = ctx.needs_input_grad[:4]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gu = torch.empty_like(u) if need_u else None
        gb = torch.zeros_like(b, dtype=torch.float32) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            logits = _logits(hidden, weight, u, b, s, chunk)
            g = grad_lp[s : s + chunk].float()
            # d lp / d logits = onehot(target) - softmax
            dlogits = -(logits - lse[s : s + chunk, None]).exp_() * g[:, None]
            dlogits.scatter_add_(1, targets[s : s + chunk, None], g[:, None])
            if need_h:
                gh[s : s + chunk] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                gw += dlogits.t() @ h.float()
            if need_u:
                gu[s : s + chunk] = (dlogits.to(b.dtype) @ b).to(u.dtype)
            if need_b:
                gb += dlogits.t() @ u[s : s + chunk].float()
        return (gh, (gw.to(weight.dtype) if need_w else None), gu, (gb.to(b.dtype) if need_b else None),
                None, None)


def _logits(hidden, weight, u, b, s, chunk):
    logits = (hidden[s : s + chunk] @ weight.t()).float()
    if u is not None:
        logits += (u[s : s + chunk] @ b.t()).float()
    return logits


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                   head_lora: list[HeadLoRARun] | None = None):
    """hidden [N, H], weight [V, H] (the LM head), targets [N] -> (logprobs [N] fp32, entropy [N]).
    ``head_lora``: disjoint token runs whose logits also get their adapter's LM-head LoRA."""
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"target token ids must be in [0, {weight.shape[0]}), got range "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    targets, chunk = targets.long(), max(1, int(chunk))
    if not head_lora:
        return _ChunkedLogprobs.apply(hidden, weight, None, None, targets, chunk)
    pieces, at = [], 0

    def plain(a, b):
        if b > a:
            pieces.append(_ChunkedLogprobs.apply(hidden[a:b], weight, None, None, targets[a:b], chunk))

    for run in sorted(head_lora, key=lambda r: r.start):
        plain(at, run.start)
        h = hidden[run.start : run.end]
        x = (h if run.noise is None else h * run.noise.to(h.dtype)).to(run.A.dtype)  # LoRA math in the bank's dtype
        u = (x @ run.A.t()) * run.scale  # PEFT: lora_B(lora_A(dropout(x))) * scaling
        pieces.append(_ChunkedLogprobs.apply(h, weight, u, run.B, targets[run.start : run.end], chunk))
        at = run.end
    plain(at, hidden.shape[0])
    lp, ent = zip(*pieces)
    return torch.cat(lp), torch.cat(ent)
