"""Service bookkeeping: sessions, training models, samplers, checkpoints, jobs and their
metrics, and the journal of requests (the `Store` interface; `InMemoryStore` keeps it in
memory, `sqlite_store.SQLiteStore` — the server's default — also writes it through to SQLite),
plus the checkpoint storage layout on disk.

Records are plain dataclasses the service mutates in place; it calls ``store.update(record)``
after a change that must survive a restart.

Checkpoints live under ``DATA_DIR/tenants/<tenant>/runs/<model_id>/{weights|sampler_weights}/<name>``
and are named to clients as ``tinker://<model_id>/{weights|sampler_weights}/<name>``. A path is
always resolved inside the *caller's* tenant directory, so another tenant's checkpoint simply
does not exist for it (404), and names are restricted to a safe character set so nothing can
escape the storage root.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class NotFound(Exception):
    """An id the caller cannot see (HTTP 404)."""


class Invalid(ValueError):
    """A malformed request value (HTTP 400)."""


@dataclass
class Session:
    session_id: str
    tenant: str
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    finished: bool = False
    meta: dict = field(default_factory=dict)


@dataclass
class Model:
    model_id: str
    tenant: str
    session_id: str
    adapter: str  # adapter name inside the fleet (unique per tenant/model)
    base_model: str
    rank: int
    lora_config: dict = field(default_factory=dict)
    closed: bool = False
    # set when a restart lost the training state the model had in memory: the path of its last
    # checkpoint (or "" if it never saved one); cleared by load_state
    lost: str | None = None


@dataclass
class Sampler:
    sampler_id: str
    tenant: str
    session_id: str
    base_model: str
    model_path: str | None = None
    # None: the base model; ("peft" | "state", dir): weights on disk; ("pending",): being saved;
    # ("lost",): a restart interrupted the save
    source: tuple | None = None
    adapter_key: str | None = None  # fleet adapter name once loaded (shared by samplers of one path)
    ephemeral: bool = False  # weights saved for this sampler only (deleted with its session)


@dataclass
class Job:
    """A fire-and-forget adapter training job (see service/jobs.py)."""

    job_id: str
    tenant: str
    name: str
    spec: dict  # AdapterJob fields + max_length / overflow / checkpoint_every / data files
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total_steps: int = 0
    error: str | None = None
    checkpoint: str | None = None  # directory of the last resume checkpoint
    export: str | None = None  # directory of the final PEFT export
    cancel: bool = False
    resumed_from: list[int] = field(default_factory=list)  # checkpoint steps it resumed from after restarts

    FINAL = ("succeeded", "failed", "cancelled")

    def public(self) -> dict:
        return {"job_id": self.job_id, "name": self.name, "status": self.status, "step": self.step,
                "total_steps": self.total_steps, "created": self.created, "started": self.started,
                "finished": self.finished, "error": self.error, "adapter": self.spec.get("adapter"),
                "resumed_from": self.resumed_from, "downloadable": self.export is not None}


@dataclass
class RequestRecord:
    """The journal entry of one request: pending, then its outcome (kept after a restart)."""

    request_id: str
    tenant: str
    kind: str
    model_id: str | None = None
    seq_id: int | None = None
    status: str = "pending"  # pending | done | failed
    body: bytes | None = None  # done: JSON text or protobuf bytes
    content_type: str | None = None
    error: str | None = None
    category: str | None = None
    created: float = field(default_factory=time.time)


class Store:
    """What the service remembers (see the module docstring)."""

    def add_session(self, s: Session) -> None: raise NotImplementedError
    def get_session(self, session_id: str, tenant: str) -> Session: raise NotImplementedError
    def sessions(self) -> list[Session]: raise NotImplementedError
    def add_model(self, m: Model) -> None: raise NotImplementedError
    def get_model(self, model_id: str, tenant: str) -> Model: raise NotImplementedError
    def models_of_session(self, session_id: str) -> list[Model]: raise NotImplementedError
    def add_sampler(self, s: Sampler) -> None: raise NotImplementedError
    def get_sampler(self, sampler_id: str, tenant: str) -> Sampler: raise NotImplementedError
    def samplers_of_session(self, session_id: str) -> list[Sampler]: raise NotImplementedError
    def models(self) -> list[Model]: raise NotImplementedError
    def samplers(self) -> list[Sampler]: raise NotImplementedError
    def update(self, record) -> None: raise NotImplementedError
    def add_checkpoint(self, tenant: str, path: str, model_id: str, kind: str, directory: str) -> None:
        raise NotImplementedError
    def last_checkpoint(self, model_id: str, kind: str = "weights") -> str | None: raise NotImplementedError
    def add_job(self, j: Job) -> None: raise NotImplementedError
    def get_job(self, job_id: str, tenant: str) -> Job: raise NotImplementedError
    def jobs(self, tenant: str | None = None) -> list[Job]: raise NotImplementedError
    def add_metric(self, job_id: str, record: dict) -> None: raise NotImplementedError
    def metrics(self, job_id: str) -> list[dict]: raise NotImplementedError
    def add_request(self, r: RequestRecord) -> None: raise NotImplementedError
    def finish_request(self, r: RequestRecord) -> None: raise NotImplementedError
    def get_request(self, request_id: str) -> RequestRecord | None: raise NotImplementedError
    def purge_requests(self, older_than: float) -> None: raise NotImplementedError
    def max_seq(self, model_id: str) -> int: raise NotImplementedError
    def fail_pending(self, message: str) -> int: raise NotImplementedError
    def truncate_metrics(self, job_id: str, keep: int) -> None: raise NotImplementedError
    def close(self) -> None: pass


class InMemoryStore(Store):
    def __init__(self):
        self._lock = threading.RLock()
        self._sessions: dict[str, Session] = {}
        self._models: dict[str, Model] = {}
        self._samplers: dict[str, Sampler] = {}
        self._checkpoints: list[tuple[str, str, str, str, str, float]] = []  # tenant, path, model, kind, dir, t
        self._jobs: dict[str, Job] = {}
        self._metrics: dict[str, list[dict]] = {}

    def add_session(self, s):
        with self._lock:
            self._sessions[s.session_id] = s

    def get_session(self, session_id, tenant):
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None or s.tenant != tenant:
            raise NotFound(f"unknown session {session_id!r}")
        return s

    def sessions(self):
        with self._lock:
            return list(self._sessions.values())

    def add_model(self, m):
        with self._lock:
            if m.model_id in self._models:
                raise Invalid(f"model {m.model_id!r} already exists")
            self._models[m.model_id] = m

    def get_model(self, model_id, tenant):
        with self._lock:
            m = self._models.get(model_id)
        if m is None or m.tenant != tenant:
            raise NotFound(f"unknown model_id {model_id!r}")
        if m.closed:
            raise NotFound(f"model_id {model_id!r} was closed with its session")
        return m

    def has_model(self, model_id) -> bool:
        with self._lock:
            return model_id in self._models

    def models_of_session(self, session_id):
        with self._lock:
            return [m for m in self._models.values() if m.session_id == session_id]

    def add_sampler(self, s):
        with self._lock:
            if s.sampler_id in self._samplers:
                raise Invalid(f"sampling session {s.sampler_id!r} already exists")
            self._samplers[s.sampler_id] = s

    def get_sampler(self, sampler_id, tenant):
        with self._lock:
            s = self._samplers.get(sampler_id)
        if s is None or s.tenant != tenant:
            raise NotFound(f"unknown sampling session {sampler_id!r}")
        return s

    def samplers_of_session(self, session_id):
        with self._lock:
            return [s for s in self._samplers.values() if s.session_id == session_id]

    def models(self):
        with self._lock:
            return list(self._models.values())

    def samplers(self):
        with self._lock:
            return list(self._samplers.values())

    def update(self, record):
        pass  # records are live objects; a durable store writes them through here

    def add_checkpoint(self, tenant, path, model_id, kind, directory):
        with self._lock:
            self._checkpoints = [c for c in self._checkpoints if c[1] != path or c[0] != tenant]
            self._checkpoints.append((tenant, path, model_id, kind, directory, time.time()))

    def last_checkpoint(self, model_id, kind="weights"):
        with self._lock:
            hits = [c for c in self._checkpoints if c[2] == model_id and c[3] == kind]
        return hits[-1][1] if hits else None

    def add_job(self, j):
        with self._lock:
            self._jobs[j.job_id] = j

    def get_job(self, job_id, tenant):
        with self._lock:
            j = self._jobs.get(job_id)
        if j is None or j.tenant != tenant:
            raise NotFound(f"unknown job {job_id!r}")
        return j

    def jobs(self, tenant=None):
        with self._lock:
            return [j for j in self._jobs.values() if tenant is None or j.tenant == tenant]

    def add_metric(self, job_id, record):
        with self._lock:
            self._metrics.setdefault(job_id, []).append(dict(record))

    def metrics(self, job_id):
        with self._lock:
            return [dict(r) for r in self._metrics.get(job_id, [])]

    # the request journal only matters across restarts, which an in-memory store does not survive
    def add_request(self, r):
        pass

    def finish_request(self, r):
        pass

    def get_request(self, request_id):
        return None

    def purge_requests(self, older_than):
        pass

    def max_seq(self, model_id):
        return 0

    def fail_pending(self, message):
        return 0

    def truncate_metrics(self, job_id, keep):
        with self._lock:
            self._metrics[job_id] = self._metrics.get(job_id, [])[:keep]


# ------------------------------------------------------------------ checkpoint storage
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}:train:\d{1,9}$")
KINDS = {"weights": "weights", "sampler_weights": "sampler_weights"}


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise Invalid(f"checkpoint name {name!r} must be 1-128 characters of [A-Za-z0-9._-], "
                      "start with a letter or digit, and not contain '..'")
    return name


def parse_tinker_path(path: Any) -> tuple[str, str, str]:
    """``tinker://<model_id>/<kind>/<name>`` -> (model_id, kind, name)."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise Invalid(f"checkpoint path {path!r} must look like tinker://<model_id>/weights/<name>")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or parts[1] not in KINDS:
        raise Invalid(f"checkpoint path {path!r} must look like tinker://<model_id>/(weights|sampler_weights)/<name>")
    model_id, kind, name = parts
    if not _MODEL_RE.match(model_id):
        raise Invalid(f"checkpoint path {path!r}: {model_id!r} is not a model id")
    return model_id, kind, check_name(name)


