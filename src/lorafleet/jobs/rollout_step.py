"""`lorafleet rl` with a rollout engine (``rollout:`` in the YAML): the adapters go into a vLLM /
SGLang engine and the completions come back from it, with the engine's own logprobs.

`EngineRollouts` keeps, per adapter, the version last pushed: before every rollout each adapter
whose version changed (a new one, or one an optimizer step moved) is pushed, so the engine always
samples the policy the trainer has. A push or a generate that fails is tried again
``retries`` times (waits of ``retry_wait_s``, doubling); then `RolloutFailed` (a ValueError: the
CLI prints it as one line) names the engine's last answer, and the RL job saves a checkpoint
before raising it. In asynchronous mode (`async: true`, jobs/rollout_async.py) the pushes and
generates run on a worker thread, and pushes use versioned names (``max_versions`` >= S+1).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..engine.sampling import SampledSequence, SamplingParams
from ..utils.atomic import atomic_dir
from ..utils.values import one_line as _one_line
from .config import ROLLOUT_JOB_KEYS, ConfigError

ROLLOUT_BASE_DIR = "rollout_base"  # a built-in base, saved for the engine inside the run dir


class RolloutFailed(ValueError):
    """The engine still failed after the retries; the message is the one line the CLI prints."""


def rollout_base_dir(cfg, run_dir: Path, log) -> Path:
    """The Hugging Face directory the engine loads the base from: ``base.path`` itself, or, for a
    built-in base, its weights and tokenizer saved (atomically) under ``run_dir/rollout_base``.
    The built-in base is loaded once more for that (a clean copy: the trainer's has the LoRA
    layers attached in place); it is cached, so this costs a second or so."""
    if cfg.base.path is not None:
        return Path(cfg.base.path)
    from ..data.tokenizer import save_tokenizer
    from .base_model import load_base

    out = run_dir / ROLLOUT_BASE_DIR
    model, tok, name = load_base(cfg.base, log=log)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tok, tmp)
    log(f"rollout: built-in base {name} saved for the engine in {out}")
    return out


def snapshot_layout(engine_kind: str) -> str:
    return "sglang" if engine_kind == "sglang" else "peft"


class EngineRollouts:
    """Pushes and samples through one rollout engine for an RL job."""

    def __init__(self, fleet, engine, spec: dict, tokenizer, log=print, sleep=time.sleep):
        self.fleet, self.engine, self.spec, self.tokenizer = fleet, engine, spec, tokenizer
        self.log, self.sleep = log, sleep
        self.layout = snapshot_layout(spec["engine"])
        self.pushed: dict[str, int] = {}  # adapter -> version last pushed
        self.engine_names: dict[str, str] = {}  # adapter -> the name to sample it with
        self.pushes = 0  # how many snapshots went to the engine (a metric, and what tests count)

    @property
    def where(self) -> str:
        return f"rollout engine {self.spec['engine']}" + (f" at {self.spec['url']}" if self.spec.get("url") else "")

    def sync(self, names) -> list[str]:
        """Push every adapter of ``names`` whose version differs from the one last pushed;
        returns the adapters pushed."""
        snaps = self.snapshots(names)
        self.push_snapshots(snaps)
        return [s.name for s in snaps]

    def snapshots(self, names) -> list:
        """Snapshots (copies) of the adapters of ``names`` whose version differs from the one
        last pushed (taken by the trainer, between steps)."""
        return [self.fleet.snapshot(n, layout=self.layout) for n in names
                if not (self.pushed.get(n) == self.fleet.adapter_version(n) and n in self.engine_names)]

    def push_snapshots(self, snaps) -> None:
        """Push snapshots into the engine (with retries); the asynchronous worker calls this."""
        for snap in snaps:
            self.engine_names[snap.name] = self._retry(f"push of adapter {snap.name!r} (version {snap.version})",
                                                       lambda: self.engine.push(snap))
            self.pushed[snap.name] = snap.version
            self.pushes += 1

    def generate(self, name: str, prompts: list[list[int]], params: SamplingParams, n: int
                 ) -> tuple[list[list[SampledSequence]], int]:
        """``n`` completions per prompt from the engine for adapter ``name`` (text filled in, each
        checked), and the adapter version they were sampled with."""
        adapter, version = self.engine_names[name], self.pushed[name]
        out = self._retry(f"generate for adapter {name!r}",
                          lambda: self._checked(self.engine.generate(adapter, prompts, params, n), len(prompts), n))
        return out, version

    def _checked(self, out, n_prompts, n):
        """The engine's answer as SampledSequences with text; a malformed one is an error like a
        failed request (retried), never a silent bad training example."""
        from ..rollout import RolloutError

        if not isinstance(out, list) or len(out) != n_prompts or any(
                not isinstance(g, list) or len(g) != n for g in out):
            raise RolloutError(f"the engine returned {len(out) if isinstance(out, list) else out!r} groups "
                               f"for {n_prompts} prompts of {n} samples")
        for group in out:
            for s in group:
                if len(s.logprobs) != len(s.tokens) or any(lp is None for lp in s.logprobs):
                    raise RolloutError(f"the engine returned {len(s.tokens)} tokens with "
                                       f"{len(s.logprobs)} logprobs (sampling logprobs are needed)")
                if s.text is None:
                    s.text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
        return out

    def _retry(self, what: str, fn):
        from ..rollout import RolloutError, RolloutRefused

        tries = self.spec["retries"] + 1
        for attempt in range(tries):
            try:
                return fn()
            except RolloutRefused as e:  # no retry can change it: stop now, with the engine's answer
                raise RolloutFailed(f"{self.where}: {what} refused: {_one_line(e)}") from None
            except (RolloutError, OSError) as e:  # OSError: a connection refused / reset / timed out
                last = e
                if attempt + 1 < tries:
                    wait = self.spec["retry_wait_s"] * 2 ** attempt
                    self.log(f"{self.where}: {what} failed ({_one_line(e)}); try {attempt + 2} of {tries} "
                             f"in {wait:g} s")
                    self.sleep(wait)
        raise RolloutFailed(f"{self.where}: {what} failed {tries} time(s): {_one_line(last)}")

    def close(self):
        self.engine.close()


def make_job_engine(spec: dict, base_dir: Path, max_rank: int):
    """The engine of a ``rollout:`` spec (its own options passed through to make_engine)."""
    from ..rollout import make_engine

    engine_spec = {k: v for k, v in spec.items() if k not in ROLLOUT_JOB_KEYS or k in ("engine", "url")}
    engine_spec = {k: v for k, v in engine_spec.items() if v is not None}
    return make_engine(engine_spec, base_dir=str(base_dir), max_rank=max_rank)


class EngineRolloutSteps:
    """The RL job's side of a rollout engine (mixed into jobs.rl.RLJob): one step's rollout, the
    engine's start, and the checkpoint a failure leaves."""

    def _engine_rollout(self, names):
        """Push what changed, draw every adapter's prompts and sample them through the engine.
        A failure (after the retries) leaves the cursors where they were, saves a checkpoint of
        the whole state (every step before this one) and stops the job with one line."""
        before = {n: self.cursors[n].state_dict() for n in names}
        try:
            if self.rollouts is None:
                self.rollouts = self._start_engine()
            self.rollouts.sync(names)
            groups = {n: self.cursors[n].next_batch(self.jobs[n].batch_size) for n in names}
            samples, self._sampled_versions = {}, {}
            seed = self.cfg.seed * 100_003 + self.global_step
            for n in names:
                a = self.jobs[n]
                samples[n], self._sampled_versions[n] = self.rollouts.generate(n, [p for p, _ in groups[n]], a.sampling_params(seed),
                                                              a.group_size)
            return groups, samples
        except RolloutFailed as e:
            for n, st in before.items():
                self.cursors[n].load_state_dict(st)
            raise RolloutFailed(f"{e}; {self._save_for_resume()}") from None

    def _start_engine(self) -> EngineRollouts:
        from ..rollout import RolloutError

        spec = self.engine_spec
        base_dir = rollout_base_dir(self.cfg, self.run_dir, self.log)
        try:
            engine = make_job_engine(spec, base_dir, self.cfg.max_rank)
        except (RolloutError, OSError) as e:
            raise RolloutFailed(f"rollout engine {spec['engine']}: could not start: {' '.join(str(e).split())}") from None
        except ValueError as e:  # the engine's own options
            raise ConfigError(f"{self.cfg.source or 'config'}: rollout: {e}") from None
        self.log(f"rollout: sampling through {spec['engine']}" + (f" at {spec['url']}" if spec.get("url") else ""))
        return EngineRollouts(self.fleet, engine, spec, self.tokenizer, log=self.log)

    def _save_for_resume(self) -> str:
        """A checkpoint of the state as it is (whole between steps), and what to say about it."""
        if self.global_step == 0 and self.last_checkpoint is None:
            return "nothing was trained yet"
        if self.last_checkpoint != self.global_step:
            self.checkpoint()
        return f"checkpoint saved at global step {self.global_step}; resume with --resume"
