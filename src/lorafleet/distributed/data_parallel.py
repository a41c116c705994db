"""`FleetComm`: what a `Fleet` hands its collectives to (``fleet.comm``) in a distributed run.

Every rank calls every fleet method with the same arguments (SPMD). The comm then:

- **splits each batch**: ``forward_backward(examples)`` runs this rank's contiguous share of the
  examples (a DPO pair stays together) and gathers logprobs, losses and entropies, so every rank
  returns exactly what the single-process call returns (metrics are summed in example order);
- **keeps gradients local** across ``forward_backward`` calls (accumulation costs nothing) and
  SUM-reduces each stepping adapter's factors once, at ``optim_step``, bucketed in slot order:
  replicated factors over every rank, expert shards over their replicate group. SUM, because
  Tinker's losses are sums over examples: the single-process gradient is the sum of the shares';
- **clips by the adapter's own global norm**: the squares of its shards summed across ranks; a
  norm that is inf/nan on one rank is inf on all, so all skip the same (fp16) steps;
- **gathers shards on write and slices them on read** (`shards.py`), so files do not depend on
  the world size; only rank 0 writes them.

When the model's forward itself communicates (FSDP all-gathers, expert all-to-alls), every rank
must run every forward and backward even with nothing to do: an empty share runs one base-model
placeholder row, and a rank without loss backpropagates a zero (`backward_anchor`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..engine.losses import resolve_config
from ..engine.training import ForwardBackwardResult
from ..types import Example
from . import shards
from .failure import guard

BUCKET_NUMEL = 1 << 24  # 64 MiB of fp32 per all-reduce


class FleetComm:
    def __init__(self, fleet, mesh, collective_forward: bool):
        self.fleet, self.mesh = fleet, mesh
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.collective_forward = collective_forward
        self.is_writer = self.rank == 0
        self.timeout_s = mesh.timeout_s
        self._norms: dict[str, float] = {}
        self._lockstep = False  # sampling every request on every rank (collective forward)
        self.bytes_reduced = 0  # gradient elements all-reduced so far (bench/)

    # ------------------------------------------------------------ the batch
    def share(self, n: int) -> range:
        """This rank's contiguous share of ``n`` units (sizes differ by at most one)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def forward_backward(self, fleet, examples, loss_fn, cfg, forward_only) -> ForwardBackwardResult:
        unit = 2 if loss_fn == "dpo" else 1
        mine = self.share(len(examples) // unit)
        idx = list(range(mine.start * unit, mine.stop * unit))
        if idx:
            res = fleet._forward_backward_local([examples[i] for i in idx], loss_fn, cfg, forward_only)
            local = (idx, res.logprobs, res.losses, res.entropy)
        else:
            if self.collective_forward:  # the model's collectives need this rank too
                e = examples[0]
                fleet._forward_backward_local([Example(None, e.input_tokens[:1], e.target_tokens[:1])],
                                              "cross_entropy", resolve_config("cross_entropy", None), forward_only)
            local = ([], [], [], [])
        if self.collective_forward and not forward_only:
            self._move_received_grads(fleet, examples)
        parts = [None] * self.world
        with guard("forward_backward (gathering results)", self.timeout_s):
            dist.all_gather_object(parts, local)
        logprobs, losses, entropy = [None] * len(examples), [0.0] * len(examples), [None] * len(examples)
        for ids, lp, ls, ent in parts:
            for j, i in enumerate(ids):
                logprobs[i], losses[i], entropy[i] = lp[j], ls[j], ent[j]
        # every rank marks every adapter of the batch pending, so all step the same adapters
        metrics = fleet._metrics(examples, losses, forward_only)
        return ForwardBackwardResult(logprobs=logprobs, losses=losses, entropy=entropy, metrics=metrics)

    @staticmethod
    def _move_received_grads(fleet, examples) -> None:
        """Expert parallelism: this rank's experts also ran other ranks' rows, so an adapter with no
        row (no loss) here got a gradient too. One accumulated in fp32 (low-precision factors, a
        loss scale) moves it into its buffer now, unscaled like the engine moves its own rows'
        gradients: left in the bank, `adapter_grads` would move it at `optim_step` with the fp16
        loss scale still in it. An adapter whose rows ran here was moved already (this adds zeros)."""
        for n in dict.fromkeys(e.adapter for e in examples if e.adapter is not None):
            if fleet._fp32_grads(n):
                scaler = fleet._train[n].scaler
                fleet._move_grads(n, inv_scale=1.0 if scaler is None else 1.0 / scaler.scale)

    def backward_anchor(self, hidden: torch.Tensor):
        """A zero loss over the whole graph for a rank whose rows carry no loss (None: skip)."""
        if self.collective_forward and hidden.requires_grad:
            return hidden.sum() * 0.0
        return None

    # -------------------------------------------------------------- gradients
    @torch.no_grad()
    def reduce_gradients(self, views: dict[str, list], grads: dict[str, list[torch.Tensor]]) -> None:
        """SUM every stepping adapter's gradient over the ranks that computed parts of it (in
        place), slot-ordered buckets; then each adapter's global norm for `grad_norm`."""
        fleet = self.fleet
        names = sorted(views, key=fleet.slot_of)
        items = [(shards.reduce_group(fleet, n, k, p), g)
                 for n in names for (k, p, _), g in zip(views[n], grads[n])]
        with guard("optim_step (gradient all-reduce)", self.timeout_s):
            self.bytes_reduced += shards.bucketed_all_reduce(items, BUCKET_NUMEL) * 4
            self._norms = self._global_norms(names, views, grads)

    def _global_norms(self, names, views, grads) -> dict[str, float]:
        """Per adapter: the norm of its per-factor norms (as `grad_norm`), a sharded factor's
        norm being the square root of its shards' squares summed over its shard group."""
        per = {n: [] for n in names}
        sharded: dict[int, tuple[object, list]] = {}  # shard group -> [(adapter, position)]
        squares = []
        for n in names:
            for (k, p, _), g in zip(views[n], grads[n]):
                tag = shards.view_shard(self.fleet, n, k, p)
                v = torch.linalg.vector_norm(g.float(), 2.0)
                if tag is not None:
                    sharded.setdefault(id(tag.shard_group), (tag.shard_group, []))[1].append((n, len(per[n])))
                    squares.append(v * v)
                per[n].append(v)
        i = 0
        for group, where in sharded.values():
            sq = torch.stack(squares[i:i + len(where)])
            i += len(where)
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
            for (n, pos), s in zip(where, sq.sqrt()):
                per[n][pos] = s
        return {n: float(torch.linalg.vector_norm(torch.stack(v), 2.0)) if v else 0.0 for n, v in per.items()}

    def grad_norm(self, name: str) -> float | None:
        """The adapter's global norm computed by the last `reduce_gradients`."""
        return self._norms.get(name)

    # ---------------------------------------------------------- shards & files
    def full_tensor(self, name, key, param, t):
        tag = shards.view_shard(self.fleet, name, key, param)
        if tag is None:
            return t
        with guard(f"gathering {key}", self.timeout_s):
            return shards.gather_view(tag, t)

    def local_tensor(self, name, key, param, full):
        tag = shards.view_shard(self.fleet, name, key, param)
        return full if tag is None else shards.slice_view(tag, full)

    def full_shape(self, name, key, param, view) -> tuple:
        return shards.full_shape(shards.view_shard(self.fleet, name, key, param), view)

    @torch.no_grad()
    def full_state_tensors(self, name, entries: dict[str, tuple]) -> dict[str, torch.Tensor]:
        """`save_state`'s tensors as one process would write them: pending gradients summed over
        the ranks (a copy: accumulation goes on), shards gathered. Only keys every rank has are
        kept (a master stale on one rank is dropped everywhere, as one process drops it)."""
        keysets = [None] * self.world
        with guard(f"save_state {name!r}", self.timeout_s):
            dist.all_gather_object(keysets, sorted(entries))
        common = sorted(set.intersection(*map(set, keysets)))
        pending = [(k, entries[k][2].clone()) for k in common if k.startswith("grad/")]
        out = {}
        with guard(f"save_state {name!r}", self.timeout_s):
            shards.bucketed_all_reduce([(shards.reduce_group(self.fleet, name, entries[k][0], entries[k][1]), g)
                                        for k, g in pending], BUCKET_NUMEL)
            summed = dict(pending)
            for k in common:
                key, p, t = entries[k]
                t = summed.get(k, t)
                out[k] = self.full_tensor(name, key, p, t).cpu().contiguous().clone()
        return out

    def local_state_tensors(self, name, views, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for key, p, _ in views:
            for kind in ("weight", "exp_avg", "exp_avg_sq", "master", "grad"):
                k = f"{kind}/{key}"
                if k not in tensors:
                    continue
                t = self.local_tensor(name, key, p, tensors[k])
                if kind == "grad" and not shards.holds_pending_sum(self.fleet, name, key, p, self.rank):
                    t = torch.zeros_like(t)
                out[k] = t
        return out

    def barrier(self) -> None:
        with guard("barrier", self.timeout_s):
            dist.barrier()

    # --------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, fleet, requests, params):
        """Data parallel: each rank samples its share of the requests (seeds follow the request's
        index in the whole list, so the draws are a single process's) and all are gathered. With
        a communicating forward every rank decodes every request in lockstep instead, tokens
        broadcast from rank 0 (`agree_tokens`) so all ranks run the same number of steps."""
        if self.collective_forward:
            self._lockstep = True
            try:
                out = fleet._sample_local(requests, params)
            finally:
                self._lockstep = False
            box = [out]
            with guard("sample (broadcasting results)", self.timeout_s):
                dist.broadcast_object_list(box, src=0)
            return box[0]
        mine = self.share(len(requests))
        local = fleet._sample_local([requests[i] for i in mine], params, request_ids=list(mine)) if mine else []
        parts = [None] * self.world
        with guard("sample (gathering results)", self.timeout_s):
            dist.all_gather_object(parts, local)
        return [seqs for part in parts for seqs in part]

    def agree_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self._lockstep:
            return tokens
        with guard("sample (token broadcast)", self.timeout_s):
            dist.broadcast(tokens, src=0)
        return tokens
