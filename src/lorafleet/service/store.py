"""Service bookkeeping: sessions, training models, samplers (the `Store` interface, kept in
memory for now; a durable SQLite store can implement the same interface later), and the
checkpoint storage layout on disk.

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


@dataclass
class Sampler:
    sampler_id: str
    tenant: str
    session_id: str
    base_model: str
    model_path: str | None = None
    source: tuple | None = None  # None: base model; ("peft"|"state", dir) or ("weights", AdapterWeights)
    adapter_key: str | None = None  # fleet adapter name once loaded (shared by samplers of one path)


class Store:
    """What the service remembers about sessions, models and samplers."""

    def add_session(self, s: Session) -> None: raise NotImplementedError
    def get_session(self, session_id: str, tenant: str) -> Session: raise NotImplementedError
    def sessions(self) -> list[Session]: raise NotImplementedError
    def add_model(self, m: Model) -> None: raise NotImplementedError
    def get_model(self, model_id: str, tenant: str) -> Model: raise NotImplementedError
    def models_of_session(self, session_id: str) -> list[Model]: raise NotImplementedError
    def add_sampler(self, s: Sampler) -> None: raise NotImplementedError
    def get_sampler(self, sampler_id: str, tenant: str) -> Sampler: raise NotImplementedError
    def samplers_of_session(self, session_id: str) -> list[Sampler]: raise NotImplementedError


class InMemoryStore(Store):
    def __init__(self):
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._models: dict[str, Model] = {}
        self._samplers: dict[str, Sampler] = {}

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

    def tinker_path(self, model_id: str, kind: str, name: str) -> str:
        return f"tinker://{model_id}/{kind}/{name}"

    def resolve(self, tenant: str, path: str) -> tuple[str, Path]:
        """-> (kind, directory) of an existing checkpoint of ``tenant`` (NotFound otherwise)."""
        model_id, kind, name = parse_tinker_path(path)
        d = self.dir_for(tenant, model_id, kind, name)
        if not d.is_dir():
            raise NotFound(f"unknown checkpoint {path!r}")
        return kind, d
