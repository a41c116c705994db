"""`MultiLoRAExperts`: packed MoE experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
plus per-(slot, expert) LoRA, computed on the routed tokens — never a materialized ΔW.

Every (token, k) pair is keyed ``expert * (S + 1) + (slot + 1)`` and sorted once per layer, so
one permutation serves both the frozen grouped GEMM (runs of one expert) and the LoRA (runs of
one (expert, slot) "virtual expert" inside them).

Factor storage per projection is a row pool: ``A [rows, R, in]`` / ``B [rows, out, R]``, one
per factor (gate_up A, gate_up B, down A, down B), and a per-slot row table. A slot whose
adapter has that factor per expert owns ``num_local_experts`` consecutive rows; a slot that
shares it across experts (`SHARED_FACTORS`) owns one row; a slot without expert LoRA owns none.
So a shared factor is stored once per slot, not once per expert. Rows are taken when a slot is
set up (`init_slot` / `assign_slot`, from `Fleet.add_adapter`) and freed on removal
(`release_slot`); later slots reuse free rows first, and a pool grows only then — one
reallocation that packs the live rows, never during a forward. The grouped LoRA kernel takes the
stacked pool and a row index per segment (`factor_index`), so the layout is only an index.

The forward is three steps — `pair_slots` (each pair's LoRA slot), `plan` (sort pairs, group
offsets, LoRA segments) and `grouped_products` (the expert MLP over sorted pairs) — so expert
parallelism (``lorafleet.distributed.expert_parallel``) can run the same plan and products on
the pairs an all-to-all brought to this rank (it installs a ``token_dispatcher``). It narrows
the module to experts ``[expert_start, expert_start + num_local_experts)`` of ``num_experts``;
`factor_index`, `factor_views` and `init_slot` speak in those local experts (`narrow_experts`
keeps each per-expert slot's local rows), and a shared factor's row is then a replica on every
rank.
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
# either spelling of a factor (key suffix or parameter name) -> its index in FACTORS / SHARED_FACTORS
FACTOR_INDEX = {name: i for i, pair in enumerate(FACTORS) for name in pair}


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
        R = bank.max_rank
        dtype = dtype or up_w.dtype
        dev = up_w.device
        z = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=dtype, device=dev))  # noqa: E731
        # row pools (see the module docstring): empty until a slot takes rows
        self.gate_up_A = z(0, R, H)
        self.gate_up_B = z(0, up_out, R)
        self.down_A = z(0, R, inter)
        self.down_B = z(0, H, R)
        # per factor (FACTORS order): slot -> (first row, rows, shared)
        self._rows: list[dict[int, tuple[int, int, bool]]] = [{} for _ in FACTORS]
        self.enabled = [False] * bank.max_adapters
        # (slot, "gate_up" | "down") -> that projection's scale where not the slot's (PEFT patterns)
        self.scale_override: dict[tuple[int, str], float] = {}

    # ------------------------------------------------------------ slot layout
    def _factor_param(self, factor: int) -> nn.Parameter:
        return getattr(self, FACTORS[factor][1])

    def slot_rows(self, factor: int, slot: int) -> tuple[int, int, bool] | None:
        """(first row, rows, shared) of ``slot``'s factor in its pool, None if it holds none."""
        return self._rows[factor].get(slot)

    def slot_part(self, name: str, t: torch.Tensor, slot: int) -> torch.Tensor:
        """``slot``'s rows of pool ``name`` (e.g. "gate_up_A") in ``t`` (the pool or its grad):
        ``[experts or 1, ...]``, empty when the slot holds no rows."""
        rows = self._rows[FACTOR_INDEX[name]].get(slot)
        return t[0:0] if rows is None else t[rows[0]:rows[0] + rows[1]]

    def bank_bytes(self) -> int:
        """Bytes the four factor pools allocate (their gradients, when present, as many again)."""
        return sum(p.numel() * p.element_size() for p in self.parameters(recurse=False))

    def factor_index(self, slot: int, expert: int, factor: int) -> int:
        """Row of factor ``factor``'s pool (FACTORS order) holding (slot, local expert)'s factor."""
        rows = self._rows[factor].get(slot)
        if rows is None:
            raise ValueError(f"{self.path}: slot {slot} has expert LoRA enabled but holds no {FACTORS[factor][1]} rows")
        r0, _, shared = rows
        return r0 + (0 if shared else expert)

    def factor_views(self, slot: int, rank: int, sharing: str) -> list[tuple[str, nn.Parameter, tuple]]:
        """(key suffix, parameter, index) of a slot's four factors: ``param[index]`` is the
        rank-sliced factor, ``[1, ...]`` for a shared one, else ``[local experts, ...]``."""
        views = []
        for i, ((key, name), shared) in enumerate(zip(FACTORS, SHARED_FACTORS[sharing])):
            r0, n, held = self._rows[i][slot]
            if held != shared:
                raise ValueError(f"{self.path}: slot {slot} holds {FACTORS[i][1]} as "
                                 f"{'shared' if held else 'per-expert'}, not as {sharing!r} says")
            rows = slice(r0, r0 + n)
            idx = (rows, slice(0, rank)) if key.endswith("A") else (rows, slice(None), slice(0, rank))
            views.append((key, getattr(self, name), idx))
        return views

    @torch.no_grad()
    def assign_slot(self, slot: int, sharing: str) -> None:
        """Give ``slot`` its rows in each pool (zero): ``num_local_experts`` rows for a per-expert
        factor, 1 for a shared one. Free rows are reused first (first fit); a pool without room
        grows (one reallocation, live rows packed in slot order, gradients moved alike)."""
        if any(slot in rows for rows in self._rows):
            raise ValueError(f"{self.path}: slot {slot} already holds rows")
        for i, shared in enumerate(SHARED_FACTORS[sharing]):
            n = 1 if shared else self.num_local_experts
            start = self._free_run(i, n)
            if start is None:
                start = self._repack(i, extra=n)
            self._rows[i][slot] = (start, n, shared)

    @torch.no_grad()
    def release_slot(self, slot: int) -> None:
        """Zero ``slot``'s rows (values and gradients) and free them for later slots."""
        for i in range(len(FACTORS)):
            rows = self._rows[i].pop(slot, None)
            if rows is None:
                continue
            p = self._factor_param(i)
            p[rows[0]:rows[0] + rows[1]].zero_()
            if p.grad is not None:
                p.grad[rows[0]:rows[0] + rows[1]].zero_()

    def _free_run(self, factor: int, n: int) -> int | None:
        """First row of the first run of ``n`` free rows in the pool, None if there is none."""
        pos = 0
        for r0, k, _ in sorted(self._rows[factor].values()):
            if r0 - pos >= n:
                return pos
            pos = max(pos, r0 + k)
        return pos if self._factor_param(factor).shape[0] - pos >= n else None

    def _repack(self, factor: int, extra: int = 0, keep=None) -> int:
        """Reallocate a pool to its live rows (slot order) plus ``extra`` free rows at the end;
        returns the first free row. ``keep(slot, rows, shared)`` -> (source row, rows, shared,
        keep grad) chooses what each slot keeps (expert parallelism's narrowing). The parameter
        object stays (its tensor is swapped): tags, FSDP's ignored set and any reference remain."""
        p = self._factor_param(factor)
        plan, size = [], 0
        for s in sorted(self._rows[factor]):
            r0, n, shared = self._rows[factor][s]
            src, n, shared, grad = keep(s, r0, n, shared) if keep is not None else (r0, n, shared, True)
            plan.append((s, src, n, shared, grad, size))
            size += n
        data = p.data.new_zeros((size + extra, *p.shape[1:]))
        grad = None if p.grad is None else p.grad.new_zeros(data.shape)
        for s, src, n, shared, keep_grad, dst in plan:
            data[dst:dst + n] = p.data[src:src + n]
            if grad is not None and keep_grad:
                grad[dst:dst + n] = p.grad[src:src + n]
            self._rows[factor][s] = (dst, n, shared)
        _replace_storage(p, data, grad)
        return size

    @torch.no_grad()
    def narrow_experts(self, start: int, n: int, keep_shared_grad: bool) -> None:
        """Keep experts ``[start, start + n)`` of the held ones in every pool (expert
        parallelism): a per-expert slot keeps those ``n`` rows, a shared factor its one row (a
        replica; its pending gradient only where ``keep_shared_grad``). The module then holds
        experts ``expert_start .. expert_start + num_local_experts - 1`` of ``num_experts``."""
        if start < 0 or n < 1 or start + n > self.num_local_experts:
            raise ValueError(f"{self.path}: cannot keep experts [{start}, {start + n}) of the "
                             f"{self.num_local_experts} held")

        def keep(s, r0, k, shared):
            return (r0, 1, True, keep_shared_grad) if shared else (r0 + start, n, False, True)

        for i in range(len(FACTORS)):
            self._repack(i, keep=keep)
        self.expert_start, self.num_local_experts = self.expert_start + start, n

    @torch.no_grad()
    def init_slot(self, slot: int, rank: int, sharing: str, gen: torch.Generator) -> None:
        """Take the slot's rows (`assign_slot`, unless it holds them) and draw its A factors from
        ``gen`` (gate_up, then down; B stays zero). The draw covers every expert, so a narrowed
        module keeps its experts' part of the same init."""
        if not any(slot in rows for rows in self._rows):
            self.assign_slot(slot, sharing)
        for i, (key, name) in enumerate(FACTORS):
            if not key.endswith("A"):
                continue
            A, (r0, k, shared) = getattr(self, name), self._rows[i][slot]
            full = kaiming_uniform_A((1 if shared else self.num_experts, rank, A.shape[-1]), gen, A.dtype, A.device)
            if not shared:
                full = full[self.expert_start:self.expert_start + self.num_local_experts]
            A[r0:r0 + k, :rank] = full

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
        per_slot: dict[int, tuple] = {}  # slot -> (rank, scale, per factor: (row of expert 0, row step per expert))
        pos = 0
        for e in range(E):
            for s1, n in enumerate(counts[e]):
                if n and s1 > 0:
                    s = s1 - 1
                    if s not in per_slot:  # once per slot and plan, in factor_index's error order
                        info = self.bank.info(s)
                        row0 = [self.factor_index(s, 0, f) for f in range(4)]
                        rows = [(r0, self.factor_index(s, 1, f) - r0) for f, r0 in zip(range(4), row0)]
                        sc = tuple(self.scale_override.get((s, p), info.scale) for p in ("gate_up", "down"))
                        per_slot[s] = info.rank, sc, rows
                    r, sc, rows = per_slot[s]
                    ix = [r0 + step * e for r0, step in rows]
                    lora["gate_up"].append(Segment(pos, pos + n, ix[0], ix[1], r, sc[0]))
                    lora["down"].append(Segment(pos, pos + n, ix[2], ix[3], r, sc[1]))
                pos += n
            expert_offsets.append(pos)
        return perm, expert[perm], expert_offsets, lora

    def grouped_products(self, x: torch.Tensor, expert_sorted: torch.Tensor, offsets: list[int], lora) -> torch.Tensor:
        """The expert MLP with LoRA on pairs sorted by `plan`: ``x [P, H]`` -> ``[P, H]``."""
        base = self.base_layer
        h = dispatch.grouped_mm(x, getattr(base, self.up_name), offsets, self.transposed)
        if self.has_bias:
            h = h + getattr(base, f"{self.up_name}_bias")[expert_sorted]
        if lora["gate_up"]:
            h = h + dispatch.segment_lora(x, self.gate_up_A, self.gate_up_B, lora["gate_up"]).to(h.dtype)
        act = base._apply_gate(h) if self.has_gate else base.act_fn(h)

        o = dispatch.grouped_mm(act, base.down_proj, offsets, self.transposed)
        if self.has_bias:
            o = o + base.down_proj_bias[expert_sorted]
        if lora["down"]:
            o = o + dispatch.segment_lora(act, self.down_A, self.down_B, lora["down"]).to(o.dtype)
        return o

    def check_experts(self, expert: torch.Tensor) -> None:
        E = self.num_experts
        if expert.numel() and not 0 <= (lo_hi := torch.stack(torch.aminmax(expert)).tolist())[0] <= lo_hi[1] < E:  # one sync
            raise ValueError(f"{self.path}: router chose an expert id outside [0, {E})")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.token_dispatcher is not None:
            return self.token_dispatcher(self, hidden_states, top_k_index, top_k_weights)
        N, K = top_k_index.shape
        expert, pair_tok = self._pairs(top_k_index)
        perm, expert_sorted, offsets, lora = self.plan(expert, self.pair_slots(pair_tok, N))
        o = self.grouped_products(hidden_states[pair_tok[perm]], expert_sorted, offsets, lora)
        return self._combine(o, perm, top_k_weights, N, K, hidden_states.dtype)

    def _pairs(self, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (token, k) pairs of a routing, flattened: each pair's expert (checked) and token."""
        N, K = top_k_index.shape
        expert = top_k_index.reshape(-1).long()
        self.check_experts(expert)
        return expert, torch.arange(N, device=top_k_index.device).repeat_interleave(K)

    @staticmethod
    def _combine(o: torch.Tensor, perm: torch.Tensor, top_k_weights: torch.Tensor, N: int, K: int,
                 dtype) -> torch.Tensor:
        """Expert outputs ``o`` of the pairs in ``perm`` order -> ``[N, H]``: weighted by the
        router scores, then summed over k in a fixed order (as HF's grouped path, no atomics)."""
        o = o * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(o.dtype)
        return o[inverse(perm)].view(N, K, o.shape[-1]).sum(dim=1).to(dtype)

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


def _replace_storage(p: nn.Parameter, data: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Give ``p`` new data (and grad) of another shape, keeping the Python object. Assigning
    ``p.data`` is not enough: while an earlier forward's graph is alive, autograd keeps its
    gradient accumulator for ``p`` with the old shape, and the next backward fails ("got
    [16, ...] but expected [8, ...]"). ``swap_tensors`` replaces that autograd state too."""
    new = nn.Parameter(data, requires_grad=p.requires_grad)
    new.grad = grad
    new.__dict__.update(p.__dict__)  # attributes (expert parallelism's shard tag) stay on p
    try:
        torch.utils.swap_tensors(p, new)
    except RuntimeError:  # a live graph still saved p for its backward: that graph keeps the old
        p.data = data     # tensor; new forwards see the new one
        p.grad = grad
