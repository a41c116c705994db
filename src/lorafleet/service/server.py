"""Start the service: load the base, build the app, run uvicorn (or a background thread)."""

from __future__ import annotations

import logging
import socket
import threading
import time

from .app import create_app
from .auth import Authenticator, is_loopback, load_keys
from .core import Service, ServiceConfig

log = logging.getLogger("lorafleet.service")


def build_service(base: str | None = None, config: ServiceConfig | None = None, log_fn=print,
                  wrap_fleet=None) -> Service:
    """The service on ``base`` (see `load_service_base`); ``wrap_fleet``: see `Service`."""
    model, tok, name, tok_dir = load_service_base(base, log_fn)
    return Service(model, tok, name, config, tokenizer_dir=tok_dir, wrap_fleet=wrap_fleet)


def load_service_base(base: str | None = None, log_fn=print):
    """-> (model, tokenizer, served name, tokenizer directory or None). ``base``, resolved in this order:

    * None: ``lorafleet:qwen3_moe-copy``, the default (see below);
    * a name in ``jobs.base_model.EMBEDDED_BASES``, e.g. ``lorafleet:qwen3_moe-copy``: a debug
      architecture with generic copy pretraining -- the base of examples/quickstart.yaml, the same
      cache entry (built once, ~1 min on 2 cores, then loaded in a second);
    * a Hugging Face model directory;
    * ``debug:<arch>-qwenvocab``: that debug arch with the Qwen vocabulary and tokenizer, built
      offline, random init (for recipes that expect a Qwen model);
    * ``debug:<arch>`` or a bare arch name: that debug arch, random init -- starts at once, which
      tests want, but an adapter on it learns little."""
    from pathlib import Path

    from ..jobs.base_model import DEFAULT_SERVICE_BASE, EMBEDDED_BASES, load_base
    from ..jobs.config import BaseSpec
    from ..models.qwen_vocab import build_qwen_vocab_base, parse_qwen_vocab_base

    base = DEFAULT_SERVICE_BASE if base is None else base
    if base in EMBEDDED_BASES:
        # served under its registry name, not load_base's "debug:<arch>+copyN" (which leaves out
        # the size overrides): a client names this base as `lorafleet serve --base` does
        model, tok, _ = load_base(EMBEDDED_BASES[base], log=log_fn)
        return model, tok, base, None
    if base.startswith("lorafleet:"):
        raise ValueError(f"unknown embedded base {base!r}; valid: {', '.join(EMBEDDED_BASES)}")
    if Path(base).is_dir():
        spec = BaseSpec(path=base)
    elif (arch := parse_qwen_vocab_base(base)) is not None:  # debug:<arch>-qwenvocab (see qwen_vocab.py)
        model, tok, tok_dir, name = build_qwen_vocab_base(arch, log=log_fn)
        return model, tok, name, tok_dir
    else:
        spec = BaseSpec(debug=base.split(":", 1)[-1])
    model, tok, name = load_base(spec, log=log_fn)
    return model, tok, name, str(spec.path) if spec.path is not None else None


def make_app(service: Service, api_keys_file: str | None = None, keys: dict | None = None):
    keys = load_keys(api_keys_file) if keys is None else keys
    return create_app(service, Authenticator(keys)), keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a daemon thread (tests, notebooks): ``with ServerThread(app) as url: ...``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                   lifespan="off", timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the service did not start")
            time.sleep(0.02)
        return self.url

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def check_keys(host: str, api_keys: str | None) -> dict:
    """The API keys; ValueError when there are none and ``host`` is reachable from other machines."""
    keys = load_keys(api_keys)
    if not keys and not is_loopback(host):
        raise ValueError(f"no API keys configured (--api-keys FILE or LORAFLEET_API_KEYS): refusing to serve on "
                         f"non-loopback address {host!r}")
    return keys


def serve(host: str = "127.0.0.1", port: int = 8000, data_dir: str = "lorafleet-data", base: str | None = None,
          api_keys: str | None = None, max_adapters: int = 16, max_rank: int = 64,
          aliases: list[str] | None = None, dataset_roots: list[str] | None = None, store: str = "sqlite",
          cross_tenant_batching: bool = True, wrap_fleet=None) -> None:
    import uvicorn

    keys = check_keys(host, api_keys)
    cfg = ServiceConfig(data_dir=data_dir, max_adapters=max_adapters, max_rank=max_rank, aliases=list(aliases or []),
                        dataset_roots=list(dataset_roots or []), store=store,
                        cross_tenant_batching=cross_tenant_batching)
    service = build_service(base, cfg, wrap_fleet=wrap_fleet)
    app, _ = make_app(service, keys=keys)
    if keys:
        print(f"lorafleet serve: {len(set(keys.values()))} tenant(s) with API keys")
    else:
        print("lorafleet serve: no API keys configured -> single tenant 'local', loopback clients only "
              "(any key starting with 'tml-' works)")
    print(f"lorafleet serve: base {service.base_name!r}, {cfg.max_adapters} slots (max rank {cfg.max_rank}), "
          f"data in {cfg.data_dir}; listening on http://{host}:{port}")
    rec = service.recovered
    if any(rec.values()):
        print(f"lorafleet serve: recovered {rec['sessions']} open session(s), {rec['models']} training model(s) "
              f"(restore them with load_state), {sum(j.status == 'queued' for j in service.store.jobs())} queued "
              f"job(s); {rec['lost_requests']} unfinished request(s) marked lost")
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", lifespan="off")
    finally:
        service.close()
