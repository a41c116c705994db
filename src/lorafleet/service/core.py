"""`Service`: the Tinker protocol's operations over one Fleet (no HTTP here; see app.py)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..config import AdapterConfig
from ..engine import Fleet
from . import protocol
from .budget import MemoryBudget
from .budget_fleet import BudgetedFleet
from .futures import FutureStore
from .quotas import Quotas
from .sampling_api import SamplingAPI, check_seed
from .scheduler import Op, Scheduler, UserError, optim_config
from .jobs import JobRunner
from .recovery import recover
from .sqlite_store import SQLiteStore
from .store import Checkpoints, InMemoryStore, Invalid, Model, NotFound, Sampler, Session, Store, check_name
from .unembed import ATTN, head_bank_bytes, head_target, reported_lora, weights_info

log = logging.getLogger("lorafleet.service")

LORA_ALPHA = 32.0  # Tinker's LoRA scale numerator


@dataclass
class ServiceConfig:
    data_dir: str = "lorafleet-data"
    max_adapters: int = 16
    max_rank: int = 64
    aliases: list[str] = field(default_factory=list)  # other base_model names accepted for ours
    max_body_bytes: int = 64 * 1024 * 1024
    long_poll_s: float = 20.0
    max_samples: int = 128
    max_sample_tokens: int = 4096
    max_tokens_per_datum: int = 32768
    batch_window_s: float = 0.005
    gap_timeout_s: float = 30.0
    client_config: dict = field(default_factory=dict)  # SDK feature flags sent by client/config
    session_timeout_s: float = 300.0  # a session without heartbeats this long is finished (0: never)
    store: str = "sqlite"  # "sqlite" (DATA_DIR/lorafleet.db, survives restarts) or "memory"
    dataset_roots: list[str] = field(default_factory=list)  # where jobs may read server-side datasets
    job_checkpoint_every: int = 50  # default optimizer steps between a job's resume checkpoints
    cross_tenant_batching: bool = True  # False: one model per step (only to measure what batching buys)
    slot_wait_s: float = 60.0  # a sample waits this long for a slot for its sampler weights, then fails
    health_stall_s: float = 600.0  # healthz answers 503 once the scheduler shows no life this long
    shutdown_grace_s: float = 30.0  # on SIGTERM: how long running and queued work may take to finish
    header_timeout_s: float = 30.0  # a connection's request headers must arrive within this
    max_prompt_tokens: int = 32768  # tokens of one sample request's prompt
    memory_limit_mb: int = 0  # the process's memory bound (0: 80 % of the machine's or GPU's); see budget.py
    # per-tenant quotas (quotas.py); 0: no limit (slots: the whole pool)
    max_slots_per_tenant: int = 0
    max_sessions_per_tenant: int = 256
    max_jobs_per_tenant: int = 64
    max_queued_per_tenant: int = 1024
    # fair scheduling (fairness.py): decode steps a running sample takes per scheduler cycle (0: to
    # its end at once), and tokens of work each tenant with work gets per cycle
    decode_chunk_tokens: int = 32
    fair_share_tokens: int = 4096
    # a forward_backward priced over this runs as micro-batches in successive cycles (-1: the fair
    # share; 0: in one cycle, the old behaviour); see fb_pieces.py
    max_step_tokens: int = -1
    # sampling through a rollout engine (rollout_sampling.py); "": the built-in decoder
    rollout_url: str = ""
    rollout_engine: str = "vllm"  # "vllm" | "sglang"
    rollout_max_rank: int = 0  # the engine's --max-lora-rank (0: this server's max_rank)
    rollout_retries: int = 2  # tries after the first of each engine call


def new_fleet(model, tokenizer, config: ServiceConfig) -> Fleet:
    """The service's fleet; each follower rank of a distributed server builds its own the same way."""
    fleet = Fleet(model, max_adapters=config.max_adapters, max_rank=config.max_rank)
    fleet.tokenizer = tokenizer
    return fleet


