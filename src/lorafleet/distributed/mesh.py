"""Parallelism degrees, the process group and the one `DeviceMesh` of a distributed run.

Every rank runs the same program (SPMD, launched by ``torchrun``). Everything that can be wrong
with the degrees is checked by `ParallelismConfig.resolve` from numbers every rank has (the
world size, the fleet's expert count) *before* the first collective, so a bad config fails on
every rank with the same message instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from datetime import timedelta

import torch
import torch.distributed as dist

from ..utils.values import strict_from_dict

MESH_DIMS = ("dp_replicate", "dp_shard", "ep")
DEFAULT_TIMEOUT_S = 300.0  # a dead or stuck rank ends the others' collectives after this long


@dataclass
class ParallelismConfig:
    """torchtitan's degree names; ``-1`` means "the rest of the world" (at most one of them).

    Every rank is a data-parallel rank: each takes its share of every batch. The degrees say how
    the *model* is laid out over the ranks: ``data_parallel_shard_degree`` ranks split the frozen
    base with FSDP2, ``expert_parallel_degree`` ranks split the experts (and their LoRA), and the
    ``data_parallel_replicate_degree`` groups of those hold replicas. The product is the world.
    """

    data_parallel_replicate_degree: int = -1
    data_parallel_shard_degree: int = 1
    expert_parallel_degree: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        for f in fields(self)[:3]:
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(f"parallelism.{f.name} must be an integer >= 1 or -1 (the rest of the "
                                 f"world), got {v!r}")
        if sum(getattr(self, f.name) == -1 for f in fields(self)[:3]) > 1:
            raise ValueError("parallelism: at most one degree may be -1 (the rest of the world)")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"parallelism.timeout_s must be a number of seconds > 0, got {self.timeout_s!r}")

    @staticmethod
    def from_dict(d: dict | None) -> "ParallelismConfig":
        """From a config's ``parallelism:`` mapping (None: the defaults); numbers read as people
        write them (``timeout_s: 1e3``), a bad value or an unknown key one line."""
        return strict_from_dict(ParallelismConfig, {} if d is None else d, "parallelism")

    def to_dict(self) -> dict:
        return asdict(self)

    def resolve(self, world_size: int, num_experts: int | None = None) -> dict[str, int]:
        """The three degrees for ``world_size`` ranks (``-1`` filled in), checked against the
        world and the model; ValueError naming the problem (the same on every rank)."""
        degrees = {"dp_replicate": self.data_parallel_replicate_degree, "dp_shard": self.data_parallel_shard_degree,
                   "ep": self.expert_parallel_degree}
        fixed = 1
        for v in degrees.values():
            fixed *= v if v != -1 else 1
        free = [k for k, v in degrees.items() if v == -1]
        if free:
            if world_size % fixed:
                raise ValueError(f"parallelism: world size {world_size} is not divisible by the fixed degrees' "
                                 f"product {fixed} ({_describe(degrees)})")
            degrees[free[0]] = world_size // fixed
        product = degrees["dp_replicate"] * degrees["dp_shard"] * degrees["ep"]
        if product != world_size:
            raise ValueError(f"parallelism: {_describe(degrees)} needs {product} ranks, the world has {world_size} "
                             f"(launch with torchrun --nproc-per-node / --nnodes so they match, or use -1)")
        if degrees["ep"] > 1:
            if not num_experts:
                raise ValueError(f"parallelism: expert_parallel_degree {degrees['ep']} needs a Mixture-of-Experts "
                                 "base; this one has no experts")
            if num_experts % degrees["ep"]:
                raise ValueError(f"parallelism: the base's {num_experts} experts are not divisible by "
                                 f"expert_parallel_degree {degrees['ep']}")
        return degrees


def _describe(degrees: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in degrees.items())


def launched_by_torchrun() -> bool:
    """torchrun (and any launcher of its env:// contract) sets these for every rank."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S, device: str | None = None) -> torch.device:
    """Join the process group from torchrun's environment (a no-op if one exists); returns this
    rank's device. nccl where CUDA is available, else gloo, unless ``device`` ("cpu" / "cuda")
    forces one."""
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dev


@dataclass
class Mesh:
    """The run's `DeviceMesh` and what the parallelizer reads from it."""

    device_mesh: object  # torch.distributed.device_mesh.DeviceMesh, dims MESH_DIMS
    degrees: dict[str, int]
    device: torch.device
    timeout_s: float

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def group(self, *dims: str):
        """The process group over ``dims`` (one dim, or several flattened), or None when it
        holds one rank (nothing to communicate)."""
        size = 1
        for d in dims:
            size *= self.degrees[d]
        if size == 1:
            return None
        sub = self.device_mesh[dims[0]] if len(dims) == 1 else self.device_mesh[dims]._flatten("_".join(dims))
        return sub.get_group()


def build_mesh(config: ParallelismConfig | None = None, num_experts: int | None = None,
               device: str | None = None) -> Mesh:
    """Validate ``config`` against the world (before any collective), then build the mesh.
    Call after `init_process_group` (`launch.launch` does both, in order)."""
    config = config or ParallelismConfig()
    if not dist.is_initialized():
        raise ValueError("build_mesh needs a process group: launch with torchrun (or call init_process_group)")
    return mesh_of(config.resolve(dist.get_world_size(), num_experts), config.timeout_s, device)


def mesh_of(degrees: dict[str, int], timeout_s: float, device: str | None = None) -> Mesh:
    """The mesh of already resolved ``degrees`` (`ParallelismConfig.resolve`)."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = device or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    dm = init_device_mesh(kind, tuple(degrees[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
    dev = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
    return Mesh(dm, degrees, dev, float(timeout_s))
