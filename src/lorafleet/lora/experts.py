"""`MultiLoRAExperts`: packed MoE experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
plus per-(slot, expert) LoRA, computed on the routed tokens — never a materialized ΔW.

Every (token, k) pair is keyed ``expert * (S + 1) + (slot + 1)`` and sorted once per layer, so
one permutation serves both the frozen grouped GEMM (runs of one expert) and the LoRA (runs of
one (expert, slot) "virtual expert" inside them). Factor storage per projection is
``A[S, E, R, in]`` / ``B[S, E, out, R]``; a factor shared by a slot's experts lives at (local)
expert 0.

The forward is three steps — `pair_slots` (each pair's LoRA slot), `plan` (sort pairs, group
offsets, LoRA segments) and `grouped_products` (the expert MLP over sorted pairs) — so expert
parallelism (``lorafleet.distributed.expert_parallel``) can run the same plan and products on
the pairs an all-to-all brought to this rank (it installs a ``token_dispatcher``). It narrows
the module to experts ``[expert_start, expert_start + num_local_experts)`` of ``num_experts``;
`factor_index`, `factor_views` and `init_slot` speak in those local experts, and a shared factor
then lives at local expert 0 on every rank (a replica).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import dispatch
from ..kernels.dispatch import Segment
from .bank import SlotBank
from .linear import kaiming_uniform_A
from .routing import current_routing

# which factors are shared across experts, per sharing mode: (gate_up A, gate_up B, down A, down B)
SHARED_FACTORS = {
    "none": (False, False, False, False),
    "shared_a": (True, False, True, False),
    "shared_outer": (True, False, False, True),
}
# (adapter_views key suffix, parameter name), in SHARED_FACTORS order
FACTORS = (("gate_up.A", "gate_up_A"), ("gate_up.B", "gate_up_B"), ("down.A", "down_A"), ("down.B", "down_B"))


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
        # the experts this module holds: all of them unless expert parallelism narrowed it
        self.expert_start, self.num_local_experts = 0, E
        # set by expert parallelism: callable(self, hidden, top_k_index, top_k_weights) that moves
        # pairs to their experts' ranks and back around `plan` + `grouped_products`
        self.token_dispatcher = None
        S, R = bank.max_adapters, bank.max_rank
        dtype = dtype or up_w.dtype
        dev = up_w.device
        z = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=dtype, device=dev))  # noqa: E731
        self.gate_up_A = z(S, E, R, H)
        self.gate_up_B = z(S, E, up_out, R)
        self.down_A = z(S, E, R, inter)
        self.down_B = z(S, E, H, R)
        self.enabled = [False] * S

    # ------------------------------------------------------------ slot layout
    def factor_index(self, slot: int, expert: int, shared: bool) -> int:
        """Row of ``factor.view(S * E_local, ...)`` holding (slot, local expert)'s factor."""
        return slot * self.num_local_experts + (0 if shared else expert)

    def factor_views(self, slot: int, rank: int, sharing: str) -> list[tuple[str, nn.Parameter, tuple]]:
        """(key suffix, parameter, index) of a slot's four factors: ``param[index]`` is the
        rank-sliced factor, expert dim 1 for a shared one, else this module's local experts."""
        views = []
        for (key, name), shared in zip(FACTORS, SHARED_FACTORS[sharing]):
            n = slice(0, 1 if shared else self.num_local_experts)
            idx = (slot, n, slice(0, rank)) if key.endswith("A") else (slot, n, slice(None), slice(0, rank))
            views.append((key, getattr(self, name), idx))
        return views

    @torch.no_grad()
    def init_slot(self, slot: int, rank: int, sharing: str, gen: torch.Generator) -> None:
        """Draw the slot's A factors from ``gen`` (gate_up, then down; B stays zero). The draw
        covers every expert, so a narrowed module keeps its experts' part of the same init."""
        g_a, _, d_a, _ = SHARED_FACTORS[sharing]
        for A, shared in ((self.gate_up_A, g_a), (self.down_A, d_a)):
            n = 1 if shared else self.num_experts
            full = kaiming_uniform_A((n, rank, A.shape[-1]), gen, A.dtype, A.device)
            if not shared:
                full = full[self.expert_start:self.expert_start + self.num_local_experts]
            A[slot, :full.shape[0], :rank] = full

    # ----------------------------------------------------------------- forward
    def pair_slots(self, pair_tok: torch.Tensor, num_tokens: int) -> torch.Tensor | None:
        """Each (token, k) pair's LoRA slot (-1: no expert LoRA); None when no routed slot has
        expert LoRA here."""
        routing = current_routing()
        if routing is None or not any(self.enabled[s] for s in routing.slots):
            return None
        enabled = torch.tensor(self.enabled + [False], device=pair_tok.device)  # index -1 -> False
        slot = routing.token_slot(num_tokens, self.path)[pair_tok]
        return torch.where(enabled[slot], slot, torch.full_like(slot, -1))

    def plan(self, expert: torch.Tensor, lora_slot: torch.Tensor | None):
        """Sort pairs by (local expert, slot): permutation, sorted experts, per-expert offsets
        and the LoRA segments of each projection (one host sync)."""
        E, S = self.num_local_experts, self.bank.max_adapters
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
        return perm, expert[perm], expert_offsets, lora

    def grouped_products(self, x: torch.Tensor, expert_sorted: torch.Tensor, offsets: list[int], lora) -> torch.Tensor:
        """The expert MLP with LoRA on pairs sorted by `plan`: ``x [P, H]`` -> ``[P, H]``."""
        base = self.base_layer
        H = x.shape[-1]
        S, E, R = self.bank.max_adapters, self.num_local_experts, self.bank.max_rank
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
        return o

    def check_experts(self, expert: torch.Tensor) -> None:
        E = self.num_experts
        if expert.numel() and (int(expert.max()) >= E or int(expert.min()) < 0):
            raise ValueError(f"{self.path}: router chose an expert id outside [0, {E})")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.token_dispatcher is not None:
            return self.token_dispatcher(self, hidden_states, top_k_index, top_k_weights)
        N, K = top_k_index.shape
        H = hidden_states.shape[-1]
        expert = top_k_index.reshape(-1).long()
        self.check_experts(expert)
        pair_tok = torch.arange(N, device=top_k_index.device).repeat_interleave(K)
        perm, expert_sorted, offsets, lora = self.plan(expert, self.pair_slots(pair_tok, N))
        o = self.grouped_products(hidden_states[pair_tok[perm]], expert_sorted, offsets, lora)
        o = o * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(o.dtype)
        # deterministic reduction over k (as HF's grouped path), no atomics
        return o[inverse(perm)].view(N, K, H).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        local = "" if self.num_local_experts == self.num_experts else \
            f" (local {self.expert_start}..{self.expert_start + self.num_local_experts - 1})"
        return (
            f"path={self.path}, experts={self.num_experts}{local}, hidden={self.hidden_size}, "
            f"inter={self.inter}, transposed={self.transposed}, bias={self.has_bias}"
        )


def inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv
