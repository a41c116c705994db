"""`SQLiteStore`: the service's default store — every record written through to one SQLite file.

Reads are served from the in-memory records (`InMemoryStore`); every add / update is also
written to ``DATA_DIR/lorafleet.db`` in its own transaction before the call returns, so a
``kill -9`` loses nothing that was acknowledged. WAL journaling with ``synchronous=NORMAL``:
a committed transaction survives the process dying (not a power cut — use FULL for that).

On open, the records of the previous run are loaded: sessions, models, samplers backed by files,
checkpoints, jobs, job metrics and the request journal (see service/recovery.py for what a
restart does with them).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

from .store import InMemoryStore, Job, Model, RequestRecord, Sampler, Session

SCHEMA_VERSION = 1

log = logging.getLogger("lorafleet.service")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, tenant TEXT, data TEXT);
CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, tenant TEXT, data TEXT);
CREATE TABLE IF NOT EXISTS samplers (id TEXT PRIMARY KEY, tenant TEXT, data TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (tenant TEXT, path TEXT, model_id TEXT, kind TEXT, dir TEXT,
                                        created REAL, PRIMARY KEY (tenant, path));
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, tenant TEXT, data TEXT);
CREATE TABLE IF NOT EXISTS job_metrics (job_id TEXT, n INTEGER, data TEXT, PRIMARY KEY (job_id, n));
CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, tenant TEXT, kind TEXT, model_id TEXT,
                                     seq_id INTEGER, status TEXT, body BLOB, content_type TEXT,
                                     error TEXT, category TEXT, created REAL);
CREATE INDEX IF NOT EXISTS requests_model ON requests (model_id, seq_id);
"""


def _dump(record) -> str:
    d = asdict(record)
    if isinstance(record, Sampler):
        d["source"] = None if record.source is None else [str(x) for x in record.source]
    return json.dumps(d, default=str)


def _load(cls, text: str):
    d = json.loads(text)
    names = {f.name for f in fields(cls)}
    obj = cls(**{k: v for k, v in d.items() if k in names})
    if isinstance(obj, Sampler) and obj.source is not None:
        obj.source = tuple(obj.source)
    return obj


class SQLiteStore(InMemoryStore):
    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db_lock = threading.Lock()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not a readable lorafleet database ({e})") from None
        if row is None:
            self._exec("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise ValueError(f"{self.path} has schema version {row[0]}; this lorafleet reads {SCHEMA_VERSION}")
        self._load_all()

    def _exec(self, sql: str, args: tuple = ()):
        with self._db_lock:
            self._db.execute(sql, args)

    def close(self):
        with self._db_lock:
            try:  # fold the WAL into the database file and empty it (a clean shutdown leaves no WAL)
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:  # e.g. already closed
                log.warning("WAL checkpoint at close failed: %s", e)
            self._db.close()

    def _load_all(self):
        q = self._db.execute
        for (data,) in q("SELECT data FROM sessions"):
            s = _load(Session, data)
            self._sessions[s.session_id] = s
        for (data,) in q("SELECT data FROM models"):
            m = _load(Model, data)
            self._models[m.model_id] = m
        for (data,) in q("SELECT data FROM samplers"):
            s = _load(Sampler, data)
            self._samplers[s.sampler_id] = s
        for row in q("SELECT tenant, path, model_id, kind, dir, created FROM checkpoints ORDER BY created"):
            self._checkpoints.append(tuple(row))
        for (data,) in q("SELECT data FROM jobs"):
            j = _load(Job, data)
            self._jobs[j.job_id] = j
        for job_id, data in q("SELECT job_id, data FROM job_metrics ORDER BY job_id, n"):
            self._metrics.setdefault(job_id, []).append(json.loads(data))

    # ------------------------------------------------------------------ records
    _TABLES = {Session: ("sessions", "session_id"), Model: ("models", "model_id"),
               Sampler: ("samplers", "sampler_id"), Job: ("jobs", "job_id")}

    def _put(self, record):
        table, key = self._TABLES[type(record)]
        self._exec(f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?)",
                   (getattr(record, key), record.tenant, _dump(record)))

    def add_session(self, s):
        super().add_session(s)
        self._put(s)

    def add_model(self, m):
        super().add_model(m)
        self._put(m)

    def add_sampler(self, s):
        super().add_sampler(s)
        self._put(s)

    def add_job(self, j):
        super().add_job(j)
        self._put(j)

    def update(self, record):
        self._put(record)

    def add_checkpoint(self, tenant, path, model_id, kind, directory):
        super().add_checkpoint(tenant, path, model_id, kind, directory)
        self._exec("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                   (tenant, path, model_id, kind, str(directory), time.time()))

    def add_metric(self, job_id, record):
        with self._lock:
            n = len(self._metrics.get(job_id, []))
            super().add_metric(job_id, record)
        self._exec("INSERT OR REPLACE INTO job_metrics VALUES (?, ?, ?)", (job_id, n, json.dumps(record)))

    def truncate_metrics(self, job_id: str, keep: int) -> None:
        """Drop metrics past the first ``keep`` (a resumed job re-logs the steps after its checkpoint)."""
        with self._lock:
            self._metrics[job_id] = self._metrics.get(job_id, [])[:keep]
        self._exec("DELETE FROM job_metrics WHERE job_id = ? AND n >= ?", (job_id, keep))

    # ------------------------------------------------------------------ request journal
    def add_request(self, r: RequestRecord):
        self._exec("INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (r.request_id, r.tenant, r.kind, r.model_id, r.seq_id, r.status, r.body, r.content_type,
                    r.error, r.category, r.created))

    def finish_request(self, r: RequestRecord):
        self._exec("UPDATE requests SET status = ?, body = ?, content_type = ?, error = ?, category = ? "
                   "WHERE id = ?", (r.status, r.body, r.content_type, r.error, r.category, r.request_id))

    def get_request(self, request_id):
        with self._db_lock:
            row = self._db.execute("SELECT id, tenant, kind, model_id, seq_id, status, body, content_type, error, "
                                   "category, created FROM requests WHERE id = ?", (request_id,)).fetchone()
        return None if row is None else RequestRecord(*row)

    def purge_requests(self, older_than):
        self._exec("DELETE FROM requests WHERE status != 'pending' AND created < ?", (older_than,))

    def pending_requests(self) -> list[RequestRecord]:
        with self._db_lock:
            rows = self._db.execute("SELECT id FROM requests WHERE status = 'pending'").fetchall()
        return [self.get_request(r[0]) for r in rows]

    def max_seq(self, model_id: str) -> int:
        with self._db_lock:
            row = self._db.execute("SELECT max(seq_id) FROM requests WHERE model_id = ?", (model_id,)).fetchone()
        return int(row[0] or 0)

    def fail_pending(self, message: str) -> int:
        """Mark every request the previous process left unfinished as lost; how many."""
        with self._db_lock:
            cur = self._db.execute("UPDATE requests SET status = 'lost', error = ? WHERE status = 'pending'",
                                   (message,))
            return cur.rowcount
