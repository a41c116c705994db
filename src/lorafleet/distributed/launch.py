"""`launch(config, fleet)`: the one way every entry point (train/rl jobs, each rank of a distributed
server, the tests) joins a distributed run and lays its fleet out over it.

The degrees are checked against the world and the fleet's expert modules first, from numbers
every rank has, so a bad config fails on every rank alike before the first collective; then the
process group, the heartbeat, the mesh and `parallelize`.
"""

from __future__ import annotations

import atexit
import os

import torch.distributed as dist

from .data_parallel import FleetComm
from .failure import start_heartbeat, stop_heartbeat
from .mesh import ParallelismConfig, init_process_group, launched_by_torchrun, mesh_of
from .parallelize import parallelize


def torchrun_world() -> int:
    """The world size torchrun gave this process (1 when not launched by it)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def fleet_num_experts(fleet) -> int | None:
    """The base's expert count as the fleet's expert LoRA modules hold it (None: no expert modules)."""
    return next((m.num_experts for m in fleet._att.experts.values()), None)


def launch(config: ParallelismConfig, fleet, device: str | None = None) -> FleetComm:
    """Join torchrun's process group and parallelize ``fleet`` by ``config``; its comm.
    ``device`` ("cpu" / "cuda") forces the backend (default: nccl where CUDA is available)."""
    degrees = config.resolve(torchrun_world(), fleet_num_experts(fleet))  # before the first collective
    init_process_group(config.timeout_s, device)
    start_heartbeat()
    atexit.register(_leave)
    return parallelize(fleet, mesh_of(degrees, config.timeout_s, device))


def _leave() -> None:
    """At exit: stop the heartbeat, then destroy the process group. Left to the interpreter's
    teardown, gloo's threads could be destroyed while still joinable under load, which aborts
    the process ("terminate called without an active exception", exit -6) after a finished job."""
    stop_heartbeat()
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a peer already gone: nothing left to release cleanly
        pass
