"""Fire-and-forget adapter jobs inside the service (the Miles-style mode).

A job is one adapter of a `lorafleet train` config (the same per-adapter fields) with its
dataset uploaded or named by a server path. Jobs wait in a queue and are admitted into free
slots of the service's one fleet; then the `JobRunner` thread drives each running job a
micro-batch at a time *through the scheduler*: every running job's ``forward_backward`` is
queued together, so they run in the same mixed step as each other and as any Tinker tenant's
requests ready at that moment. Optimizer steps, evaluation, checkpoints and the final PEFT
export are scheduler operations too (the scheduler thread is the only one touching the fleet).

Durability: a checkpoint (adapter state with moments + data cursor + step) is written every
``checkpoint_every`` optimizer steps, atomically, and recorded in the store; after a restart a
running job is re-queued and resumes from its last checkpoint, and its metrics past that
checkpoint are dropped and re-logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..data.datasets import DataCursor, load_examples, split_eval
from ..utils.values import read_number
from ..jobs.config import AdapterJob, ConfigError, read_adapter_job
from ..jobs.evaluate import evaluate
from ..utils.atomic import atomic_dir
from .futures import Failure
from .scheduler import Op, PoolFull
from .store import Invalid, Job, NotFound

log = logging.getLogger("lorafleet.service")
GROUP = ("cross_entropy", (), False)  # the scheduler's batching key for a job's forward_backward
SPEC_FIELDS = ("max_length", "overflow", "checkpoint_every")
CKPT_KEEP = 2


def check_job(body: dict, default_checkpoint_every: int) -> tuple[AdapterJob, dict]:
    """A POST /jobs body's adapter (validated, numbers read as `lorafleet train` reads them) and
    its job-level spec, with the adapter's fields as read under ``spec["adapter"]``; `Invalid`
    (a 400) naming the first problem. What needs the server (datasets, max_rank) is checked later."""
    if not isinstance(body.get("adapter"), dict):
        raise Invalid("a job needs 'adapter': the per-adapter fields of a lorafleet train config")
    fields_ = dict(body["adapter"])
    unknown = sorted(set(body) - {"adapter", "data", "eval_data", *SPEC_FIELDS})
    if unknown:
        raise Invalid(f"unknown job field(s) {unknown}")
    for k in ("data", "eval_data"):
        if k in fields_:
            raise Invalid(f"give the dataset as the job's top-level '{k}' ({{'jsonl': text}} or {{'path': p}})")
    allowed = {f.name for f in fields(AdapterJob)} - {"data", "eval_data"}
    bad = sorted(set(fields_) - allowed)
    if bad:
        raise Invalid(f"adapter: unknown field(s) {bad}; allowed: {sorted(allowed)}")
    if "name" not in fields_:
        raise Invalid("adapter: needs a 'name'")
    spec = {k: body.get(k) for k in SPEC_FIELDS if body.get(k) is not None}
    spec.setdefault("max_length", 128)
    spec.setdefault("overflow", "truncate")
    spec.setdefault("checkpoint_every", default_checkpoint_every)
    try:
        for k, least in (("max_length", 1), ("checkpoint_every", 0)):
            spec[k] = read_number(spec[k], int, k)
            if spec[k] < least:
                raise Invalid(f"{k} must be an integer >= {least}, got {spec[k]!r}")
        a = read_adapter_job({**fields_, "data": "-"}, "adapter")
    except ValueError as e:  # ConfigError and read_number's errors: the caller's mistake
        raise Invalid(str(e)) from None
    if spec["overflow"] not in ("truncate", "skip"):
        raise Invalid(f"overflow must be 'truncate' or 'skip', got {spec['overflow']!r}")
    spec["adapter"] = {k: getattr(a, k) for k in fields_}
    return a, spec


@dataclass
class _Running:
    job: Job
    adapter: str
    qid: str  # the scheduler queue of this job's operations
    spec: AdapterJob
    train: list
    evals: list
    cursor: DataCursor
    seq: int = 0
    micro: int = 0
    loss_sum: float = 0.0
    tok_sum: float = 0.0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class JobRunner:
    def __init__(self, service):
        self.svc = service
        self.store, self.scheduler, self.futures = service.store, service.scheduler, service.futures
        self.running: dict[str, _Running] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        for j in self.store.jobs():  # a restart: running jobs go back to the queue, to resume
            if j.status == "running":
                j.status = "queued"
                self.store.update(j)

    # ------------------------------------------------------------------ API (any thread)
    def submit(self, tenant: str, body: dict) -> dict:
        """Check and queue a job (app.py calls it in a worker thread: a large upload is parsed,
        written and tokenized there, off the HTTP event loop)."""
        a, spec = check_job(body, self.svc.config.job_checkpoint_every)
        self.svc.quotas.check_job(tenant)
        # a micro-batch is batch_size datums of up to max_length tokens: it must fit one step
        # (batch_size 10**7 was accepted and then tried to allocate 30 GB)
        self.svc.budget.check_job(a.batch_size, spec["max_length"], a.eval_batch_size)
        job_id = "job-" + uuid.uuid4().hex[:12]
        jdir = self.job_dir(tenant, job_id)
        try:
            if a.rank > self.svc.config.max_rank:
                raise Invalid(f"adapter: rank {a.rank} is above this server's max_rank {self.svc.config.max_rank}")
            self.svc.fleet.target_paths(a.adapter_config())
            spec["data"] = self._dataset(body.get("data"), jdir / "train.jsonl", "data")
            if body.get("eval_data") is not None:
                spec["eval_data"] = self._dataset(body["eval_data"], jdir / "eval.jsonl", "eval_data")
            train, evals = self._examples(a, spec, "check")
            if not train:
                raise Invalid("data has no usable example (all were skipped: too long for max_length?)")
        except (ConfigError, ValueError) as e:
            shutil.rmtree(jdir, ignore_errors=True)
            msg = str(e)  # name uploads as the client knows them, not by their place on the server
            for f, label in (("train.jsonl", "data (uploaded)"), ("eval.jsonl", "eval_data (uploaded)")):
                msg = msg.replace(str(jdir / f), label)
            raise Invalid(msg) from None
        j = Job(job_id, tenant, a.name, spec, total_steps=self._total_steps(a, len(train)))
        self.store.add_job(j)
        self._wake.set()
        return j.public()

    def cancel(self, tenant: str, job_id: str) -> dict:
        j = self.store.get_job(job_id, tenant)
        if j.status in Job.FINAL:
            raise Invalid(f"job {job_id} already ended ({j.status})")
        j.cancel = True
        if j.status == "queued":
            self._end_record(j, "cancelled")
        else:
            self.store.update(j)
        self._wake.set()
        return j.public()

    def status(self, tenant: str, job_id: str) -> dict:
        j = self.store.get_job(job_id, tenant)
        return dict(j.public(), metrics=self.store.metrics(job_id))

    def list(self, tenant: str) -> dict:
        out = []
        for j in sorted(self.store.jobs(tenant), key=lambda j: j.created):
            losses = [m["loss"] for m in self.store.metrics(j.job_id) if "loss" in m]
            out.append(dict(j.public(), last_loss=losses[-1] if losses else None))
        return {"jobs": out}

    def archive(self, tenant: str, job_id: str) -> Path:
        j = self.store.get_job(job_id, tenant)
        if j.export is None:
            raise Invalid(f"job {job_id} has no export to download yet (status {j.status})")
        path = Path(j.export).with_suffix(".tar.gz")
        if not path.is_file():
            raise NotFound(f"job {job_id}'s export is missing on the server")
        return path

    # ------------------------------------------------------------------ helpers
    def job_dir(self, tenant: str, job_id: str) -> Path:
        return self.svc.checkpoints.root / tenant / "jobs" / job_id

    def _dataset(self, src, dest: Path, what: str) -> str:
        if not isinstance(src, dict) or len(src) != 1 or not ({"jsonl", "path"} & set(src)):
            raise Invalid(f"{what} must be {{'jsonl': <file text>}} (an upload) or {{'path': <server path>}}")
        if "jsonl" in src:
            if not isinstance(src["jsonl"], str):
                raise Invalid(f"{what}.jsonl must be the dataset's text")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(src["jsonl"])
            return str(dest)
        p = Path(str(src["path"])).resolve()
        roots = [Path(r).resolve() for r in self.svc.config.dataset_roots]
        if not any(p.is_relative_to(r) for r in roots):
            raise Invalid(f"{what}.path {src['path']!r} is outside the server's dataset roots"
                          + (f" {[str(r) for r in roots]}" if roots else " (none configured: upload the file)"))
        if not p.is_file():
            raise Invalid(f"{what}.path {src['path']!r} does not exist on the server")
        return str(p)

    def _examples(self, a: AdapterJob, spec: dict, adapter: str):
        tok = self.svc.fleet.tokenizer
        train, _ = load_examples(spec["data"], tok, adapter, spec["max_length"], spec["overflow"])
        evals = []
        if spec.get("eval_data"):
            evals, _ = load_examples(spec["eval_data"], tok, adapter, spec["max_length"], spec["overflow"])
        elif a.eval_fraction:
            train, evals = split_eval(train, eval_fraction=a.eval_fraction, seed=a.seed)
        return train, evals

    @staticmethod
    def _total_steps(a: AdapterJob, n: int) -> int:
        return a.max_steps or max(1, math.ceil(a.epochs * n / (a.batch_size * a.grad_accum)))

    def _call(self, r: _Running, fn, kind: str = "control", **kw):
        """Run ``fn(fleet)`` (or a forward_backward) on the scheduler; returns the future's id."""
        rid = self.futures.create(r.job.tenant, "job", durable=False)
        self.scheduler.submit(Op(rid, r.job.tenant, kind, fn, model_id=r.qid, seq_id=r.next_seq(), **kw))
        return rid

    def _wait(self, rids: dict[str, str]) -> dict[str, object]:
        out = {}
        for key, rid in rids.items():
            while (res := self.futures.wait_sync(rid, 5.0)) is None:
                if self._stop.is_set():
                    raise _Stopping()
            out[key] = res
        return out

    # ------------------------------------------------------------------ the runner thread
    def start(self):
        self._thread = threading.Thread(target=self._loop, name="lorafleet-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self):
        while not self._stop.is_set():
            try:
                self._admit()
                if not self.running:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                self._micro_step()
            except _Stopping:
                return
            except Exception as e:  # noqa: BLE001 - the runner must not die
                log.exception("job runner: %s", e)
                time.sleep(1.0)

    def _admit(self):
        queued = sorted((j for j in self.store.jobs() if j.status == "queued"), key=lambda j: j.created)
        for j in queued:
            if not self.scheduler.has_room():
                return  # the pool is full: jobs wait, first come first served
            if not self.svc.quotas.may_start_job(j.tenant):
                continue  # its tenant holds its slot quota: later jobs of other tenants go first
            try:
                r = self._prepare(j)
            except (ValueError, ConfigError) as e:  # its dataset vanished or changed on disk
                self._end_record(j, "failed", f"cannot start: {e}")
                continue
            self.scheduler.open_model(r.qid)
            ckpt = Path(j.checkpoint) if j.checkpoint else None

            def put(fleet, r=r, ckpt=ckpt):
                try:
                    self.scheduler.make_room()
                except PoolFull:  # taken since has_room() said yes
                    return {"full": True}
                if ckpt is None:
                    fleet.add_adapter(r.adapter, r.spec.adapter_config())
                    fleet.set_optimizer(r.adapter, r.spec.optim_config(r.job.total_steps))
                    return {"resumed": False}
                fleet.load_state(r.adapter, ckpt / "adapter")
                state = json.loads((ckpt / "job.json").read_text())
                r.cursor.load_state_dict(state["cursor"])
                r.micro = state["micro"]
                r.tokens = state["tokens"]
                r.job.step = state["step"]
                r.job.resumed_from.append(state["step"])
                self.store.truncate_metrics(r.job.job_id, state["metrics"])
                return {"resumed": True}

            out = self._wait({"put": self._call(r, put)})["put"]
            if isinstance(out, Failure) or out.json.get("full"):
                self.scheduler.close_model(r.qid)
                if not isinstance(out, Failure):
                    return  # the pool is full: stay queued, first come first served
                self._end_record(j, "failed", f"cannot start: {out.error}")
                continue
            j.status, j.started = "running", j.started or time.time()
            self.store.update(j)
            self.running[j.job_id] = r
            log.info("job %s (%s) %s", j.job_id, j.tenant, "resumed at step %d" % j.step if out.json["resumed"]
                     else "started")

    def _prepare(self, j: Job) -> _Running:
        a = read_adapter_job({**j.spec["adapter"], "data": j.spec["data"]}, "adapter")
        adapter = f"{j.tenant}/{j.job_id}"
        train, evals = self._examples(a, j.spec, adapter)
        return _Running(j, adapter, f"job:{j.job_id}", a, train, evals, DataCursor(train, seed=a.seed))

    def _micro_step(self):
        for r in [r for r in self.running.values() if r.job.cancel]:
            self._finish(r, "cancelled")
        live = list(self.running.values())
        if not live:
            return
        rids = {}
        for r in live:  # every job's batch is queued before waiting: they share one mixed step
            rids[r.job.job_id] = self._call(r, None, "fwdbwd", examples=r.cursor.next_batch(r.spec.batch_size),
                                            group=GROUP, raw=True)
        done = self._wait(rids)
        due = {}
        for r in live:
            out = done[r.job.job_id]
            if isinstance(out, Failure):
                self._finish(r, "failed", out.error)
                continue
            r.loss_sum += out.json["loss:sum"]
            r.tok_sum += out.json["num_tokens:sum"]
            r.tokens += out.json["input_tokens"]
            r.micro += 1
            if r.micro % r.spec.grad_accum == 0:
                due[r.job.job_id] = self._call(r, lambda fleet, r=r: self._optim_step(fleet, r))
        for job_id, out in self._wait(due).items():
            r = self.running[job_id]
            if isinstance(out, Failure):
                self._finish(r, "failed", out.error)
            elif r.job.step >= r.job.total_steps:
                self._finish(r, "succeeded")

    def _optim_step(self, fleet, r: _Running) -> dict:
        """On the scheduler thread: step, log, evaluate and checkpoint when due."""
        om = fleet.optim_step([r.adapter])[r.adapter]
        j = r.job
        j.step += 1
        rec = {"step": j.step, "loss": r.loss_sum / max(r.tok_sum, 1.0), "lr": om["lr"],
               "grad_norm": om["grad_norm"], "tokens": r.tokens,
               "tokens_per_s": r.tokens / max(time.perf_counter() - r.t0, 1e-9), "time": time.time()}
        r.loss_sum = r.tok_sum = 0.0
        final = j.step >= j.total_steps
        if r.evals and ((r.spec.eval_every and j.step % r.spec.eval_every == 0) or final):
            rec.update(evaluate(fleet, r.adapter, r.evals, r.spec.eval_batch_size))
        self.store.add_metric(j.job_id, rec)
        every = j.spec["checkpoint_every"]
        if every and j.step % every == 0 and not final:
            self._checkpoint(fleet, r)
        self.store.update(j)
        return rec

    def _checkpoint(self, fleet, r: _Running):
        j = r.job
        root = self.job_dir(j.tenant, j.job_id) / "checkpoints"
        d = root / f"step-{j.step:06d}"
        with atomic_dir(d) as tmp:
            fleet.save_state(r.adapter, tmp / "adapter")
            (tmp / "job.json").write_text(json.dumps({"step": j.step, "micro": r.micro, "tokens": r.tokens,
                                                      "cursor": r.cursor.state_dict(),
                                                      "metrics": len(self.store.metrics(j.job_id))}))
        j.checkpoint = str(d)
        self.store.update(j)  # recorded only once the directory is complete
        for old in sorted(p for p in root.glob("step-*") if p != d)[:-(CKPT_KEEP - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)

    def _finish(self, r: _Running, status: str, error: str | None = None):
        j = r.job

        def end(fleet):
            if status == "succeeded":
                final = self.job_dir(j.tenant, j.job_id) / "final"
                fleet.save_adapter(r.adapter, final, format="peft")
                tmp = final.with_name(".final.tar.gz.tmp")
                with tarfile.open(tmp, "w:gz") as tar:
                    tar.add(final, arcname=j.name)
                os.replace(tmp, final.with_suffix(".tar.gz"))
                j.export = str(final)
            if r.adapter in fleet.adapters:
                fleet.remove_adapter(r.adapter)
            return {}

        out = self._wait({"end": self._call(r, end)})["end"]
        if isinstance(out, Failure) and status == "succeeded":
            status, error = "failed", f"export failed: {out.error}"
        self.scheduler.close_model(r.qid)
        self.running.pop(j.job_id, None)
        self._end_record(j, status, error)

    def _end_record(self, j: Job, status: str, error: str | None = None):
        j.status, j.error, j.finished = status, error, time.time()
        self.store.update(j)
        log.info("job %s (%s): %s%s", j.job_id, j.tenant, status, f" ({error})" if error else "")


class _Stopping(Exception):
    pass
