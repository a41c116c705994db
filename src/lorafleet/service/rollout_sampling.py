"""`lorafleet serve --rollout-url URL`: the service's sampling served by a rollout engine (vLLM, SGLang).

* ``save_weights_for_sampler`` (the SDK's ``save_weights_and_get_sampling_client``) still saves the
  sampler's PEFT directory (it survives a restart), and also takes ``Fleet.snapshot`` of the
  adapter on the scheduler thread, between the model's own ops, so the snapshot is exactly the
  weights the client asked for. The push into the engine runs on this module's worker threads,
  under a name unique per tenant and sampler (``lf-<hash>``): a sampler is a frozen copy, so a
  later save never changes what an older sampling client samples.
* Sample requests of such samplers, of samplers opened from a ``sampler_weights`` path, and of
  the base model go to the engine, on the worker threads: the scheduler thread (training) never
  waits for them. A request whose sampler was not pushed yet (a restart, a path) pushes it first,
  from its saved directory. Weights checkpoints (``.../weights/...``) opened as samplers stay with
  the built-in decoder.
* The engine's answer becomes the same ``SampleResponse`` as the built-in decoder's (tokens,
  per-token logprobs, stop reason, prompt logprobs).
* Errors: an engine call is retried ``retries`` times; a request that still fails is answered
  with the engine's error (category ``server``), never a traceback, and the fleet is not touched.
  That answer is *retryable* (retrieve_future's 410, on which the SDK sends the sample again by
  itself) while the same request (tenant, sampler, prompt, parameters) failed at the engine in at
  most ``max_resends`` rounds; past them it is final (the SDK's RequestFailedError naming the
  engine's answer), so a permanent failure never loops. A malformed answer is final at once.
  While the engine is failing, new sample requests are refused at the door with **503**
  (unreachable) or **502** (it answered an error), JSON naming the engine's answer — the SDK
  retries those with backoff — until ``RETRY_AFTER_S`` passes and one request is let through.
* The session's close unloads its samplers' adapters once no request uses them (never while
  one does: unloading a name in use deadlocks engines).
* At the start the engine must serve the same base: its prompt logprobs of a probe text must
  equal the base's own (mean gap ≤ ``BASE_MATCH_NATS``), else the server refuses to start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from starlette.exceptions import HTTPException

from ..engine.sampling import SamplingParams
from ..engine.snapshot import Snapshot
from ..utils.values import one_line as _one_line
from . import protocol
from .futures import Failure, Result

log = logging.getLogger("lorafleet.service")

ENGINE_KINDS = ("vllm", "sglang")
BASE_MATCH_NATS = 0.1  # mean |logprob gap| per probe token; another base is off by nats, bf16 by ~1e-2
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9, and then it sat down."
RETRY_AFTER_S = 2.0  # a failing engine: new requests refused this long after its last failure
MAX_RESENDS = 3  # rounds in which one request's engine failure is answered retryable (410), then final
RESEND_MEMORY_S = 600.0  # a request's failed rounds are forgotten this long after its last round began


class EngineDown(HTTPException):
    """The engine failed its last call: 503 (unreachable) or 502 (it answered an error), with JSON
    ``{"error": ...}`` naming its answer (the app's HTTPException handler renders it)."""

    def __init__(self, status: int, message: str):
        super().__init__(status_code=status, detail=message)


@dataclass
class _Pushed:
    """One sampler's adapter in the engine."""

    name: str  # the name it is pushed under
    served: str | None = None  # the name the engine's push returned (what requests and unloads use)
    source_dir: str | None = None  # its saved PEFT directory (to push again after a restart)
    snapshot: Snapshot | None = None  # taken at save time, pushed once, then dropped
    done: threading.Event = field(default_factory=threading.Event)  # pushed (or the push failed)
    error: str | None = None  # the engine's answer to the last failed push
    engine_failed: bool = False  # that push failed at the engine (not on reading the saved directory)
    in_flight: int = 0
    dropped: bool = False


class _SessionClosed(Exception):
    """A request for a sampler whose session closed (the caller's mistake, not the engine's)."""


class _EngineFailed(Exception):
    """An engine call failed after its retries (the engine's own answer, or no answer): a failure
    the client may outlive by sending the request again (unlike a malformed answer)."""


def engine_name(key: str) -> str:
    """The engine's name for a sampler's weights: unique per tenant and sampler, and safe as a file
    name and URL part (keys hold ``/`` and ``:``)."""
    return "lf-" + hashlib.sha256(key.encode()).hexdigest()[:20]


def snapshot_from_dir(name: str, directory) -> Snapshot:
    """A PEFT adapter directory (the sampler's saved weights) as a snapshot to push."""
    from safetensors.torch import load_file

    from ..adapters.formats_layouts import CONFIG_FILE, META_FILE, WEIGHTS_FILE

    d = Path(directory)
    config = json.loads((d / CONFIG_FILE).read_text())
    meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).exists() else None
    return Snapshot(name=name, layout="peft", version=0, rank=int(config.get("r", 0)),
                    tensors=load_file(str(d / WEIGHTS_FILE)), config=config, meta=meta)


