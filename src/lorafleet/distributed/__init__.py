"""Past one process: data, fully-sharded and expert parallelism on torch.distributed, applied
from outside the model (`parallelize`). The engine sees it only through ``fleet.comm``.
See docs/distributed.md."""

from .data_parallel import FleetComm
from .failure import DistributedFailure
from .mesh import Mesh, ParallelismConfig, build_mesh, init_process_group, launched_by_torchrun
from .parallelize import parallelize

__all__ = ["DistributedFailure", "FleetComm", "Mesh", "ParallelismConfig", "build_mesh", "init_process_group",
           "launched_by_torchrun", "parallelize"]
