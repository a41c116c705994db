"""Token dispatch for expert parallelism: (token, k) pairs travel to the rank owning their
expert with one all-to-all, their LoRA slot ids with a second one in the same splits, and the
expert outputs come back with a third (its autograd backward is a fourth, in reverse).

Per MoE layer and forward, on every rank of the EP group:

1. each pair gets its LoRA slot (`MultiLoRAExperts.pair_slots`) and the pairs are sorted by
   (global expert, slot), the single-process order, so the pairs bound for rank ``d`` are one
   contiguous chunk (experts ``d * E_local ...``), already grouped by expert;
2. counts per global expert go through ``all_to_all_single`` (each rank learns how many pairs
   every peer sends to each of its local experts), then the hidden states (autograd) and the
   slot ids (int32) in those splits;
3. the owner sorts what it received by (local expert, slot) and runs the module's own `plan` and
   `grouped_products` (frozen grouped GEMM per expert, LoRA per (slot, expert));
4. outputs go back in the reverse splits, are weighted by the router scores and summed over k,
   exactly as the single-process forward does.

Every rank issues the same collectives in the same order whatever its tokens are: an empty
chunk is an all-to-all of zero rows. Two details keep backward in step too:

- the all-to-all outputs always require grad (an ``anchor`` leaf is one of the op's inputs):
  tokens a rank receives may carry another rank's LoRA rows even when none of its own do, so
  every rank must run the backward all-to-all whenever any rank does;
- the op saves the anchor for backward, so non-reentrant activation checkpointing (which stops
  a recompute after the last saved tensor it needs) always recomputes through the combine
  all-to-all on every rank; the routing itself is replayed by `RoutingCheckpoint`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..lora.experts import MultiLoRAExperts, inverse


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``in_splits`` go to each rank; ``out_splits`` rows come from each.
    Backward sends gradients the opposite way."""

    @staticmethod
    def forward(ctx, x, anchor, out_splits, in_splits, group):
        ctx.save_for_backward(anchor)
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # noqa: B018 -- unpacking is what triggers a checkpoint recompute
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None, None


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class ExpertAllToAll:
    """Installed as ``MultiLoRAExperts.token_dispatcher`` by `apply_expert_parallel`."""

    def __init__(self, ep_group):
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group)
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self.last_splits = ([], [])  # pairs sent to / received from each rank, last forward (bench, tests)

    def anchor(self, device) -> torch.Tensor:
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self._anchors[device]

    def __call__(self, m: MultiLoRAExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        N, K = top_k_index.shape
        E, El, S = m.num_experts, m.num_local_experts, m.bank.max_adapters
        dev = hidden.device
        expert, pair_tok = m._pairs(top_k_index)
        slot = m.pair_slots(pair_tok, N)
        if slot is None:  # this rank has no expert-LoRA rows; peers still expect the slot ids
            slot = torch.full_like(expert, -1)
        perm = torch.sort(expert * (S + 1) + slot + 1, stable=True)[1]

        # counts: send_counts[e] pairs for global expert e; recv_counts[src * El + e] from src
        send_counts = torch.bincount(expert, minlength=E)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = torch.stack(
            [send_counts.view(self.ep, El).sum(1), recv_counts.view(self.ep, El).sum(1)]).tolist()  # one sync

        anchor = self.anchor(dev)
        x = _AllToAll.apply(hidden[pair_tok[perm]], anchor, recv_splits, send_splits, self.group)
        slot_recv = _exchange(slot[perm].to(torch.int32), recv_splits, send_splits, self.group).long()
        local_expert = torch.arange(El, device=dev).repeat(self.ep).repeat_interleave(recv_counts)
        self.last_splits = (send_splits, recv_splits)

        # on the owner: (local expert, slot) groups over the pairs of every source rank
        perm_local, expert_sorted, offsets, lora = m.plan(local_expert, slot_recv)
        o = m.grouped_products(x[perm_local], expert_sorted, offsets, lora)[inverse(perm_local)]
        o = _AllToAll.apply(o, anchor, send_splits, recv_splits, self.group)
        return m._combine(o, perm, top_k_weights, N, K, hidden.dtype)  # as the single-process forward
