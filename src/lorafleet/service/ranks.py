"""`lorafleet serve` on several ranks (``torchrun --nproc-per-node G -m lorafleet serve ...``):
rank 0 serves with a `BroadcastFleet`, the other ranks build the same fleet and `follow`
(lorafleet/distributed/serve.py says how the calls travel and how failures end)."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist

from ..distributed.failure import stop_heartbeat
from ..distributed.launch import launch, torchrun_world
from ..distributed.mesh import ParallelismConfig
from ..distributed.serve import BroadcastFleet, CommandChannel, follow
from .core import ServiceConfig, new_fleet
from .server import check_keys, load_service_base, serve


def serve_on_ranks(parallelism: dict | None, **serve_kwargs) -> int:
    """`lorafleet serve` under torchrun: rank 0 serves, the other ranks follow. Without torchrun
    (one rank) the degrees must all be 1 and this is the plain single-process server."""
    config = ParallelismConfig.from_dict(parallelism)
    world = torchrun_world()
    if world == 1:
        config.resolve(1)  # a degree > 1 needs torchrun: one line, as for `lorafleet train`
        serve(**serve_kwargs)
        return 0
    check_keys(serve_kwargs.get("host", "127.0.0.1"), serve_kwargs.get("api_keys"))  # every rank refuses alike
    if int(os.environ["RANK"]) != 0:
        return _follower(config, serve_kwargs)
    proxy: list[BroadcastFleet] = []

    def wrap(fleet):  # Service calls this once its fleet exists, before it makes any engine call
        proxy.append(BroadcastFleet(fleet, _join(config, fleet)))
        return proxy[0]

    previous = signal.signal(signal.SIGTERM, _stop)
    released = False
    try:
        serve(**serve_kwargs, wrap_fleet=wrap)
    except (KeyboardInterrupt, _Stopped):  # a requested stop: the service closed, release the followers
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        released = bool(proxy) and proxy[0].shutdown()
        _leave()
    others = "the other ranks were released" if released else "the other ranks were gone"
    print(f"lorafleet serve: stopped (rank 0 of {world}; {others})", flush=True)
    return 0


class _Stopped(BaseException):
    """SIGTERM on rank 0. uvicorn stops serving on it, then raises it again once it has
    restored the handlers: by default that would end the process before the followers hear."""


def _stop(signum, frame):
    raise _Stopped()


def _follower(config: ParallelismConfig, kw: dict) -> int:
    model, tok, _, _ = load_service_base(kw.get("base"), log_fn=lambda *a, **k: None)
    fleet = new_fleet(model, tok, ServiceConfig(**{k: kw[k] for k in ("max_adapters", "max_rank") if k in kw}))
    channel = _join(config, fleet)
    # rank 0 ends the service (torchrun and a terminal signal it too) and then releases us:
    # stopping here first would fail the requests still running
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *a: None)
    try:
        rc = follow(fleet, channel)
    finally:
        _leave()
    if rc == 0:
        print(f"lorafleet serve: stopped (rank {channel.rank} of {channel.world})", flush=True)
    return rc


def _join(config: ParallelismConfig, fleet) -> CommandChannel:
    """Every rank, once its fleet is built (same base, same slots): `launch` (the degrees checked
    before the first collective, so all ranks fail alike), then the command channel."""
    comm = launch(config, fleet)
    channel = CommandChannel(config.timeout_s)
    if channel.rank == 0:
        degrees = ", ".join(f"{k}={v}" for k, v in comm.mesh.degrees.items())
        print(f"lorafleet serve: {channel.world} ranks ({degrees}); rank 0 serves HTTP and every rank runs each "
              "engine call", flush=True)
    return channel


def _leave() -> None:
    stop_heartbeat()
    if dist.is_initialized():
        dist.destroy_process_group()
