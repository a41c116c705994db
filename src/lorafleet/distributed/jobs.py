"""The job runners' side of a distributed run (`lorafleet train|rl` under torchrun).

Every rank runs the whole job with the same YAML (SPMD): the same batches, the same fleet calls
in the same order; the fleet splits each batch and reduces gradients (`FleetComm`). Rank 0
alone writes (metrics, TensorBoard, progress, checkpoints, exports, the summary); the others
run silent. Every rank reads the checkpoint on ``--resume``, so a checkpoint directory must be
reachable from every node (a shared filesystem) — as the files are world-size independent, W
ranks resume what W' wrote.
"""

from __future__ import annotations

import os

from .launch import fleet_num_experts, launch, torchrun_world
from .mesh import ParallelismConfig, launched_by_torchrun


def distribute_job(job, fleet):
    """Parallelize ``fleet`` when launched by torchrun with more than one rank, or when the
    config names a ``parallelism``; returns the comm (None: a single-process run, as always).
    Degrees are checked against the world before any collective, so all ranks fail alike."""
    spec = getattr(job.cfg, "parallelism", None)
    world = torchrun_world()
    if spec is None and world == 1:
        return None
    config = ParallelismConfig.from_dict(spec)
    if world == 1:
        config.resolve(1, fleet_num_experts(fleet))  # a degree > 1 needs torchrun: one line
        return None  # every degree is 1: nothing to distribute
    comm = launch(config, fleet)
    if not comm.is_writer:
        silence(job)
    return comm


def quiet_unless_writer(job) -> None:
    """Silence a torchrun rank other than 0 from the job's start: the base-loading lines, a run
    dir's notices and the report of an already finished run are printed before the fleet (and so
    the comm) exists. The rank comes from torchrun's environment, the same number the process
    group gives it. Errors still reach stderr on every rank (the CLI prints them)."""
    if launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        silence(job)
        _quiet_libraries()


def _quiet_libraries() -> None:
    """transformers' progress bars (loading and writing a cached base) and its info messages."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def silence(job) -> None:
    """A rank other than 0: no terminal output and no files (the fleet already writes only on 0)."""
    job.writes = False
    job.log = lambda *a, **k: None
    job.progress = _QuietProgress()
    job.metrics_log = _NoMetricsLog


def follow_checkpoint(job) -> None:
    """A non-writing rank's share of `TrainJob.checkpoint`: the same `save_state` calls in the
    same order (they gather shards and sum pending gradients: collectives), writing nothing."""
    for n in job.active:
        job.fleet.save_state(n, job.run_dir / "checkpoints" / ".not-written")
    job.last_checkpoint = job.global_step


def any_rank(comm, flag: bool) -> bool:
    """True on every rank when it is True on any (e.g. a stop request that reached one rank
    first): decisions that change the sequence of collectives must be the same everywhere."""
    import torch
    import torch.distributed as dist

    from .failure import guard

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm.mesh.device)
    with guard("agreeing on a stop request", comm.timeout_s):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _QuietProgress:
    def __getattr__(self, name):
        return lambda *a, **k: None


class _NoMetricsLog:
    def __init__(self, *a, **k):
        pass

    def log(self, record):
        pass

    def close(self):
        pass