def _unreachable(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    text = str(e).lower()
    return any(w in text for w in ("refused", "unreachable", "timed out", "timeout", "connection"))


class EngineSampling:
    """The service's sampling through one rollout engine (see the module docstring)."""

    def __init__(self, service, engine, kind: str, url: str, retries: int = 2, retry_wait_s: float = 0.5,
                 workers: int = 4):
        self.service, self.engine, self.kind, self.url = service, engine, kind, url
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self.layout = "sglang" if kind == "sglang" else "peft"
        self.where = f"rollout engine {kind} at {url}"
        self._lock = threading.Lock()
        self._adapters: dict[str, _Pushed] = {}  # sampler adapter_key -> its adapter in the engine
        self._closed: set[str] = set()  # keys of samplers whose session closed (never pushed again)
        self._failed: tuple[int, str, float] | None = None  # (status, message, when) of the last failure
        self.max_resends = MAX_RESENDS
        self._resends: dict[str, tuple[int, float]] = {}  # request digest -> (failed rounds, last round's start)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorafleet-rollout")
        self._running = 0  # engine jobs started and not finished (close waits for them)
        self._idle = threading.Condition(self._lock)
        self.stats = {"pushes": 0, "samples": 0, "unloads": 0, "failures": 0}

    # ------------------------------------------------------------------ start
    def check_base(self, fleet, tokenizer) -> float:
        """The mean |logprob gap| between the engine's base and ours on a probe text; ValueError
        (one line: the server refuses to start) when the engine is unreachable or serves another base."""
        import torch

        from ..types import Example

        probe = list(tokenizer.encode(PROBE_TEXT)) if tokenizer is not None else list(range(1, 25))
        try:
            theirs = self._call(lambda: self.engine.prompt_logprobs(None, probe))
        except Exception as e:  # noqa: BLE001  (the engine's own errors: any type)
            raise ValueError(f"{self.where}: could not ask it for the base model's logprobs: {_one_line(e)}") from None
        with torch.no_grad():
            ours = fleet.forward_backward([Example(None, probe[:-1], probe[1:])], "cross_entropy", None,
                                          forward_only=True).logprobs[0]
        theirs = list(theirs)[1:]
        if len(theirs) != len(ours) or any(x is None for x in theirs):
            raise ValueError(f"{self.where}: answered {len(theirs) + 1} prompt logprobs for a {len(probe)}-token "
                             "probe; cannot check that it serves this server's base")
        gap = sum(abs(float(a) - float(b)) for a, b in zip(theirs, ours)) / len(ours)
        if not gap <= BASE_MATCH_NATS:
            raise ValueError(f"{self.where} does not serve this server's base {self.service.base_name!r} "
                             f"({self.served_models() or 'its model list is unknown'}): its logprobs of a probe "
                             f"text differ from the base's by {gap:.3g} nats per token (at most {BASE_MATCH_NATS} "
                             "allowed); start both on the same model directory")
        return gap

    def served_models(self) -> str:
        """What the engine says it serves (vLLM / SGLang ``/v1/models``), for messages; '' if unknown."""
        import urllib.request

        try:
            with urllib.request.urlopen(self.url.rstrip("/") + "/v1/models", timeout=5) as r:
                data = json.loads(r.read())["data"]
            return "it serves " + ", ".join(repr(m.get("root") or m.get("id")) for m in data if not m.get("parent"))
        except Exception:  # noqa: BLE001
            return ""

    # ------------------------------------------------------------------ the door
    def check_door(self) -> None:
        """Refuse a new request while the engine is failing (until RETRY_AFTER_S after its last failure)."""
        failed = self._failed
        if failed is not None and time.monotonic() - failed[2] < RETRY_AFTER_S:
            raise EngineDown(failed[0], f"{failed[1]} (retry in {RETRY_AFTER_S:g} s)")

    def takes(self, sampler) -> bool:
        """Whether this sampler's requests go to the engine: the base model, or PEFT weights on disk
        (for SGLang, whose layout differs from the saved PEFT directory, only weights saved by this
        process, whose snapshot was taken in SGLang's layout; the others stay with the built-in decoder)."""
        if sampler is None or sampler.source is None:
            return True
        if sampler.source[0] != "peft":
            return False
        if self.layout != "peft":
            with self._lock:
                return sampler.adapter_key in self._adapters
        return True

    # ------------------------------------------------------------------ pushes
    def stage(self, sampler, fleet, adapter: str) -> None:
        """Called on the scheduler thread as the sampler's weights are saved: take the adapter's
        snapshot now (the weights the client asked for) and push it off that thread. Without a
        snapshot the first sample pushes the saved directory instead (the same weights)."""
        p = _Pushed(engine_name(sampler.adapter_key), source_dir=sampler.source[1])
        try:
            snap = fleet.snapshot(adapter, layout=self.layout)
        except Exception as e:  # noqa: BLE001  (never fail the save itself: its directory is written)
            log.warning("%s: no snapshot of %s (%s); its first sample pushes the saved directory", self.where,
                        adapter, _one_line(e))
            return
        p.snapshot = Snapshot(name=p.name, layout=snap.layout, version=snap.version, rank=snap.rank,
                              tensors=snap.tensors, config=snap.config, meta=snap.meta)
        with self._lock:
            self._adapters[sampler.adapter_key] = p
        self._pool.submit(self._push, p)

    def _entry(self, key: str, source_dir: str) -> _Pushed:
        with self._lock:
            p = self._adapters.get(key)
            if key in self._closed:  # its session closed; its name is unloaded (or being unloaded)
                raise _SessionClosed("this sampler's session is closed: create a new sampling client")
            if p is None or (p.done.is_set() and p.error is not None):
                p = self._adapters[key] = _Pushed(engine_name(key), source_dir=source_dir)
                start = True
            else:
                start = False
            p.in_flight += 1
        if start:
            self._push(p)
        return p

    def _push(self, p: _Pushed) -> None:
        try:
            snap = p.snapshot if p.snapshot is not None else snapshot_from_dir(p.name, p.source_dir)
            p.served = self._call(lambda: self.engine.push(snap), what=f"push of sampler weights {p.name}")
            p.error, p.snapshot = None, None
            self.stats["pushes"] += 1
        except Exception as e:  # noqa: BLE001
            p.error, p.engine_failed = _one_line(e), isinstance(e, _EngineFailed)
        finally:
            p.done.set()

    # ------------------------------------------------------------------ samples
    def submit(self, rid: str, sampler, prompt: list[int], n: int, params: SamplingParams,
               prompt_logprobs: bool, last_n: int | None) -> None:
        self._pool.submit(self._sample, rid, time.monotonic(), sampler, prompt, n, params, prompt_logprobs, last_n)

    def _sample(self, *args):
        with self._lock:
            self._running += 1
        try:
            self._sample_one(*args)
        finally:
            with self._lock:
                self._running -= 1
                self._idle.notify_all()

    def _sample_one(self, rid, accepted, sampler, prompt, n, params, want_plp, last_n):
        p, key = None, sampler.adapter_key if sampler is not None and sampler.source is not None else None
        digest = None
        try:
            digest = self._digest(rid, sampler, prompt, n, params, want_plp, last_n)
            name = None
            if key is not None:
                p = self._entry(key, sampler.source[1])
                if not p.done.wait(600):
                    raise RuntimeError("the push of its weights did not finish in 600 s")
                if p.error is not None:
                    raise (_EngineFailed if p.engine_failed else RuntimeError)(
                        f"push of the sampler's weights failed: {p.error}")
                name = p.served
            seqs = self._call(lambda: self.engine.generate(name, [prompt], params, n), what="generate")
            if not isinstance(seqs, list) or len(seqs) != 1 or len(seqs[0]) != n:
                raise RuntimeError(f"the engine answered {seqs!r:.200} for 1 prompt of {n} samples")
            for s in seqs[0]:
                if len(s.logprobs) != len(s.tokens) or any(lp is None for lp in s.logprobs):
                    raise RuntimeError(f"the engine answered {len(s.tokens)} tokens with {len(s.logprobs)} logprobs")
            plp = None
            if want_plp:
                plp = list(self._call(lambda: self.engine.prompt_logprobs(name, prompt), what="prompt logprobs"))
                plp = ([None] + plp[1:]) if len(plp) == len(prompt) else [None] * len(prompt)
                if last_n:
                    plp = [None] * (len(plp) - last_n) + plp[-last_n:]
            self.stats["samples"] += 1
            with self._lock:
                self._resends.pop(digest, None)
            self.service.futures.complete(rid, Result(body=protocol.encode_sample_response(seqs[0], plp),
                                                      content_type=protocol.PROTO_CONTENT_TYPE))
        except _SessionClosed as e:
            self.service.futures.complete(rid, Failure(str(e), "user"))
        except Exception as e:  # noqa: BLE001  (an engine answer or a malformed one: never a traceback)
            self.stats["failures"] += 1
            engine_failed = isinstance(e, _EngineFailed) and digest is not None
            rounds = self._failed_round(digest, accepted) if engine_failed else None
            if rounds is not None and rounds <= self.max_resends:
                msg, retryable = f"{self.where}: {_one_line(e)}; the SDK sends it again", True
            else:
                retryable = False
                msg = f"{self.where}: {_one_line(e)}; " + (
                    "the request can be sent again" if rounds is None else
                    f"it failed {rounds} time(s) (each after {self.retries + 1} engine call(s)); "
                    "send it again once the engine is back")
            log.warning("sample %s: %s", rid, msg)
            self.service.futures.complete(rid, Failure(msg, "server", retryable=retryable))
        finally:
            if p is not None:
                self._release(key, p)

    def _digest(self, rid, sampler, prompt, n, params, want_plp, last_n) -> str:
        """What identifies a request across the SDK's resends (each resend has a new id)."""
        who = (self.service.futures.owner(rid), None if sampler is None else sampler.adapter_key)
        return hashlib.sha256(repr((who, list(prompt), n, params, want_plp, last_n)).encode()).hexdigest()

    def _failed_round(self, digest: str, accepted: float) -> int:
        """The request's failed rounds, counting this failure. A request accepted before its
        digest's last round started failed in that round (identical requests sent together, a
        group of rollouts): only one accepted after it (a resend) starts a new round."""
        now = time.monotonic()
        with self._lock:
            for k in [k for k, (_, at) in self._resends.items() if now - at > RESEND_MEMORY_S]:
                del self._resends[k]
            rounds, started = self._resends.get(digest, (0, float("-inf")))
            if accepted > started:
                rounds, started = rounds + 1, now
            self._resends[digest] = (rounds, started)
            return rounds

    def _call(self, fn, what: str = "request"):
        """``fn()`` tried 1 + ``retries`` times; records the engine as failing (for the door) or well."""
        for attempt in range(self.retries + 1):
            try:
                out = fn()
                self._failed = None
                return out
            except Exception as e:  # noqa: BLE001
                last = e
                if attempt < self.retries:
                    time.sleep(self.retry_wait_s * 2 ** attempt)
        status = 503 if _unreachable(last) else 502
        self._failed = (status, f"{self.where}: {what} failed {self.retries + 1} time(s): {_one_line(last)}",
                        time.monotonic())
        raise _EngineFailed(_one_line(last)) from last

    # ------------------------------------------------------------------ unloads
    def drop(self, key: str) -> None:
        """The sampler is gone (its session closed): unload its adapter once no request uses it."""
        with self._lock:
            self._closed.add(key)
            p = self._adapters.get(key)
            if p is None or p.dropped:
                return
            p.dropped = True
            idle = p.in_flight == 0
        if idle:
            self._pool.submit(self._unload, key, p)

    def _release(self, key: str, p: _Pushed) -> None:
        with self._lock:
            p.in_flight -= 1
            idle = p.dropped and p.in_flight == 0
        if idle:
            self._pool.submit(self._unload, key, p)

    def _unload(self, key: str, p: _Pushed) -> None:
        with self._lock:
            if self._adapters.get(key) is p:
                del self._adapters[key]
        if not p.done.wait(600) or p.error is not None:
            return  # never loaded
        unload = getattr(self.engine, "unload", None)
        if unload is None:  # the SGLang sink has none yet: the name stays until the engine restarts
            return
        try:
            unload(p.served)
            self.stats["unloads"] += 1
        except Exception as e:  # noqa: BLE001
            log.warning("%s: unloading %s failed: %s", self.where, p.name, _one_line(e))

    def loaded(self) -> dict[str, str]:
        """adapter_key -> engine name of every sampler pushed and not dropped (for tests and logs)."""
        with self._lock:
            return {k: p.served for k, p in self._adapters.items()
                    if p.done.is_set() and p.error is None and not p.dropped}

    def close(self, grace_s: float = 0.0) -> None:
        """Stop taking work; requests already at the engine get up to ``grace_s`` to finish (those
        still queued here are dropped: a graceful shutdown then journals them as lost)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace_s
        with self._lock:
            while self._running and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
        try:
            self.engine.close()
        except Exception as e:  # noqa: BLE001
            log.warning("%s: close failed: %s", self.where, _one_line(e))


def check_rollout_flags(url: str, engine: str, max_rank: int, rollout_max_rank: int, retries: int) -> int:
    """The ``--rollout-*`` flags checked (ValueError, one line; `lorafleet serve` checks them before
    the base loads); returns the engine's max LoRA rank."""
    if engine not in ENGINE_KINDS:
        raise ValueError(f"--rollout-engine must be one of {', '.join(ENGINE_KINDS)}, got {engine!r}")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--rollout-url must be an http(s):// URL such as http://127.0.0.1:8001, got {url!r}")
    if retries < 0:
        raise ValueError(f"--rollout-retries must be >= 0, got {retries}")
    if rollout_max_rank < 0:
        raise ValueError(f"--rollout-max-rank must be >= 1 (0: the server's --max-rank), got {rollout_max_rank}")
    engine_rank = rollout_max_rank or max_rank
    if engine_rank < max_rank:
        raise ValueError(f"--max-rank {max_rank} is above the engine's --rollout-max-rank {engine_rank}: adapters "
                         f"of a higher rank could not be pushed; lower --max-rank to {engine_rank} or restart the "
                         f"engine with --max-lora-rank {max_rank}")
    return engine_rank


def start_engine_sampling(service) -> EngineSampling:
    """The engine of ``--rollout-url`` / ``--rollout-engine``, checked to serve the service's base;
    ValueError (one line) if it cannot be used."""
    c = service.config
    max_rank = check_rollout_flags(c.rollout_url, c.rollout_engine, c.max_rank, c.rollout_max_rank,
                                   c.rollout_retries)
    url = c.rollout_url.rstrip("/")
    adapter_dir = str(Path(c.data_dir) / "rollout_adapters")
    base_dir = service.base_name if Path(service.base_name).is_dir() else adapter_dir  # SGLang reads its config
    engine = make_service_engine(c.rollout_engine, url, adapter_dir, max_rank, base_dir)
    sampling = EngineSampling(service, engine, c.rollout_engine, url, retries=c.rollout_retries)
    try:
        gap = sampling.check_base(service.fleet, service.fleet.tokenizer)
    except BaseException:
        sampling.close()
        raise
    log.info("sampling through %s (base logprob gap %.2g nats per token)", sampling.where, gap)
    return sampling


def make_service_engine(kind: str, url: str, adapter_dir: str, max_rank: int, base_dir: str):
    """The sink (``lorafleet.rollout.make_engine``) for the service; its errors are ValueErrors."""
    from ..rollout import RolloutError, make_engine

    spec = {"engine": kind, "url": url, "adapter_dir": adapter_dir}
    if kind == "vllm":  # the server does not report its --max-lora-rank (SGLang's does)
        spec["max_lora_rank"] = max_rank
    try:
        return make_engine(spec, base_dir=base_dir, max_rank=max_rank)
    except (RolloutError, OSError) as e:
        raise ValueError(f"rollout engine {kind} at {url}: {_one_line(e)}") from None
