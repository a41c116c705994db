"""Which of an adapter's factors are split across ranks, and moving them between their files'
shape (the whole factor) and this rank's shard.

Expert parallelism tags each sharded bank parameter with ``param._lorafleet_shard`` (see
`expert_parallel.py`): ``dim``, ``shard_group``, ``replicate_group``, ``global_size``,
``local_range``, ``gather(t)`` and ``slice(full)``. Sharding is a property of a *view*, not of
the parameter: a factor shared by a slot's experts is one row of the sharded row pool on every
rank, so it is a replica (its gradient is summed over every rank, like a dense factor's) and is
never gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..lora.experts import FACTOR_INDEX, SHARED_FACTORS

TAG = "_lorafleet_shard"

WORLD = "world"  # reduce-group key of a replicated factor: SUM over every rank


def view_shard(fleet, name: str, key: str, param):
    """The shard tag when view ``key`` of adapter ``name`` is split across ranks, else None."""
    tag = getattr(param, TAG, None)
    if tag is None:
        return None
    suffix = ".".join(key.rsplit(".", 2)[-2:])
    i = FACTOR_INDEX.get(suffix)
    if i is not None and SHARED_FACTORS[fleet.adapters[name].expert_sharing][i]:
        return None  # a shared factor: one replica per rank
    return tag


def view_dim(tag) -> int:
    """The sharded dim of a view ``param[slot, ...]``: the slot index drops dim 0."""
    if tag.dim < 1:
        raise ValueError("lorafleet: a bank parameter sharded on its slot dim is not supported")
    return tag.dim - 1


def gather_view(tag, t: torch.Tensor) -> torch.Tensor:
    """A view-shaped local tensor -> the whole factor (a collective over ``tag.shard_group``)."""
    return tag.gather(t.unsqueeze(0).contiguous()).squeeze(0)


def slice_view(tag, full: torch.Tensor) -> torch.Tensor:
    """The whole factor -> this rank's part of it (no communication)."""
    return tag.slice(full.unsqueeze(0)).squeeze(0)


def full_shape(tag, view: torch.Tensor) -> tuple:
    shape = list(view.shape)
    if tag is not None:
        shape[view_dim(tag)] = tag.global_size
    return tuple(shape)


def reduce_group(fleet, name: str, key: str, param):
    """Where a factor's gradient is summed: WORLD (replicated factors: every rank took part of
    the batch), the shard's replicate group, or None (a shard no other rank holds)."""
    tag = view_shard(fleet, name, key, param)
    return WORLD if tag is None else tag.replicate_group


def holds_pending_sum(fleet, name: str, key: str, param, rank: int) -> bool:
    """Whether this rank keeps a loaded checkpoint's pending gradient (the files hold the sum over
    ranks; exactly one rank of each reduce group gets it, the others zeros, so the next reduce
    restores the sum on any world size)."""
    group = reduce_group(fleet, name, key, param)
    if group is None:
        return True
    if group == WORLD:
        return rank == 0
    return min(dist.get_process_group_ranks(group)) == rank


def bucketed_all_reduce(items: list[tuple[object, torch.Tensor]], bucket_numel: int) -> int:
    """SUM-reduce tensors in place, in the given order: one flat buffer per (group, dtype) and at
    most ``bucket_numel`` elements per collective. Returns the elements sent (for the bench)."""
    by_group: dict[tuple, list[torch.Tensor]] = {}
    groups = {}
    for group, t in items:
        if group is None:
            continue
        k = (id(group) if group != WORLD else WORLD, t.dtype, t.device)
        groups[k] = None if group == WORLD else group
        by_group.setdefault(k, []).append(t)
    sent = 0
    for k, tensors in by_group.items():
        bucket, size = [], 0
        for t in tensors + [None]:
            if t is not None and (not bucket or size + t.numel() <= bucket_numel):
                bucket.append(t)
                size += t.numel()
                continue
            if bucket:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=groups[k])
                sent += flat.numel()
                o = 0
                for b in bucket:
                    b.copy_(flat[o:o + b.numel()].view_as(b))
                    o += b.numel()
            bucket, size = ([t], t.numel()) if t is not None else ([], 0)
    return sent
