"""Asynchronous rollouts (``rollout: {async: true, max_staleness: S}``): one worker thread owns
the engine and samples the next steps' groups while the trainer trains this one.

The schedule is fixed, so runs are reproducible: at global step g the trainer takes the batch of
step g (sampled earlier), then snapshots the weights it is about to train (version g) and hands
the worker the job of step g+S — push that snapshot, then sample step g+S's prompts (drawn by the
trainer now, in the sync path's order, with step g+S's seed). So step g+S trains on samples of
exactly S versions back, and at most S jobs are in flight (the worker waits when it is ahead). The
first step of a run, and the first after a resume or after the adapter set changed, is
synchronous and queues the next S steps with its own version (staleness 1..S then).

Every engine call (push and generate) runs on the worker, in job order: the version each batch
sees depends on the schedule only, never on timing. A job that fails is reported when the trainer
takes its batch; the trainer then stops the worker, rewinds the cursors to before the first job
in flight, and saves the same resumable checkpoint as the sync path.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field


@dataclass
class RolloutJob:
    step: int  # the global step that trains on this batch
    names: list[str]
    groups: dict  # adapter -> [(prompt_ids, row)] drawn by the trainer
    cursors_before: dict  # adapter -> its cursor's state before these groups were drawn
    params: dict  # adapter -> SamplingParams (the step's seed)
    group_size: dict
    snaps: list = field(default_factory=list)  # snapshots to push before sampling
    samples: dict | None = None
    versions: dict | None = None  # adapter -> the version its groups were sampled with
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    rollout_idle_s: float = 0.0  # how long the worker waited for this job


class AsyncRollouts:
    """The worker thread and its jobs, in order. `submit` never blocks (the trainer submits at
    most S ahead by construction); `take` blocks until the job of a step is done."""

    def __init__(self, rollouts, max_staleness: int):
        self.rollouts, self.max_staleness = rollouts, max_staleness
        self.pending: list[RolloutJob] = []  # submitted, not taken yet, oldest first
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="lorafleet-rollouts", daemon=True)
        self._thread.start()

    def submit(self, job: RolloutJob) -> None:
        if len(self.pending) >= self.max_staleness:  # a scheduling bug, never a user error
            raise RuntimeError(f"{len(self.pending)} rollout jobs in flight, max_staleness {self.max_staleness}")
        self.pending.append(job)
        self._jobs.put(job)

    def take(self, step: int) -> tuple[RolloutJob, float]:
        """The job of ``step`` (it must be the oldest) once done, and how long the trainer waited."""
        job = self.pending[0]
        if job.step != step:
            raise RuntimeError(f"rollout job of step {job.step} is next, the trainer is at step {step}")
        t0 = time.perf_counter()
        job.done.wait()
        self.pending.pop(0)
        return job, time.perf_counter() - t0

    def close(self) -> None:
        """Stop the worker after the job it is running (if any) and join it: the thread never
        outlives the job. Jobs not started are dropped."""
        for job in self.pending:
            job.error = job.error or RuntimeError("dropped")
        self._jobs.put(None)
        self._thread.join()

    def _work(self) -> None:
        stopped = False
        while True:
            t0 = time.perf_counter()
            job = self._jobs.get()
            if job is None:
                return
            job.rollout_idle_s = time.perf_counter() - t0
            if stopped or job.error is not None:  # after a failure, later jobs are not run
                job.done.set()
                continue
            try:
                self.rollouts.push_snapshots(job.snaps)
                job.samples, job.versions = {}, {}
                for n in job.names:
                    job.samples[n], job.versions[n] = self.rollouts.generate(
                        n, [p for p, _ in job.groups[n]], job.params[n], job.group_size[n])
            except BaseException as e:  # noqa: BLE001 - handed to the trainer, which stops the job
                job.error, stopped = e, True
            job.done.set()


class AsyncRolloutSteps:
    """The RL job's side of asynchronous rollouts (mixed into jobs.rl.RLJob before
    EngineRolloutSteps): which batch each step trains on, the checkpoints' cursors, the stop."""

    _async: AsyncRollouts | None = None
    async_info: dict | None = None  # the last step's: versions sampled, trainer wait, rollout idle
    async_totals: dict | None = None  # the waits summed over the run (in summary.json)

    def _async_rollout(self, names):
        """Step ``global_step``'s groups and samples: from the worker, or synchronously when
        nothing is queued (first step, resume, adapter set changed); then the job S steps ahead."""
        from .rollout_step import RolloutFailed

        g, S = self.global_step, self.engine_spec["max_staleness"]
        if self._async is not None and self._async.pending and self._async.pending[0].names != names:
            self._stop_async()  # an adapter joined: its rollouts start with the next synchronous step
        if self._async is None or not self._async.pending:
            self._stop_async()
            groups, samples = self._engine_rollout(names)
            versions, waited, idle = dict(self._sampled_versions), 0.0, 0.0
            self._async = AsyncRollouts(self.rollouts, S)
            for k in range(1, S + 1):  # the version just pushed samples the next S steps
                self._submit(g + k, k, snaps=False)
        else:
            job, waited = self._async.take(g)
            if job.error is not None:
                self._async.pending.insert(0, job)  # its cursors are rewound with the others'
                self._stop_async()
                if isinstance(job.error, RolloutFailed):
                    raise RolloutFailed(f"{job.error}; {self._save_for_resume()}") from None
                raise job.error
            groups, samples, versions, idle = job.groups, job.samples, job.versions, job.rollout_idle_s
            self._submit(g + S, S, snaps=True)
        self.async_info = {"versions": versions, "rollout_wait_s": waited, "rollout_idle_s": idle}
        if self.async_totals is None:
            self.async_totals = {"rollout_wait_s": 0.0, "rollout_idle_s": 0.0}
        self.async_totals["rollout_wait_s"] += waited
        self.async_totals["rollout_idle_s"] += idle
        return groups, samples

    def _submit(self, step: int, ahead: int, snaps: bool) -> None:
        """Draw step ``step``'s prompts now (the sync path's order) and queue its rollout, after
        a push of the current weights when ``snaps``."""
        names = [n for n in sorted(self.active, key=lambda n: self.active[n].slot) if self._active_in(n, ahead)]
        if not names:
            return
        before = {n: self.cursors[n].state_dict() for n in names}
        groups = {n: self.cursors[n].next_batch(self.jobs[n].batch_size) for n in names}
        seed = self.cfg.seed * 100_003 + step
        self._async.submit(RolloutJob(
            step, names, groups, before, params={n: self.jobs[n].sampling_params(seed) for n in names},
            group_size={n: self.jobs[n].group_size for n in names},
            snaps=self.rollouts.snapshots(names) if snaps else []))

    def _active_in(self, name: str, ahead: int) -> bool:
        """Whether ``name`` still trains ``ahead`` global steps from now (one micro-batch a step)."""
        run, accum = self.active[name], self.jobs[name].grad_accum
        return run.step + (run.micro % accum + ahead) // accum < run.total_steps

    def _rewind_cursors(self) -> None:
        """Every cursor back to before the first queued job that drew from it."""
        for job in reversed(self._async.pending if self._async else []):
            for n, st in job.cursors_before.items():
                if n in self.cursors:
                    self.cursors[n].load_state_dict(st)

    def _stop_async(self) -> None:
        """Join the worker (after its current job) and give back the prompts of the jobs it had."""
        if self._async is None:
            return
        self._rewind_cursors()
        a, self._async = self._async, None
        a.close()

    def checkpoint(self):
        """A checkpoint between steps saves the cursors as if no job were queued, so a resume
        draws the queued steps' prompts again (its first step is synchronous)."""
        if self._async is None or not self._async.pending:
            return super().checkpoint()
        now = {n: c.state_dict() for n, c in self.cursors.items()}
        self._rewind_cursors()
        try:
            return super().checkpoint()
        finally:
            for n, st in now.items():
                self.cursors[n].load_state_dict(st)
