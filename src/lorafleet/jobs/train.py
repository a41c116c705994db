"""`lorafleet train`: every adapter of a YAML trains concurrently in shared mixed steps.

Each global step takes the next batch of every active adapter (its own batch size), runs one
`forward_backward` over all of them, and steps each adapter whose gradient accumulation is
complete. Adapters beyond the slot pool queue and are admitted as slots free; a finished adapter
is evaluated, exported (PEFT) and its slot freed. Checkpoints (every ``checkpoint_every`` global
steps, when the CLI stops the job on Ctrl-C / SIGTERM, and at the end) hold every active
adapter's full state, its data cursor and slot, so ``--resume`` continues bitwise identically on
CPU, and ``--resume`` of a finished run only reports its result. A run dir whose run stopped
before its first checkpoint holds nothing to resume: any start begins it over.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


from ..data.datasets import DataCursor, load_examples, split_eval
from ..engine import Fleet
from ..utils.atomic import atomic_dir, atomic_write_text
from ..distributed.jobs import any_rank, distribute_job, follow_checkpoint, quiet_unless_writer
from .base_model import load_base
from .config import TrainConfig
from .evaluate import accuracy_matrix, evaluate, format_matrix
from .outputs import METRICS_FILE, MetricsLog, Progress, plot_run

CKPT_DIR, LATEST, SUMMARY_FILE = "checkpoints", "LATEST", "summary.json"


@dataclass
class AdapterRun:
    slot: int
    total_steps: int
    step: int = 0
    micro: int = 0
    loss_sum: float = 0.0  # since the last optimizer step
    tok_sum: float = 0.0
    tokens: int = 0
    elapsed: float = 0.0
    cursor: dict = field(default_factory=dict)


class TrainJob:
    # under torchrun, ranks other than 0 run silent (lorafleet.distributed.jobs.silence)
    writes = True
    metrics_log = MetricsLog
    comm = None
    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool | None = None, log=None):
        self.cfg, self.resume = cfg, resume
        self.run_dir = Path(cfg.run_dir)  # relative to the working directory, like every CLI path
        self.progress = Progress(progress)
        self.log = log or self.progress.write
        quiet_unless_writer(self)  # torchrun ranks other than 0: silent before the base even loads
        self.config_hash = hashlib.sha256(json.dumps(_config_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
        # where the run stands, for the line the CLI prints when it is interrupted:
        # "setup" (base, data, restore), "steps" (the step loop), "summary" (every step done)
        self.phase = "setup"
        self.global_step = 0
        self.last_checkpoint: int | None = None  # global step of the newest checkpoint on disk
        self.stop_requested = False  # set by the CLI's signal handler: checkpoint after this step, stop
        self._start_over = False  # the run dir holds logs of a run stopped before any checkpoint

    # -------------------------------------------------------------- set-up
    def _check_run_dir(self) -> dict | None:
        """-> the checkpoint state to continue from, or None to start at step 0. A run dir whose
        run stopped before its first checkpoint has nothing to lose, so a fresh start and
        ``--resume`` both start it over; one with checkpoints (or a finished run) needs ``--resume``."""
        ckpt = _latest_checkpoint(self.run_dir / CKPT_DIR)
        finished = (self.run_dir / SUMMARY_FILE).is_file()
        if ckpt is not None and self.resume:
            state = json.loads((ckpt / "job.json").read_text())
            if state["config_hash"] != self.config_hash:
                raise ValueError(f"--resume: the config changed since {ckpt} was written; "
                                 "resume with the same YAML or start a new run_dir")
            state["_dir"] = str(ckpt)
            self.last_checkpoint = state["global_step"]
            return state
        if ckpt is None and not finished and any(self.run_dir.glob(f"*/{METRICS_FILE}")):
            self.log(f"{self.run_dir}: its run stopped before its first checkpoint (nothing to resume); "
                     "starting it over from step 0")
            self._start_over = True
            return None
        if self.resume:
            why = "its run finished without one" if finished else "start it without --resume"
            raise ValueError(f"--resume: {self.run_dir} has no checkpoint to resume from ({why})")
        if ckpt is not None or finished:
            what = ("a run, finished; pass --resume to see its result" if finished else
                    f"a run, checkpointed at global step {int(ckpt.name[5:])}; pass --resume to continue it")
            raise ValueError(f"{self.run_dir} already holds {what}, or --run-dir DIR to start a new run "
                             "elsewhere (nothing was written)")
        return None

    def _load_data(self, tok):
        """Every dataset is read and checked before training starts."""
        self.train_sets, self.eval_sets, self.data_stats = {}, {}, {}
        for a in self.cfg.adapters:
            exs, stats = load_examples(self.cfg.resolve(a.data), tok, a.name, self.cfg.max_length, self.cfg.overflow)
            if not exs:
                raise ValueError(f"adapter {a.name!r}: {a.data} has no usable example ({stats})")
            ev = []
            if a.eval_data:
                ev, _ = load_examples(self.cfg.resolve(a.eval_data), tok, a.name, self.cfg.max_length,
                                      self.cfg.overflow)
            elif a.eval_fraction:
                exs, ev = split_eval(exs, eval_fraction=a.eval_fraction, seed=self.cfg.seed)
            self.train_sets[a.name], self.eval_sets[a.name], self.data_stats[a.name] = exs, ev, stats

    def _total_steps(self, a) -> int:
        if a.max_steps:
            return a.max_steps
        n = len(self.train_sets[a.name])
        return max(1, math.ceil(a.epochs * n / (a.batch_size * a.grad_accum)))

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        state = self._check_run_dir()
        complete = state is not None and not (state["active"] or state["queue"])
        if complete and (self.run_dir / SUMMARY_FILE).is_file():
            return self._already_complete(state)  # (without its summary, it is computed again below)
        model, tok, base_name = load_base(self.cfg.base, log=self.log)
        self._load_data(tok)
        if self._start_over:  # its logs would mix with the new run's (its exports are rewritten)
            for a in self.cfg.adapters:
                (self.run_dir / a.name / METRICS_FILE).unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / "tb" / a.name, ignore_errors=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer, self.base_name = tok, base_name
        fleet = self.fleet = Fleet(model, max_adapters=self.cfg.max_adapters, max_rank=self.cfg.max_rank)
        fleet.logprob_chunk = self.cfg.logprob_chunk
        self.comm = distribute_job(self, fleet)  # torchrun or `parallelism:`; None: one process
        self.jobs = {a.name: a for a in self.cfg.adapters}
        self.active: dict[str, AdapterRun] = {}
        self.cursors: dict[str, DataCursor] = {}
        self.logs: dict[str, MetricsLog] = {}
        self.queue = [a.name for a in self.cfg.adapters]
        self.finished: list[str] = []
        self.global_step = 0
        if state is not None:
            self._restore(state)
        t_start = time.perf_counter()
        try:
            self._step_loop()
        finally:
            self.progress.close()
            for lg in self.logs.values():
                lg.close()
        return self._summary(time.perf_counter() - t_start)

    def _step_loop(self):
        """Every step, then the final checkpoint. A stop request (the CLI's Ctrl-C / SIGTERM
        handler) is honoured between steps, where every adapter's state is whole: the only safe
        place for a checkpoint, written as the periodic ones are, so resuming it is exact."""
        self.phase = "steps"
        while self.active or self.queue:
            self._admit()
            self._shared_step()
            if self.comm is not None:  # every rank stops at the same step
                self.stop_requested = any_rank(self.comm, self.stop_requested)
            due = self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0
            if (due or self.stop_requested) and (self.active or self.queue):
                self.checkpoint()
            if self.stop_requested and (self.active or self.queue):
                raise KeyboardInterrupt(f"stopped at global step {self.global_step}")
        if self.last_checkpoint != self.global_step:
            self.checkpoint()  # of the finished run: its --resume does no step again
        self.phase = "summary"
        if self.stop_requested:
            raise KeyboardInterrupt(f"stopped after the last step ({self.global_step})")

    def stop_point(self) -> str:
        """Where an interrupted run stands, and what is saved, in words."""
        if self.last_checkpoint is None:
            saved = "no checkpoint yet"
        elif self.last_checkpoint == self.global_step and self.phase != "setup":
            saved = "checkpoint saved"
        else:
            saved = f"last checkpoint at global step {self.last_checkpoint}"
        if self.phase == "setup":
            return f"before training {'started' if self.last_checkpoint is None else 'resumed'}, {saved}"
        if self.phase == "summary":
            return f"after its last step (global step {self.global_step}, {saved}), before its summary"
        return f"at global step {self.global_step}, {saved}"

    def _already_complete(self, state) -> dict:
        summary = json.loads((self.run_dir / SUMMARY_FILE).read_text())
        self.log(f"{self.run_dir}: the run is already complete (global step {state['global_step']}); "
                 "nothing to resume")
        self._report(summary)
        return summary

    def _admit(self):
        while self.queue and self.fleet.bank.free_slot() is not None:
            name = self.queue.pop(0)
            a = self.jobs[name]
            slot = self.fleet.add_adapter(name, a.adapter_config())
            total = self._total_steps(a)
            self.fleet.set_optimizer(name, a.optim_config(total))
            self.active[name] = AdapterRun(slot=slot, total_steps=total)
            self.cursors[name] = DataCursor(self.train_sets[name], seed=self.cfg.seed + a.seed)
            self.logs[name] = self.metrics_log(self.run_dir, name)
            st = self.data_stats[name]
            self.logs[name].log({"step": 0, "global_step": self.global_step, "data_examples": st["examples"],
                                 "data_truncated": st["truncated"], "data_skipped": st["skipped"]})
            self.progress.start(name, total, 0, position=slot)

    def _shared_step(self):
        names = sorted(self.active, key=lambda n: self.active[n].slot)
        batch, owners = [], []
        for n in names:
            b = self.cursors[n].next_batch(self.jobs[n].batch_size)
            batch += b
            owners += [n] * len(b)
        t0 = time.perf_counter()
        res = self.fleet.forward_backward(batch)
        for n in names:
            run, m = self.active[n], res.metrics[n]
            run.loss_sum += m["loss:sum"]
            run.tok_sum += m["tokens:sum"]
        tokens = {n: sum(len(e.input_tokens) for e, o in zip(batch, owners) if o == n) for n in names}
        stepped = self._end_micro_step(names, tokens, t0)
        for n, om in stepped.items():
            self._after_optim_step(n, om)

    def _end_micro_step(self, names, tokens: dict[str, int], t0: float) -> dict[str, dict]:
        """Count one micro-batch for every adapter in the step, optimizer-step those whose
        accumulation is complete, and advance the clocks. Returns optim_step's metrics."""
        due = []
        for n in names:
            run = self.active[n]
            run.micro += 1
            run.tokens += tokens[n]
            if run.micro % self.jobs[n].grad_accum == 0:
                due.append(n)
        stepped = self.fleet.optim_step(due) if due else {}
        dt = time.perf_counter() - t0
        self.global_step += 1
        for n in names:
            self.active[n].elapsed += dt
        return stepped

    def _after_optim_step(self, name, om):
        run, a = self.active[name], self.jobs[name]
        run.step += 1
        loss = run.loss_sum / max(run.tok_sum, 1.0)
        tok_s = run.tokens / max(run.elapsed, 1e-9)
        rec = {"step": run.step, "global_step": self.global_step, "loss": loss, "lr": om["lr"],
               "grad_norm": om["grad_norm"], "tokens": run.tokens, "tokens_per_s": tok_s}
        run.loss_sum = run.tok_sum = 0.0
        done = run.step >= run.total_steps
        if self.eval_sets[name] and ((a.eval_every and run.step % a.eval_every == 0) or done):
            rec.update(evaluate(self.fleet, name, self.eval_sets[name], a.eval_batch_size))
        self.logs[name].log(rec)
        self.progress.update(name, run.step, run.total_steps, loss, tok_s)
        if a.save_every and run.step % a.save_every == 0 and not done:
            self.fleet.save_adapter(name, self.run_dir / name / f"step-{run.step:06d}")
        if done:
            self._finish(name)

    def _finish(self, name):
        self.fleet.save_adapter(name, self.run_dir / name / "final", format="peft")
        # log while the bar is still alive, so tqdm redraws the bars around the line
        self.log(f"[{name}] finished: PEFT adapter in {self.run_dir / name / 'final'}")
        self.progress.finish(name)
        self.logs.pop(name).close()
        self.fleet.remove_adapter(name)
        del self.active[name], self.cursors[name]
        self.finished.append(name)

    # ---------------------------------------------------------- checkpoints
    def checkpoint(self):
        if not self.writes:
            return follow_checkpoint(self)
        tag = f"step-{self.global_step:06d}"
        root = self.run_dir / CKPT_DIR
        with atomic_dir(root / tag) as tmp:
            for n, run in self.active.items():
                self.fleet.save_state(n, tmp / "adapters" / n)
            runs = {n: dict(asdict(r), cursor=self.cursors[n].state_dict()) for n, r in self.active.items()}
            job = {"global_step": self.global_step, "queue": self.queue, "finished": self.finished,
                   "active": runs, "config_hash": self.config_hash, **self._extra_state()}
            (tmp / "job.json").write_text(json.dumps(job, indent=1))
        self.last_checkpoint = self.global_step  # in place: resumable now, LATEST or not
        atomic_write_text(root / LATEST, tag + "\n")
        for old in sorted(p for p in root.glob("step-*") if p.name != tag)[:-1]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)

    def _extra_state(self) -> dict:
        """Job-wide counters a subclass keeps in its checkpoints (restored by its `_restore`)."""
        return {}

    def _restore(self, state):
        ckpt = Path(state["_dir"])
        self.global_step, self.queue, self.finished = state["global_step"], state["queue"], state["finished"]
        for n, r in sorted(state["active"].items(), key=lambda kv: kv[1]["slot"]):
            cursor = r.pop("cursor")
            run = AdapterRun(**r)
            self.fleet.load_state(n, ckpt / "adapters" / n, slot=run.slot)
            self.active[n] = run
            self.cursors[n] = DataCursor(self.train_sets[n], seed=self.cfg.seed + self.jobs[n].seed)
            self.cursors[n].load_state_dict(cursor)
            self.logs[n] = self.metrics_log(self.run_dir, n, resume_step=self.global_step)
            self.progress.start(n, run.total_steps, run.step, position=run.slot)
        self.log(f"resumed {self.run_dir} at global step {self.global_step} from {ckpt.name}")

    # ------------------------------------------------------------- summary
    def _summary(self, seconds: float) -> dict:
        png = plot_run(self.run_dir) if self.writes else self.run_dir / "loss_curves.png"
        tasks = {n: self.eval_sets[n] for n in self.finished if self.eval_sets[n]}
        matrix = {}
        if tasks:
            names = [n for n in self.finished if n in tasks]
            matrix = {None: accuracy_matrix(self.fleet, [None], tasks)[None]}
            for i in range(0, len(names), self.cfg.max_adapters):
                group = names[i : i + self.cfg.max_adapters]
                for n in group:
                    self.fleet.load_adapter(n, self.run_dir / n / "final")
                matrix.update(accuracy_matrix(self.fleet, group, tasks))
                for n in group:
                    self.fleet.remove_adapter(n)
        summary = {"run_dir": str(self.run_dir), "base": self.base_name, "seconds": round(seconds, 1),
                   "adapters": self.finished, "data": self.data_stats, "loss_curves": str(png),
                   "accuracy": {("base" if k is None else k): v for k, v in matrix.items()}}
        self._write_summary(summary)
        return summary

    def _write_summary(self, summary: dict) -> None:
        if self.writes:
            atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
        self._report(summary)

    def _report(self, summary: dict) -> None:
        """The end of a run's output (also what `--resume` of a finished run shows)."""
        if summary["accuracy"]:
            self.log("\n" + format_matrix({(None if k == "base" else k): v for k, v in summary["accuracy"].items()}))
        self.log(f"loss curves: {summary['loss_curves']}")


def _latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint. Not read from LATEST: a crash between renaming a checkpoint into
    place and rewriting LATEST leaves LATEST one behind, and atomic_dir only ever shows complete
    ``step-*`` directories."""
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    return steps[-1] if steps else None


def _config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("source", None)
    d.pop("parallelism", None)  # a run resumes on any world size
    return d