class Service(SamplingAPI):
    def __init__(self, model, tokenizer, base_name: str, config: ServiceConfig | None = None,
                 store: Store | None = None, tokenizer_dir: str | None = None, wrap_fleet=None):
        self.config = config or ServiceConfig()
        self.base_name = base_name
        self.fleet = new_fleet(model, tokenizer, self.config)
        if wrap_fleet is not None:  # under torchrun: every rank runs each engine call (distributed/serve.py)
            self.fleet = wrap_fleet(self.fleet)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        # what lora_config.train_unembed adapts (None: not the head here, and reported so; unembed.py)
        self.head_name, self.unembed_missing = head_target(
            model, self.fleet, self.config.rollout_engine if self.config.rollout_url else None)
        self.unembed_target = None if self.unembed_missing else self.head_name
        if self.unembed_target is None:
            log.warning("train_unembed: the LM head is not adapted (%s); models report train_unembed false",
                        self.unembed_missing)
        banks = head_bank_bytes(model, self.config.max_adapters, self.config.max_rank) if self.unembed_target else 0
        # measured now: the base and the fleet are what the budget's limit must hold besides work
        self.budget = MemoryBudget.for_model(model, self.config.memory_limit_mb, self.config.max_body_bytes,
                                             device=self.fleet.lora_device.type, banks_bytes=banks)
        self.fleet = BudgetedFleet(self.fleet, self.budget)
        self.quotas = Quotas(self)
        self.arch = str(getattr(model.config, "model_type", "unknown"))
        self.data_dir = Path(self.config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if store is None:
            if self.config.store not in ("sqlite", "memory"):
                raise ValueError(f"store must be 'sqlite' or 'memory', got {self.config.store!r}")
            store = SQLiteStore(self.data_dir / "lorafleet.db") if self.config.store == "sqlite" else InMemoryStore()
        self.store = store
        self.futures = FutureStore(journal=self.store)
        self.checkpoints = Checkpoints(self.data_dir)
        if tokenizer_dir is None and tokenizer is not None:
            from ..data.tokenizer import save_tokenizer

            tokenizer_dir = str(save_tokenizer(tokenizer, self.data_dir / "tokenizer").resolve())
        self.tokenizer_dir = tokenizer_dir
        self.rollout = None  # sampling through a rollout engine; checked against our base before any thread starts
        if self.config.rollout_url:
            from .rollout_sampling import start_engine_sampling

            self.rollout = start_engine_sampling(self)
        self._linear_names = self.fleet.linear_names
        self.scheduler = Scheduler(self.fleet, self.futures, batch_window_s=self.config.batch_window_s,
                                   gap_timeout_s=self.config.gap_timeout_s,
                                   cross_model_batching=self.config.cross_tenant_batching,
                                   slot_wait_s=self.config.slot_wait_s,
                                   decode_chunk_tokens=self.config.decode_chunk_tokens,
                                   fair_share_tokens=self.config.fair_share_tokens,
                                   max_step_tokens=self.config.max_step_tokens)
        self.recovered = recover(self)
        self.jobs = JobRunner(self)
        self.scheduler.start()
        self.jobs.start()
        self._closing = threading.Event()
        if self.config.session_timeout_s:
            threading.Thread(target=self._reap, name="lorafleet-reaper", daemon=True).start()

    def close(self, grace_s: float = 0.0):
        """Stop. With ``grace_s`` (a graceful shutdown), queued and running work first gets up to
        that long to finish; requests still unfinished then are journaled as lost, so polling them
        after a restart answers 410 (retryable). The store is closed last (SQLite: WAL checkpointed)."""
        if self._closing.is_set():
            return
        self._closing.set()
        self.jobs.stop()
        if grace_s > 0 and not self.scheduler.drain(grace_s):
            log.warning("shutdown: %d operation(s) still queued or running after %g s", self.scheduler.queued(),
                        grace_s)
        self.scheduler.stop()
        if self.rollout is not None:
            self.rollout.close(grace_s)
        if grace_s > 0:
            lost = self.store.fail_pending("the server shut down before this request finished, so it was not "
                                           "completed; send it again")
            if lost:
                log.warning("shutdown: %d unfinished request(s) marked lost (410 after a restart)", lost)
        self.store.close()

    def _reap(self):
        """Finish sessions whose client stopped sending heartbeats (frees their slots)."""
        period = min(30.0, self.config.session_timeout_s / 2)
        while not self._closing.wait(period):
            self.reap_once()

    def reap_once(self) -> list[str]:
        """Finish every session silent for longer than ``session_timeout_s``; their request ids."""
        now, rids = time.time(), []
        for s in self.store.sessions():
            if not s.finished and now - s.last_seen > self.config.session_timeout_s:
                log.warning("session %s of %s sent no heartbeat for %.0f s: finishing it",
                            s.session_id, s.tenant, now - s.last_seen)
                rids.append(self.finish_session(s.tenant, s.session_id))
        return rids

    # ------------------------------------------------------------------ helpers
    def check_base(self, base_model: str | None) -> str:
        if base_model is None or base_model in (self.base_name, *self.config.aliases):
            return self.base_name
        raise Invalid(f"unknown base_model {base_model!r}; this server serves {self.base_name!r}"
                      + (f" (aliases: {self.config.aliases})" if self.config.aliases else "")
                      + "; one server serves one base: `lorafleet serve --base NAME` picks it")

    def capabilities(self) -> dict:
        names = [self.base_name, *self.config.aliases]
        return {"supported_models": [{"model_name": n, "trainable": True, "sampleable": True} for n in names]}

    def adapter_config(self, lora: dict) -> AdapterConfig:
        rank = lora.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= self.config.max_rank:
            raise Invalid(f"lora_config.rank must be an integer in [1, {self.config.max_rank}], got {rank!r}")
        train_attn, train_mlp = bool(lora.get("train_attn", True)), bool(lora.get("train_mlp", True))
        attn = [n for n in self._linear_names if n in ATTN]
        mlp = [n for n in self._linear_names if n not in ATTN]
        targets = (attn if train_attn else []) + (mlp if train_mlp else [])
        if bool(lora.get("train_unembed", True)) and self.unembed_target:  # the SDK's default is True
            targets.append(self.head_name)
        experts = train_mlp and self.fleet.expert_lora  # not spec.moe: Llama 4 / DBRX attach dense-only
        if not targets and not experts:
            why = f"; train_unembed does not adapt the LM head here: {self.unembed_missing}" \
                if lora.get("train_unembed", True) and self.unembed_missing else ""
            raise Invalid(f"lora_config trains nothing on this base (set train_attn or train_mlp){why}")
        seed = check_seed(lora.get("seed"), "lora_config.seed")
        return AdapterConfig(rank=rank, alpha=LORA_ALPHA, target_modules=tuple(targets),
                             experts=experts, seed=int(seed) if seed is not None else 0)

    @staticmethod
    def adapter_name(tenant: str, model_id: str) -> str:
        return f"{tenant}/{model_id}"

    def _future(self, tenant: str, kind: str, model_id: str | None = None, seq_id: int | None = None) -> str:
        return self.futures.create(tenant, kind, model_id, seq_id)

    # ------------------------------------------------------------------ sessions
    def create_session(self, tenant: str, body: dict) -> dict:
        self.quotas.check_session(tenant)
        sid = uuid.uuid4().hex[:16]
        self.store.add_session(Session(sid, tenant, meta={"tags": body.get("tags"), "sdk": body.get("sdk_version")}))
        return {"type": "create_session", "session_id": sid}

    def heartbeat(self, tenant: str, body: dict) -> dict:
        s = self.store.get_session(str(body.get("session_id")), tenant)
        s.last_seen = time.time()
        self.store.update(s)
        return {"type": "session_heartbeat"}

    def finish_session(self, tenant: str, session_id: str) -> str:
        """Close the session's models (freeing their slots); returns the request id to wait on."""
        s = self.store.get_session(session_id, tenant)
        s.finished = True
        self.store.update(s)
        models = [m for m in self.store.models_of_session(session_id) if not m.closed]
        samplers = [x for x in self.store.samplers_of_session(session_id) if x.ephemeral]
        for m in models:
            m.closed = True
            self.store.update(m)

        def fn(fleet):
            for m in models:
                self.scheduler.close_model(m.model_id)
                if m.adapter in fleet.adapters:
                    fleet.remove_adapter(m.adapter)
            for x in samplers:
                if x.adapter_key:
                    self.scheduler.drop_sampler_adapter(x.adapter_key)
                    if self.rollout is not None:
                        self.rollout.drop(x.adapter_key)
                if x.source and x.source[0] == "peft":
                    shutil.rmtree(x.source[1], ignore_errors=True)
            return {}

        rid = self._future(tenant, "finish")
        self.scheduler.submit(Op(rid, tenant, "control", fn))
        return rid

    # ------------------------------------------------------------------ models
    def create_model(self, tenant: str, body: dict) -> dict:
        session = self.store.get_session(str(body.get("session_id")), tenant)
        self.quotas.check_queue(tenant)
        seq = body.get("model_seq_id")
        if not isinstance(seq, int) or seq < 0:
            raise Invalid("model_seq_id must be a non-negative integer")
        base = self.check_base(body.get("base_model"))
        lora = body.get("lora_config")
        if not isinstance(lora, dict):
            raise Invalid("create_model needs lora_config (only LoRA training is supported)")
        opt = body.get("optimizer_config") or {"type": "adamw"}
        if isinstance(opt, dict) and opt.get("type", "adamw") != "adamw":
            raise Invalid(f"optimizer {opt.get('type')!r} is not supported (adamw only)")
        cfg = self.adapter_config(lora)
        model_id = f"{session.session_id}:train:{seq}"
        if self.store.has_model(model_id):
            raise Invalid(f"model {model_id!r} already exists")
        self.quotas.check_slot(tenant)
        m = Model(model_id, tenant, session.session_id, self.adapter_name(tenant, model_id), base, cfg.rank,
                  reported_lora(lora, cfg, self.head_name))
        self.store.add_model(m)
        return self._open_in_slot(m, lambda fleet: fleet.add_adapter(m.adapter, cfg),
                                  {"model_id": model_id, "type": "create_model"})

    def _open_in_slot(self, m: Model, put, result: dict) -> dict:
        """Queue the op that frees a slot, puts ``m``'s adapter there with ``put(fleet)`` and opens
        the model; if that fails the model is closed and the client gets a user error."""
        def fn(fleet):
            try:
                self.scheduler.make_room()
                put(fleet)
            except ValueError as e:
                m.closed = True
                self.store.update(m)
                raise UserError(str(e)) from None
            self.scheduler.open_model(m.model_id)
            return result

        rid = self._future(m.tenant, result["type"])
        self.scheduler.submit(Op(rid, m.tenant, "control", fn))
        return {"request_id": rid, "model_id": m.model_id}

    def get_info(self, tenant: str, body: dict) -> dict:
        m = self.store.get_model(str(body.get("model_id")), tenant)
        return {"type": "get_info", "model_id": m.model_id, "is_lora": True, "lora_rank": m.rank,
                "train_unembed": bool(m.lora_config.get("train_unembed", False)),  # what the adapter trains
                "model_data": {"arch": self.arch, "model_name": m.base_model, "tokenizer_id": self.tokenizer_dir}}

    def weights_info(self, tenant: str, body: dict) -> dict:
        """The SDK's ``RestClient.get_weights_info_by_tinker_path`` (unembed.py)."""
        return weights_info(self, tenant, body)

    def _model_for(self, tenant: str, body: dict, allow_lost: bool = False) -> tuple[Model, int]:
        m = self.store.get_model(str(body.get("model_id")), tenant)
        self.quotas.check_queue(tenant)  # before the seq_id is looked at: a 429 leaves it for the retry
        seq = body.get("seq_id")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise Invalid(f"seq_id must be an integer >= 1, got {seq!r}")
        if not allow_lost:
            self._check_not_lost(m, seq)
        return m, seq

    def _check_not_lost(self, m: Model, seq: int | None) -> None:
        if m.lost is None:
            return
        self.scheduler.skip(m.model_id, seq)
        where = (f"its last checkpoint is {m.lost}: continue from it with "
                 f"create_training_client_from_state_with_optimizer({m.lost!r}) (or load_state on this "
                 "training client)" if m.lost else "it never saved a checkpoint: create a new training client")
        raise Invalid(f"model {m.model_id} lost its unsaved training state when the server restarted; {where}")

    def _submit_model_op(self, tenant, m: Model, seq: int, kind: str, fn) -> dict:
        self.scheduler.check_seq(m.model_id, seq)
        rid = self._future(tenant, kind, m.model_id, seq)
        self.scheduler.submit(Op(rid, tenant, "control", fn, model_id=m.model_id, seq_id=seq))
        return {"request_id": rid, "model_id": m.model_id}

    def forward_backward(self, tenant: str, body: bytes) -> dict:
        self.quotas.check_queue(tenant)
        try:
            req = protocol.decode_forward_backward(body)
        except protocol.ProtocolError as e:
            if e.model_id is not None:
                try:
                    m = self.store.get_model(e.model_id, tenant)
                    self.scheduler.skip(m.model_id, e.seq_id)
                except NotFound:
                    pass
            raise
        m = self.store.get_model(req.model_id, tenant)
        self._check_not_lost(m, req.seq_id)
        try:
            if req.seq_id < 1:
                raise Invalid(f"seq_id must be >= 1, got {req.seq_id}")
            for i, d in enumerate(req.data):
                if len(d["tokens"]) > self.config.max_tokens_per_datum:
                    raise Invalid(f"datum {i} has {len(d['tokens'])} tokens; the limit is "
                                  f"{self.config.max_tokens_per_datum}")
            examples = protocol.to_examples(req, m.adapter, self.vocab)
            from ..engine.losses import resolve_config

            cfg = resolve_config(req.loss_fn, req.loss_fn_config)
            if req.loss_fn == "dpo" and len(examples) % 2:
                raise Invalid("dpo needs (chosen, rejected) pairs: an even number of datums")
            self.budget.check_datums([len(e.input_tokens) for e in examples], req.forward_only, req.loss_fn == "dpo")
            self.scheduler.check_seq(m.model_id, req.seq_id)
        except (Invalid, ValueError, UserError) as e:
            self.scheduler.skip(m.model_id, req.seq_id)
            raise Invalid(str(e)) from None
        rid = self._future(tenant, "forward" if req.forward_only else "forward_backward", m.model_id, req.seq_id)
        group = (req.loss_fn, tuple(sorted(cfg.items())), req.forward_only)
        self.scheduler.submit(Op(rid, tenant, "fwdbwd", model_id=m.model_id, seq_id=req.seq_id,
                                 examples=examples, group=group))
        return {"request_id": rid, "model_id": m.model_id}

    def optim_step(self, tenant: str, body: dict) -> dict:
        m, seq = self._model_for(tenant, body)
        adam = body.get("adam_params")
        try:
            if adam is None:
                p = body.get("optimizer_params") or body.get("optim_params")
                if p is not None and p.get("type") not in (None, "adamw", "adam"):
                    raise Invalid(f"optimizer {p.get('type')!r} is not supported (adamw only)")
                adam = p or {}
            if not isinstance(adam, dict):
                raise Invalid("adam_params must be an object")
            for k, v in adam.items():
                if k != "type" and (not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise Invalid(f"adam_params.{k} must be a finite number")
            cfg = optim_config(adam)
        except ValueError as e:
            self.scheduler.skip(m.model_id, seq)
            raise Invalid(str(e)) from None

        def fn(fleet):
            fleet.set_optimizer(m.adapter, cfg)
            out = fleet.optim_step([m.adapter])[m.adapter]
            metrics = {"grad_norm:mean": float(out["grad_norm"]), "learning_rate:mean": float(out["lr"]),
                       "step:max": float(out["step"])}
            if out.get("skipped") or not all(map(math.isfinite, metrics.values())):
                # JSON (and the SDK's dict of floats) has no inf / nan / null: a gradient that is not
                # finite (e.g. cross_entropy weights of 1e38) skipped the step (the engine leaves the
                # weights and moments alone); say so, and drop the values that are not numbers
                log.warning("optim_step of %s skipped: gradient norm %s", m.model_id, out["grad_norm"])
                metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
                metrics["skipped:max"] = 1.0
            return {"type": "optim_step", "metrics": metrics}

        return self._submit_model_op(tenant, m, seq, "optim_step", fn)

    def save_weights(self, tenant: str, body: dict) -> dict:
        m, seq = self._model_for(tenant, body)
        try:
            name = check_name(body.get("path") or f"state-{seq:06d}")
            d = self.checkpoints.dir_for(tenant, m.model_id, "weights", name)
            if d.exists() and not body.get("overwrite", False):
                raise Invalid(f"checkpoint {name!r} already exists (pass overwrite=True to replace it)")
        except Invalid:
            self.scheduler.skip(m.model_id, seq)
            raise

        def fn(fleet):
            fleet.save_state(m.adapter, d, extra={"model_id": m.model_id, "base_model": m.base_model,
                                                  "lora_config": m.lora_config,
                                                  "user_metadata": body.get("user_metadata")})
            path = self.checkpoints.tinker_path(m.model_id, "weights", name)
            self.store.add_checkpoint(tenant, path, m.model_id, "weights", str(d))
            return {"type": "save_weights", "path": path}

        return self._submit_model_op(tenant, m, seq, "save_weights", fn)

    def save_weights_for_sampler(self, tenant: str, body: dict) -> dict:
        m, seq = self._model_for(tenant, body)
        name, sss = body.get("path"), body.get("sampling_session_seq_id")
        try:
            if name is not None:
                d = self.checkpoints.dir_for(tenant, m.model_id, "sampler_weights", check_name(name))
            elif not isinstance(sss, int) or sss < 0:
                raise Invalid("save_weights_for_sampler needs a path (name) or a sampling_session_seq_id")
            else:
                sampler_id = f"{m.session_id}:sample:{sss}"
                self.store.add_sampler(Sampler(sampler_id, tenant, m.session_id, m.base_model,
                                               source=("pending",)))
        except Invalid:
            self.scheduler.skip(m.model_id, seq)
            raise

        def fn(fleet):
            if name is not None:
                fleet.save_adapter(m.adapter, d)
                path = self.checkpoints.tinker_path(m.model_id, "sampler_weights", name)
                self.store.add_checkpoint(tenant, path, m.model_id, "sampler_weights", str(d))
                return {"path": path, "type": "save_weights_for_sampler"}
            s = self.store.get_sampler(sampler_id, tenant)
            # on disk (not in memory) so the sampler survives a restart; removed with its session
            d_eph = self.checkpoints.ephemeral_dir(tenant, sampler_id)
            fleet.save_adapter(m.adapter, d_eph)
            s.source, s.ephemeral = ("peft", str(d_eph)), True
            s.adapter_key = f"{tenant}/{sampler_id}"
            self.store.update(s)
            self._register_loader(s)
            if self.rollout is not None:  # the snapshot now, in seq order; pushed off this thread
                self.rollout.stage(s, fleet, m.adapter)
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

        return self._submit_model_op(tenant, m, seq, "save_weights_for_sampler", fn)

    def load_weights(self, tenant: str, body: dict) -> dict:
        path, optimizer = body.get("path"), bool(body.get("optimizer", False))
        if body.get("model_id") is not None:  # into an existing model, in seq order
            m, seq = self._model_for(tenant, body, allow_lost=True)
            try:
                kind, d = self.checkpoints.resolve(tenant, path)
                if kind != "weights":
                    raise Invalid(f"{path!r} is a sampler checkpoint; load_state needs a tinker://.../weights/... path")
            except (Invalid, NotFound):
                self.scheduler.skip(m.model_id, seq)
                raise

            def fn(fleet):
                if m.adapter not in fleet.adapters:  # a model restored after a restart has no slot yet
                    try:
                        self.scheduler.make_room()
                    except ValueError as e:
                        raise UserError(str(e)) from None
                fleet.load_state(m.adapter, d)
                if not optimizer:
                    fleet.reset_optimizer(m.adapter)
                # the checkpoint's adapter replaced the model's: report what it trains
                m.lora_config = reported_lora(m.lora_config, fleet.adapters[m.adapter], self.head_name)
                m.lost = None
                self.store.update(m)
                return {"type": "load_weights", "path": path, "model_id": m.model_id}

            return self._submit_model_op(tenant, m, seq, "load_weights", fn)
        # create a model from a checkpoint
        session = self.store.get_session(str(body.get("session_id")), tenant)
        mseq = body.get("model_seq_id")
        if not isinstance(mseq, int) or mseq < 0:
            raise Invalid("load_weights needs model_id, or session_id with model_seq_id")
        base = self.check_base(body.get("base_model"))
        kind, d = self.checkpoints.resolve(tenant, path)
        if kind != "weights":
            raise Invalid(f"{path!r} is a sampler checkpoint; training needs a tinker://.../weights/... path")
        try:
            meta = json.loads((d / "state.json").read_text())
            rank = int(meta["adapter"]["rank"])
            lora = reported_lora((meta.get("extra") or {}).get("lora_config") or {"rank": rank}, meta["adapter"],
                                 self.head_name)
        except Exception as e:  # noqa: BLE001
            raise Invalid(f"{path!r} is not a readable checkpoint ({e})") from None
        if lora["train_unembed"] and self.unembed_missing:  # at the door: it could not be trained or sampled
            raise Invalid(f"{path!r} has LoRA on the LM head, which this server does not adapt: {self.unembed_missing}")
        model_id = f"{session.session_id}:train:{mseq}"
        self.quotas.check_queue(tenant)
        self.quotas.check_slot(tenant)
        m = Model(model_id, tenant, session.session_id, self.adapter_name(tenant, model_id), base, rank, lora)
        self.store.add_model(m)

        def put(fleet):
            fleet.load_state(m.adapter, d)
            if not optimizer:
                fleet.reset_optimizer(m.adapter)

        return self._open_in_slot(m, put, {"type": "load_weights", "path": path, "model_id": model_id})

    # ------------------------------------------------------------------ futures
    def owner_check(self, tenant: str, rid: str) -> None:
        if self.futures.owner(rid) != tenant:
            raise NotFound(f"unknown request_id {rid!r}")
