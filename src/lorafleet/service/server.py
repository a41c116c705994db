"""Start the service: load the base, build the app, run uvicorn (or a background thread)."""

from __future__ import annotations

import logging
import signal
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


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol, dropping a connection whose request headers do not arrive within
    ``timeout_s`` (uvicorn's own timeouts cover only idle keep-alive connections: a client that
    connects and sends nothing, or half a header, would hold its socket forever)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def _arm(self):
            self._header_task = self.loop.call_later(timeout_s, self._header_timeout)

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            self._header_task.cancel()
            super().connection_lost(exc)

        def _header_timeout(self):
            # still waiting for (the rest of) the headers, and not in the idle keep-alive phase,
            # which uvicorn's timeout_keep_alive covers
            if (not self.transport.is_closing() and self.conn.their_state is h11.IDLE
                    and self.timeout_keep_alive_task is None):
                self.logger.info("dropping a connection that sent no complete request headers in %g s", timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_config(app, host: str, port: int, *, header_timeout_s: float = 30.0, log_level: str = "info",
                   timeout_keep_alive: int = 5, timeout_graceful_shutdown: float | None = None):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                          timeout_keep_alive=timeout_keep_alive, http=header_timeout_protocol(header_timeout_s),
                          timeout_graceful_shutdown=timeout_graceful_shutdown, log_config=None)


class _ContextFilter(logging.Filter):
    def filter(self, record):
        from .app import request_id, request_tenant

        record.request_id, record.tenant = request_id.get(), request_tenant.get()
        return True


def configure_logging(level: str = "info") -> None:
    """Log lines to stderr with time, level, request id and tenant (``-`` outside a request)."""
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [req=%(request_id)s "
                                           "tenant=%(tenant)s] %(message)s"))
    for name in ("lorafleet", "uvicorn"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # the service logs each request with its tenant


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a daemon thread (tests, notebooks): ``with ServerThread(app) as url: ...``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, header_timeout_s: float = 30.0):
        import uvicorn

        self.port = port or free_port()
        self.host = host
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port, header_timeout_s=header_timeout_s,
                                                    log_level="warning", timeout_keep_alive=30))
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
          cross_tenant_batching: bool = True, wrap_fleet=None, log_level: str = "info", **limits) -> None:
    """``limits``: other `ServiceConfig` fields (the `serve` flags: max_body_bytes, slot_wait_s,
    shutdown_grace_s, header_timeout_s, health_stall_s, ...)."""
    import uvicorn

    configure_logging(log_level)
    keys = check_keys(host, api_keys)
    cfg = ServiceConfig(data_dir=data_dir, max_adapters=max_adapters, max_rank=max_rank, aliases=list(aliases or []),
                        dataset_roots=list(dataset_roots or []), store=store,
                        cross_tenant_batching=cross_tenant_batching,
                        **{k: v for k, v in limits.items() if v is not None})
    service = build_service(base, cfg, wrap_fleet=wrap_fleet)
    app, _ = make_app(service, keys=keys)
    if keys:
        print(f"lorafleet serve: {len(set(keys.values()))} tenant(s) with API keys")
    else:
        print("lorafleet serve: no API keys configured -> single tenant 'local', loopback clients only "
              "(any key starting with 'tml-' works)")
    print(f"lorafleet serve: base {service.base_name!r}, {cfg.max_adapters} slots (max rank {cfg.max_rank}), "
          f"data in {cfg.data_dir}; listening on http://{host}:{port}")
    print(f"lorafleet serve: {service.budget.describe()}")
    rec = service.recovered
    if any(rec.values()):
        print(f"lorafleet serve: recovered {rec['sessions']} open session(s), {rec['models']} training model(s) "
              f"(restore them with load_state), {sum(j.status == 'queued' for j in service.store.jobs())} queued "
              f"job(s); {rec['lost_requests']} unfinished request(s) marked lost")
    # SIGTERM: uvicorn stops accepting, lets open requests finish (up to the grace period), then
    # re-raises the signal once it has put the old handler back. With the default handler that
    # kills the process (rc -15) before the service closes, so (unless a caller such as
    # service/ranks.py installed its own) the re-raised signal only ends the serve loop here.
    own = signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    if own:
        previous = signal.signal(signal.SIGTERM, lambda *a: log.info("SIGTERM: shutting down"))
    server = uvicorn.Server(uvicorn_config(app, host, port, header_timeout_s=cfg.header_timeout_s, log_level=log_level,
                                           timeout_graceful_shutdown=cfg.shutdown_grace_s))
    try:
        server.run()
    finally:
        print(f"lorafleet serve: stopping (up to {cfg.shutdown_grace_s:g} s for queued and running work)", flush=True)
        service.close(grace_s=cfg.shutdown_grace_s)
        if own:
            signal.signal(signal.SIGTERM, previous)
        print("lorafleet serve: stopped", flush=True)
