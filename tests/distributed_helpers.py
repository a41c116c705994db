"""Multi-process test harness (gloo on CPU): run a function on W spawned ranks, and a mixed-adapter
training scenario whose results must not depend on how many ranks ran it."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path

import torch

import lorafleet as lf
from lorafleet.models.debug import build_debug_model

TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        os._exit(1)
    finally:
        import torch.distributed as dist

        from lorafleet.distributed.failure import stop_heartbeat

        stop_heartbeat()
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, tmp_path, *args, timeout: float = 120.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; returns each rank's result.
    ``fn`` must live in an importable module (spawn pickles it by name)."""
    import torch.multiprocessing as mp

    out = Path(tmp_path) / f"spawn-{free_port()}"
    out.mkdir(parents=True)
    ctx = mp.start_processes(_entry, args=(world, free_port(), str(out), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    import time

    deadline = time.time() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.time())):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"ranks still running after {timeout} s (a hang)")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def init(parallelism: dict | None, fleet):
    """Join the group and parallelize ``fleet`` (`lorafleet.distributed.launch.launch`, gloo);
    its comm. A later fleet of the same layout reuses the mesh: ``parallelize(f, comm.mesh)``."""
    from lorafleet.distributed import ParallelismConfig
    from lorafleet.distributed.launch import launch

    return launch(ParallelismConfig.from_dict(parallelism or {}), fleet, device="cpu")


def ep_full_grads(fleet, distributed: bool = True) -> dict:
    """Every adapter view's gradient, whole, keyed (adapter, view key): summed over the ranks the
    engine sums it over (`shards.reduce_group`) and gathered when the view is sharded
    (`shards.view_shard`); one collective per view, in the same order on every rank.
    ``distributed=False``: a single-process fleet's own gradients."""
    import torch.distributed as dist

    from lorafleet.distributed.shards import WORLD, reduce_group, view_shard

    out = {}
    for name in fleet.adapters:
        for key, p, idx in fleet.adapter_views(name):
            g = p.grad[idx].clone() if p.grad is not None else torch.zeros_like(p[idx])
            if distributed:
                group = reduce_group(fleet, name, key, p)
                if group is not None:
                    dist.all_reduce(g, group=None if group == WORLD else group)
                tag = view_shard(fleet, name, key, p)
                if tag is not None:
                    g = tag.gather(g)
            out[name, key] = g
    return out


# --------------------------------------------------------------------------- the scenario
# eps 1e-4: with 1e-6 Adam turns the sign of near-zero gradient entries (|g| ~ eps, where
# any reordering of a sum flips it) into full +-lr steps: a single process splitting its batch
# differently is then 2.7e-5 off itself, which is no property of the distribution
OPT = dict(lr=1e-2, eps=1e-4, weight_decay=0.01, grad_clip_norm=0.05, schedule="linear", warmup_steps=1, total_steps=5)


def examples(adapters, seed, n, length=(4, 9), vocab=256):
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in adapters:
        for _ in range(n):
            L = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
            toks = torch.randint(3, vocab, (L + 1,), generator=g).tolist()
            w = (torch.rand(L, generator=g) * 2 - 0.5).tolist()
            out.append(lf.Example(name, toks[:-1], toks[1:], w))
    return out


def make_fleet(arch: str):
    model = build_debug_model(arch, seed=0)
    fleet = lf.Fleet(model, max_adapters=4, max_rank=8)
    moe = fleet.spec.moe
    fleet.add_adapter("att", lf.AdapterConfig(rank=2, target_modules=["q_proj", "v_proj"], experts=False, seed=1))
    fleet.add_adapter("a", lf.AdapterConfig(rank=8, experts=moe, expert_sharing="none", seed=2))
    fleet.add_adapter("b", lf.AdapterConfig(rank=4, experts=moe, expert_sharing="shared_a", seed=3))
    if moe:
        fleet.add_adapter("c", lf.AdapterConfig(rank=6, experts=True, expert_sharing="shared_outer", seed=4))
    for n in fleet.adapters:
        fleet.set_optimizer(n, lf.OptimConfig(**OPT))
    return fleet


def train_steps(fleet, steps: int = 2) -> dict:
    """K steps of mixed batches with gradient accumulation over two calls, plus the skew cases
    (on two ranks, rank 0's share of the second call holds only the attention-only adapter, so
    no MLP/expert LoRA runs there; "c" only ever lands on rank 1), a step of only base rows and
    a forward with fewer examples than ranks."""
    names = list(fleet.adapters)
    rec = {"fb": [], "optim": []}
    for s in range(steps):
        first = examples(names, 100 + s, 2)
        second = examples(["att"], 200 + s, 2) + examples([n for n in names if n != "att" and n != "c"], 300 + s, 1)
        if "c" in names:
            second += examples(["c"], 400 + s, 1)
        for batch in (first, second):
            r = fleet.forward_backward(batch)
            rec["fb"].append((r.logprobs, r.losses, r.metrics))
        base = fleet.forward_backward(examples([None], 500 + s, 3), forward_only=True)  # only base rows
        one = fleet.forward_backward(examples(["a"], 600 + s, 1), forward_only=True)  # fewer rows than ranks
        rec["fb"].append((base.logprobs, base.losses, base.metrics))
        rec["fb"].append((one.logprobs, one.losses, one.metrics))
        rec["optim"].append(fleet.optim_step())
    rec["weights"] = {n: dict(fleet.get_adapter_weights(n).tensors()) for n in names}
    return rec


def assert_close_records(got: dict, want: dict, tol: float = TOL):
    assert len(got["fb"]) == len(want["fb"])
    for (lp, ls, m), (lp0, ls0, m0) in zip(got["fb"], want["fb"]):
        assert [len(x) for x in lp] == [len(x) for x in lp0]
        flat, flat0 = torch.tensor([v for x in lp for v in x]), torch.tensor([v for x in lp0 for v in x])
        assert rel(flat, flat0) <= tol
        assert rel(torch.tensor(ls), torch.tensor(ls0)) <= tol
        assert m.keys() == m0.keys()
        for n in m0:
            assert m[n]["tokens:sum"] == m0[n]["tokens:sum"] and m[n]["examples:sum"] == m0[n]["examples:sum"]
            assert abs(m[n]["loss:sum"] - m0[n]["loss:sum"]) <= tol * max(1.0, abs(m0[n]["loss:sum"]))
    for om, om0 in zip(got["optim"], want["optim"]):
        assert om.keys() == om0.keys()
        for n in om0:
            assert om[n]["step"] == om0[n]["step"] and om[n]["lr"] == om0[n]["lr"]
            assert abs(om[n]["grad_norm"] - om0[n]["grad_norm"]) <= tol * om0[n]["grad_norm"]
    assert_close_weights(got["weights"], want["weights"], tol)


def assert_close_weights(got: dict, want: dict, tol: float = TOL):
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].keys() == want[n].keys(), n
        for k in want[n]:
            assert got[n][k].shape == want[n][k].shape, (n, k)
            assert rel(got[n][k], want[n][k]) <= tol, (n, k, rel(got[n][k], want[n][k]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30)) if b.numel() else 0.0