class Checkpoints:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve() / "tenants"
        self.root.mkdir(parents=True, exist_ok=True)

    def dir_for(self, tenant: str, model_id: str, kind: str, name: str) -> Path:
        if not _MODEL_RE.match(model_id) or kind not in KINDS:
            raise Invalid(f"bad checkpoint location {model_id!r}/{kind!r}")
        d = (self.root / tenant / "runs" / model_id / kind / check_name(name)).resolve()
        if not d.is_relative_to(self.root / tenant):
            raise Invalid(f"checkpoint name {name!r} escapes the storage root")
        return d

    def ephemeral_dir(self, tenant: str, sampler_id: str) -> Path:
        """Where a sampler's own weights (save_weights_for_sampler without a name) live."""
        return self.root / tenant / "ephemeral" / sampler_id.replace(":", "_")

    def tinker_path(self, model_id: str, kind: str, name: str) -> str:
        return f"tinker://{model_id}/{kind}/{name}"

    def resolve(self, tenant: str, path: str) -> tuple[str, Path]:
        """-> (kind, directory) of an existing checkpoint of ``tenant`` (NotFound otherwise)."""
        model_id, kind, name = parse_tinker_path(path)
        d = self.dir_for(tenant, model_id, kind, name)
        if not d.is_dir():
            raise NotFound(f"unknown checkpoint {path!r}")
        return kind, d
