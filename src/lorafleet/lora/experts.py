"""`MultiLoRAExperts`: packed MoE experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
plus per-(slot, expert) LoRA, computed on the routed tokens — never a materialized ΔW.

Every (token, k) pair is keyed ``expert * (S + 1) + (slot + 1)`` and sorted once per layer, so
one permutation serves both the frozen grouped GEMM (runs of one expert) and the LoRA (runs of
one (expert, slot) "virtual expert" inside them). Factor storage per projection is
``A[S, E, R, in]`` / ``B[S, E, out, R]``; a factor shared by a slot's experts lives at expert 0.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import dispatch
from ..kernels.dispatch import Segment
from .bank import SlotBank
from .routing import current_routing

# which factors are shared across experts, per sharing mode: (gate_up A, gate_up B, down A, down B)
SHARED_FACTORS = {
    "none": (False, False, False, False),
    "shared_a": (True, False, True, False),
    "shared_outer": (True, False, False, True),
}


class MultiLoRAExperts(nn.Module):
    def __init__(self, base: nn.Module, bank: SlotBank, path: str, dtype=None):
        super().__init__()
        self.base_layer = base
        self.bank = bank
        self.path = path
        self.has_gate = getattr(base, "has_gate", True)
        self.up_name = "gate_up_proj" if self.has_gate else "up_proj"
        up_w, down_w = getattr(base, self.up_name), base.down_proj
        self.transposed = bool(getattr(base, "is_transposed", False))
        self.has_bias = bool(getattr(base, "has_bias", False))
        E = up_w.shape[0]
        if self.transposed:  # [E, in, out]
            H, up_out = up_w.shape[1], up_w.shape[2]
            inter = down_w.shape[1]
        else:  # [E, out, in]
            up_out, H = up_w.shape[1], up_w.shape[2]
            inter = down_w.shape[2]
        self.num_experts, self.hidden_size, self.up_out, self.inter = E, H, up_out, inter
        S, R = bank.max_adapters, bank.max_rank
        dtype = dtype or up_w.dtype
        dev = up_w.device
        z = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=dtype, device=dev))  # noqa: E731
        self.gate_up_A = z(S, E, R, H)
        self.gate_up_B = z(S, E, up_out, R)
        self.down_A = z(S, E, R, inter)
        self.down_B = z(S, E, H, R)
        self.enabled = [False] * S

    def factor_index(self, slot: int, expert: int, shared: bool) -> int:
        return slot * self.num_experts + (0 if shared else expert)

    def _plan(self, top_k_index: torch.Tensor):
        """Sort (token, k) pairs; return permutation, per-expert offsets and LoRA segments."""
        N, K = top_k_index.shape
        E, S = self.num_experts, self.bank.max_adapters
        dev = top_k_index.device
        expert = top_k_index.reshape(-1).long()
        if expert.numel() and (int(expert.max()) >= E or int(expert.min()) < 0):
            raise ValueError(f"{self.path}: router chose an expert id outside [0, {E})")
        pair_tok = torch.arange(N, device=dev).repeat_interleave(K)
        routing = current_routing()
        lora_slot = None
        if routing is not None and any(self.enabled[s] for s in routing.slots):
            enabled = torch.tensor(self.enabled + [False], device=dev)  # index -1 -> False
            slot = routing.token_slot(N, self.path)[pair_tok]
            lora_slot = torch.where(enabled[slot], slot, torch.full_like(slot, -1))
        key = expert * (S + 1) + (0 if lora_slot is None else lora_slot + 1)
        key_sorted, perm = torch.sort(key, stable=True)
        counts = torch.bincount(key_sorted, minlength=E * (S + 1)).view(E, S + 1).tolist()  # one sync
        expert_offsets, lora = [0], {"gate_up": [], "down": []}
        pos = 0
        for e in range(E):
            for s1, n in enumerate(counts[e]):
                if n and s1 > 0:
                    s = s1 - 1
                    info = self.bank.info(s)
                    g_a, g_b, d_a, d_b = SHARED_FACTORS[info.expert_sharing]
                    r, sc = info.rank, info.scale
                    lora["gate_up"].append(
                        Segment(pos, pos + n, self.factor_index(s, e, g_a), self.factor_index(s, e, g_b), r, sc)
                    )
                    lora["down"].append(
                        Segment(pos, pos + n, self.factor_index(s, e, d_a), self.factor_index(s, e, d_b), r, sc)
                    )
                pos += n
            expert_offsets.append(pos)
        return perm, pair_tok[perm], expert[perm], expert_offsets, lora

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        base = self.base_layer
        N, K = top_k_index.shape
        H = hidden_states.shape[-1]
        perm, tok_sorted, expert_sorted, offsets, lora = self._plan(top_k_index)
        x = hidden_states[tok_sorted]  # [P, H]
        S, E, R = self.bank.max_adapters, self.num_experts, self.bank.max_rank

        h = dispatch.grouped_mm(x, getattr(base, self.up_name), offsets, self.transposed)
        if self.has_bias:
            h = h + getattr(base, f"{self.up_name}_bias")[expert_sorted]
        if lora["gate_up"]:
            A = self.gate_up_A.view(S * E, R, H)
            B = self.gate_up_B.view(S * E, self.up_out, R)
            h = h + dispatch.segment_lora(x, A, B, lora["gate_up"]).to(h.dtype)
        act = base._apply_gate(h) if self.has_gate else base.act_fn(h)

        o = dispatch.grouped_mm(act, base.down_proj, offsets, self.transposed)
        if self.has_bias:
            o = o + base.down_proj_bias[expert_sorted]
        if lora["down"]:
            A = self.down_A.view(S * E, R, self.inter)
            B = self.down_B.view(S * E, H, R)
            o = o + dispatch.segment_lora(act, A, B, lora["down"]).to(o.dtype)

        o = o * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(o.dtype)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        # deterministic reduction over k (as HF's grouped path), no atomics
        return o[inv].view(N, K, H).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (
            f"path={self.path}, experts={self.num_experts}, hidden={self.hidden_size}, "
            f"inter={self.inter}, transposed={self.transposed}, bias={self.has_bias}"
        )
