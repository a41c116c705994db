"""Expert parallelism for a `Fleet`: every MoE layer's frozen experts and their (slot × expert)
LoRA factors are sliced together on the expert dimension (``E / ep`` experts per rank) and the
routed tokens travel to their experts' ranks (`expert_dispatch.ExpertAllToAll`).

``apply_expert_parallel(fleet, ep_group, expert_dp_group)`` changes the fleet in place, before
training: layer code stays single-process (`MultiLoRAExperts` only learns which experts it
holds and gets a ``token_dispatcher``); what the engine needs to know about the sliced bank is
on each parameter's ``_lorafleet_shard`` tag (`ExpertShard`). DeepSeek / Qwen2-MoE shared
experts are plain linears, replicated like every dense layer; routers stay replicated too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..lora.experts import FACTOR_INDEX, FACTORS, SHARED_FACTORS, MultiLoRAExperts
from .expert_dispatch import ExpertAllToAll

__all__ = ["ExpertShard", "apply_expert_parallel", "shard_of"]


class ExpertShard:
    """Placement of one expert-LoRA factor pool (``gate_up_A [rows, R, H]`` and the three
    others) under expert parallelism; set as ``param._lorafleet_shard``. Sharding is a property
    of a *view* (a slot's rows, `MultiLoRAExperts.factor_views`), not of the pool: a per-expert
    slot's rows are this rank's experts, a shared slot's one row is a replica.

    - ``dim``: the expert dim of a view with a leading slot dim (``view.unsqueeze(0)``, as
      `shards.py` hands it over), 1; on the view itself it is 0. `gather` and `slice` take
      either shape (a view of the factor, its grad, or a view-shaped AdamW moment / master).
    - ``shard_group``: the EP group; rank ``i`` holds experts ``local_range = (start, end)`` of
      ``global_size``.
    - ``replicate_group``: the expert-data-parallel group, ranks holding the same experts for
      other tokens; a per-expert gradient is SUM-reduced over it (None: no replicas). It needs no
      reduction over ``shard_group``: every token routed to an expert arrived at its owner.

    **Shared factors** (`shards.view_shard` gives None: the slot's ``expert_sharing`` shares this
    factor across experts, e.g. gate_up A of a ``shared_a`` slot) are not sharded. The factor
    is one pool row on every EP rank, a replica kept identical (same init, same reduced
    gradient, same AdamW step); each rank's gradient there only covers the tokens its own
    experts processed, so it is SUM-reduced over ``shard_group`` *and* ``replicate_group``
    (`shards.reduce_group`: every rank) — the whole expert world, the same ranks a dense
    factor is reduced over when EP is carved out of data parallelism. Its norm counts once (no sum across shards), and
    it is saved and loaded as is. Why a row in the same pool rather than a separate parameter:
    one step mixes adapters of every mode, and the grouped LoRA kernel takes one stacked A and
    one B per projection, addressed by factor row.
    """

    def __init__(self, module: MultiLoRAExperts, factor: int, shard_group, replicate_group):
        self.module, self.factor = module, factor  # factor: index into SHARED_FACTORS' tuples
        self.dim, self.ndim = 1, 4
        self.shard_group, self.replicate_group = shard_group, replicate_group
        self.global_size = module.num_experts
        self.local_range = (module.expert_start, module.expert_start + module.num_local_experts)

    def _dim(self, t: torch.Tensor) -> int:
        if t.dim() not in (self.ndim, self.ndim - 1):
            raise ValueError(f"expected a {self.ndim - 1}-d view or one with a slot dim, got {tuple(t.shape)}")
        return self.dim if t.dim() == self.ndim else self.dim - 1

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The full tensor along the expert dim from every rank's shard (a collective over
        ``shard_group``: every rank calls it)."""
        d = self._dim(t)
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.shard_group))]
        dist.all_gather(parts, t.contiguous(), group=self.shard_group)
        return torch.cat(parts, dim=d)

    def slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full tensor (a view; no communication)."""
        d = self._dim(full)
        if full.shape[d] != self.global_size:
            raise ValueError(f"expected {self.global_size} experts on dim {d}, got {tuple(full.shape)}")
        start, end = self.local_range
        return full.narrow(d, start, end - start)

    def __repr__(self) -> str:
        return f"ExpertShard(dim={self.dim}, local_range={self.local_range}, global_size={self.global_size})"


def shard_of(param) -> ExpertShard | None:
    return getattr(param, "_lorafleet_shard", None)


def apply_expert_parallel(fleet, ep_group, expert_dp_group=None) -> None:
    """Slice every MoE layer of ``fleet`` to this rank's ``E / ep`` experts and install the
    all-to-all dispatch. Adapters already in the fleet keep their values (and optimizer state,
    sliced alike); call it on every rank with the same fleet, before the first step.

    ``ep_group``: the ranks whose experts together make up a layer (each rank holds ``E / ep``);
    ``expert_dp_group``: the ranks holding the same experts as this one (None or size 1: none).
    """
    ep, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    experts = fleet._att.experts
    # everything that can fail is checked before any change: every rank fails alike, no hang
    if not experts:
        raise ValueError("expert parallelism needs expert LoRA modules (a MoE base and expert_lora=True)")
    for path, m in experts.items():
        if m.token_dispatcher is not None:
            raise ValueError(f"{path}: expert parallelism is already applied")
        if m.num_experts % ep:
            raise ValueError(f"{path}: {m.num_experts} experts are not divisible by the expert-parallel degree {ep}")
    replicate = expert_dp_group if expert_dp_group is not None and dist.get_world_size(expert_dp_group) > 1 else None
    for path, m in experts.items():
        local = m.num_experts // ep
        start = rank * local
        _narrow_base(m, start, local)
        # per-expert slots keep their local rows, shared factors their one row (a replica); a
        # pending shared gradient is counted once, on EP rank 0
        m.narrow_experts(start, local, keep_shared_grad=rank == 0)
        for i, (_, name) in enumerate(FACTORS):
            getattr(m, name)._lorafleet_shard = ExpertShard(m, i, ep_group, replicate)
        m.token_dispatcher = ExpertAllToAll(ep_group)
    _narrow_train_state(fleet, rank)


@torch.no_grad()
def _narrow_base(m: MultiLoRAExperts, start: int, n: int) -> None:
    base = m.base_layer
    names = [m.up_name, "down_proj"] + ([f"{m.up_name}_bias", "down_proj_bias"] if m.has_bias else [])
    for name in names:
        p = getattr(base, name)
        p.data = p.data[start:start + n].clone()  # copies E/ep experts; the full tensor is released


def _narrow_train_state(fleet, rank: int) -> None:
    """Per-expert moments, masters and fp32 gradient sums of existing adapters, sliced like the
    bank (view-shaped: experts on dim 0); a pending shared gradient stays on EP rank 0 only."""
    experts = fleet._att.experts
    for name, st in fleet._train.items():
        shared = SHARED_FACTORS[fleet._configs[name].expert_sharing]
        for store, is_grad in ((st.adam.exp_avg, False), (st.adam.exp_avg_sq, False),
                               (st.adam.master, False), (st.grad_acc, True)):
            for key in list(store):
                path, _, suffix = key.rpartition(".")
                path, _, proj = path.rpartition(".")
                m = experts.get(path)
                if m is None:
                    continue
                i = FACTOR_INDEX[f"{proj}.{suffix}"]
                if not shared[i]:
                    store[key] = store[key][m.expert_start:m.expert_start + m.num_local_experts].clone()
                elif is_grad and rank != 0:
                    store[key] = torch.zeros_like(store[key])
