"""Token logprobs from hidden states without materializing full-vocabulary logits.

Semantics (the whole op)::

    logits = (hidden @ W.T).float()                  # [N, V]
    logprobs = log_softmax(logits)[arange(N), targets]
    entropy  = -(softmax(logits) * log_softmax(logits)).sum(-1)   # no gradient

computed ``chunk`` rows at a time; the backward recomputes each chunk's logits, so peak memory
is ``chunk × V`` fp32 instead of ``N × V``.
"""

from __future__ import annotations

import torch


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        n = hidden.shape[0]
        lp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_empty(n, dtype=torch.float32)
        for s in range(0, n, chunk):
            logits = (hidden[s : s + chunk] @ weight.t()).float()
            z = torch.logsumexp(logits, dim=-1)
            lse[s : s + chunk] = z
            lp[s : s + chunk] = logits.gather(1, targets[s : s + chunk, None]).squeeze(1) - z
            logp = logits - z[:, None]
            ent[s : s + chunk] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, _grad_ent):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w = ctx.needs_input_grad[:2]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            logits = (h @ weight.t()).float()
            g = grad_lp[s : s + chunk].float()
            # d lp / d logits = onehot(target) - softmax
            dlogits = -(logits - lse[s : s + chunk, None]).exp_() * g[:, None]
            dlogits.scatter_add_(1, targets[s : s + chunk, None], g[:, None])
            if need_h:
                gh[s : s + chunk] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                gw += dlogits.t() @ h.float()
        return gh, (gw.to(weight.dtype) if need_w else None), None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024):
    """hidden [N, H], weight [V, H] (the LM head), targets [N] -> (logprobs [N] fp32, entropy [N])."""
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"target token ids must be in [0, {weight.shape[0]}), got range "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    return _ChunkedLogprobs.apply(hidden, weight, targets.long(), max(1, int(chunk)))
