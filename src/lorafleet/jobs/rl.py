"""`lorafleet rl`: several policies (adapters), each with its own prompts and reward function,
trained at once on one base (the GRPO family).

Each global step samples ``group_size`` completions for ``batch_size`` prompts of every active
adapter in shared decode batches, scores every completion with that adapter's reward function
``module:function(prompt, completion, row) -> float``, turns rewards into group-normalized
advantages (optionally minus ``kl_coef`` × the per-token log-ratio to the base model, computed in
one shared forward), and trains all adapters in shared mixed steps with their loss
(``importance_sampling``, ``ppo`` or ``cispo``). Outputs, progress, checkpoints and ``--resume``
are the train job's; sampling seeds derive from the global step, so a resumed run is exact.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..data.datasets import DatasetError, read_jsonl
from ..utils.values import coerce_fields, read_number
from ..engine.sampling import SampleRequest, SamplingParams
from ..types import Example
from .config import AdapterJob, ConfigError, RLConfig, _positive, load_config
from .outputs import plot_run
from .rollout_async import AsyncRolloutSteps
from .rollout_step import EngineRollouts, EngineRolloutSteps
from .train import TrainJob, _config_dict


@dataclass
class RLAdapterJob(AdapterJob):
    reward: str = ""  # "module:function"; module importable or a .py path relative to the YAML
    group_size: int = 4
    loss: str = "importance_sampling"
    loss_config: dict = field(default_factory=dict)
    kl_coef: float = 0.0
    sampling: dict = field(default_factory=dict)  # SamplingParams fields (max_tokens, temperature, ...)

    LOSSES = ("importance_sampling", "ppo", "cispo")

    def validate(self, aw: str) -> None:
        super().validate(aw)
        if not isinstance(self.reward, str) or ":" not in self.reward:
            raise ConfigError(f"{aw}: reward must be 'module:function', got {self.reward!r}")
        _positive(self.group_size, f"{aw}: group_size")
        if self.group_size < 2:
            raise ConfigError(f"{aw}: group_size must be >= 2 (advantages are relative to the group)")
        if not (isinstance(self.kl_coef, (int, float)) and self.kl_coef >= 0):
            raise ConfigError(f"{aw}: kl_coef must be a number >= 0")
        try:  # the mappings' numbers as people write them, kept read (the runner uses these dicts)
            self.sampling = coerce_fields(SamplingParams, self.sampling, "sampling")
            # a clip bound may be inf (no bound), never nan
            self.loss_config = {k: read_number(v, float, f"loss_config.{k}", finite=False)
                                for k, v in self.loss_config.items()}
        except ValueError as e:
            raise ConfigError(f"{aw}: {e}") from None
        try:
            self.sampling_params(0)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{aw}: sampling: {e}") from None
        from ..engine.losses import resolve_config

        try:
            resolve_config(self.loss, self.loss_config)
        except ValueError as e:
            raise ConfigError(f"{aw}: {e}") from None

    def sampling_params(self, seed: int) -> SamplingParams:
        return SamplingParams(**{"max_tokens": 16, **self.sampling, "seed": seed})


def load_rl_config(path):
    return load_config(path, RLAdapterJob, RLConfig)


def load_reward(spec: str, base_dir: Path):
    """``module:function`` (importable, or ``path/to/file.py:function`` relative to the YAML)."""
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = (base_dir / mod_name).resolve()
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            if spec_ is None or not path.is_file():
                raise ImportError(f"no file {path}")
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            sys.path.insert(0, str(base_dir))
            try:
                module = importlib.import_module(mod_name)
            finally:
                sys.path.remove(str(base_dir))
        fn = getattr(module, fn_name)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise ConfigError(f"reward {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ConfigError(f"reward {spec!r} is not callable")
    return fn


class RLJob(AsyncRolloutSteps, EngineRolloutSteps, TrainJob):
    rollouts: EngineRollouts | None = None  # with a `rollout:` engine, once the first step starts

    def __init__(self, cfg, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        # the engine is not part of the resume hash (a run may resume on a restarted server or
        # another engine), so a config without `rollout:` hashes as it did before the block existed
        d = _config_dict(cfg)
        d.pop("rollout", None)
        self.config_hash = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def engine_spec(self) -> dict | None:
        return getattr(self.cfg, "rollout", None)

    def run(self) -> dict:
        try:
            return super().run()
        finally:  # the rollout worker is joined on every exit path, before its engine closes
            self._stop_async()
            if self.rollouts is not None:
                self.rollouts.close()
                self.rollouts = None

    def _load_data(self, tok):
        self.train_sets, self.eval_sets, self.data_stats, self.rewards = {}, {}, {}, {}
        self.reward_errors: dict[str, int] = {}
        self._step_metrics: dict[str, dict] = {}
        base_dir = Path(self.cfg.source).parent if self.cfg.source else Path.cwd()
        for a in self.cfg.adapters:
            rows = read_jsonl(self.cfg.resolve(a.data), check_format=False)
            prompts = []
            for row in rows:
                if not isinstance(row.get("prompt"), str) or not row["prompt"]:
                    raise DatasetError(f"{row.where}: an RL prompt row needs a non-empty string 'prompt'")
                ids = tok.encode(row["prompt"], add_special_tokens=False)
                if tok.bos_token_id is not None:
                    ids = [tok.bos_token_id] + ids
                prompts.append((ids[: self.cfg.max_length], row))
            self.train_sets[a.name], self.eval_sets[a.name] = prompts, []
            self.data_stats[a.name] = {"examples": len(prompts), "truncated": 0, "skipped": 0}
            self.rewards[a.name] = load_reward(a.reward, base_dir)

    def _shared_step(self):
        names = sorted(self.active, key=lambda n: self.active[n].slot)
        tok = self.tokenizer
        self.fleet.tokenizer = tok
        if self.engine_spec is None:
            groups = {n: self.cursors[n].next_batch(self.jobs[n].batch_size) for n in names}
            samples = self._sample(names, groups)
        elif self.engine_spec["async"]:
            groups, samples = self._async_rollout(names)
        else:
            groups, samples = self._engine_rollout(names)
        # versions behind the weights this step trains (async only: 0 by construction otherwise)
        stale = ({n: self.fleet.adapter_version(n) - v for n, v in self.async_info["versions"].items()}
                 if self.engine_spec is not None and self.engine_spec["async"] else None)
        per = {n: {"rewards": [], "lengths": [], "dropped": 0} for n in names}
        examples: dict[tuple, list[Example]] = {}
        for n in names:
            a = self.jobs[n]
            for (prompt_ids, row), outs in zip(groups[n], samples[n]):
                prompt_text = tok.decode(prompt_ids, skip_special_tokens=True)
                scored = []
                for s in outs:
                    r = self._score(n, prompt_text, s, row)
                    if r is None:
                        per[n]["dropped"] += 1
                        continue
                    scored.append((s, r))
                    per[n]["rewards"].append(r)
                    per[n]["lengths"].append(len(s.tokens))
                for s, adv in _group_advantages(scored):
                    toks = prompt_ids + s.tokens
                    P = len(prompt_ids) - 1  # positions predicting prompt tokens
                    ex = Example(n, toks[:-1], toks[1:], weights=[0.0] * P + [1.0] * len(s.tokens),
                                 logprobs=[0.0] * P + s.logprobs, advantages=[0.0] * P + [adv] * len(s.tokens))
                    examples.setdefault((a.loss, tuple(sorted(a.loss_config.items()))), []).append(ex)
        kl = self._kl_penalty(examples)
        t0 = time.perf_counter()
        ent = {n: [] for n in names}
        gap = {n: [] for n in names}  # sample - train logprob of each trained completion token
        for (loss, cfg), exs in examples.items():
            res = self.fleet.forward_backward(exs, loss_fn=loss, loss_fn_config=dict(cfg))
            for e, h in zip(exs, res.entropy):
                ent[e.adapter] += [x for x, w in zip(h, e.weights) if w > 0]
            if self.engine_spec is not None:
                for e, lps in zip(exs, res.logprobs):
                    gap[e.adapter] += [s - t for s, t, w in zip(e.logprobs, lps, e.weights) if w > 0]
        tokens = {n: sum(len(p) for p, _ in groups[n]) * self.jobs[n].group_size + sum(per[n]["lengths"])
                  for n in names}
        stepped = self._end_micro_step(names, tokens, t0)
        for n in names:
            rw = per[n]["rewards"]
            m = {"completion_tokens": sum(per[n]["lengths"]) / max(len(per[n]["lengths"]), 1),
                 "trained_tokens": len(ent[n]), "dropped": per[n]["dropped"],
                 "reward_errors": self.reward_errors.get(n, 0)}
            # metrics that were not measured this step are left out, not logged as 0
            if rw:
                m["reward"] = sum(rw) / len(rw)
            if ent[n]:  # entropy of the trained (non-flat-group) completion tokens
                m["entropy"] = sum(ent[n]) / len(ent[n])
            if n in kl:
                m["kl"] = kl[n]
            if stale is not None:  # the overlap: time the trainer / the rollout worker waited
                m.update(staleness=stale[n], rollout_wait_s=self.async_info["rollout_wait_s"],
                         rollout_idle_s=self.async_info["rollout_idle_s"])
            if gap[n]:  # tinker-cookbook's optim/kl_sample_train_v1 and _v2
                m["kl_sample_train"] = sum(gap[n]) / len(gap[n])
                m["kl_sample_train_v2"] = 0.5 * sum(d * d for d in gap[n]) / len(gap[n])
            self._step_metrics[n] = m
        for n, om in stepped.items():
            self._after_optim_step(n, om)

    def _after_optim_step(self, name, om):
        run = self.active[name]
        run.step += 1
        m = self._step_metrics.get(name, {})
        rec = {"step": run.step, "global_step": self.global_step, **m, "lr": om["lr"],
               "grad_norm": om["grad_norm"], "tokens": run.tokens,
               "tokens_per_s": run.tokens / max(run.elapsed, 1e-9)}
        self.logs[name].log(rec)
        self.progress.update(name, run.step, run.total_steps, m.get("reward", float("nan")), rec["tokens_per_s"],
                             label="reward")
        a = self.jobs[name]
        done = run.step >= run.total_steps
        if a.save_every and run.step % a.save_every == 0 and not done:
            self.fleet.save_adapter(name, self.run_dir / name / f"step-{run.step:06d}")
        if done:
            self._finish(name)

    def _sample(self, names, groups):
        """All adapters' groups in shared decode batches (one batch per distinct sampling setup)."""
        by_params: dict[tuple, list] = {}
        for n in names:
            key = json.dumps(self.jobs[n].sampling, sort_keys=True)
            for i, (prompt_ids, _row) in enumerate(groups[n]):
                by_params.setdefault(key, []).append((n, i, SampleRequest(n, prompt_ids, self.jobs[n].group_size)))
        out = {n: [None] * len(groups[n]) for n in names}
        for key, items in by_params.items():
            params = self.jobs[items[0][0]].sampling_params(seed=self.cfg.seed * 100_003 + self.global_step)
            results = self.fleet.sample([r for _, _, r in items], params)
            for (n, i, _), res in zip(items, results):
                out[n][i] = res
        return out

    def _score(self, name, prompt_text, sample, row):
        """The reward, or None (sample dropped) when the function raises or returns a non-number;
        the first error of each adapter is reported with its traceback."""
        try:
            r = self.rewards[name](prompt_text, sample.text, row)
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise TypeError(f"reward returned {r!r}, not a finite number")
            return float(r)
        except Exception:  # noqa: BLE001 - user code: count, report once, keep training
            self.reward_errors[name] = self.reward_errors.get(name, 0) + 1
            if self.reward_errors[name] == 1:
                self.log(f"[{name}] reward function {self.jobs[name].reward} failed; the sample is dropped "
                         f"(further errors are only counted):\n{traceback.format_exc()}")
            return None

    def _kl_penalty(self, examples) -> dict[str, float]:
        """Subtract kl_coef × (logprob − base logprob) from each completion token's advantage;
        returns each adapter's mean per-token log-ratio (the k1 KL estimate)."""
        wanted = [e for exs in examples.values() for e in exs if self.jobs[e.adapter].kl_coef > 0]
        kl: dict[str, list[float]] = {}
        if wanted:
            base = self.fleet.forward_backward([Example(None, e.input_tokens, e.target_tokens) for e in wanted],
                                               forward_only=True)
            for e, ref in zip(wanted, base.logprobs):
                c = self.jobs[e.adapter].kl_coef
                for t, w in enumerate(e.weights):
                    if w > 0:
                        d = e.logprobs[t] - ref[t]
                        e.advantages[t] -= c * d
                        kl.setdefault(e.adapter, []).append(d)
        return {n: sum(v) / len(v) for n, v in kl.items()}

    def _extra_state(self) -> dict:
        return {"reward_errors": self.reward_errors}  # counted over the whole run, resumed with it

    def _restore(self, state):
        super()._restore(state)
        self.reward_errors = dict(state.get("reward_errors", {}))

    def _summary(self, seconds):
        png = self.run_dir / "reward_curves.png"
        if self.writes:  # rank 0 only under torchrun
            png = plot_run(self.run_dir, png)
        summary = {"run_dir": str(self.run_dir), "base": self.base_name, "seconds": round(seconds, 1),
                   "adapters": self.finished, "reward_curves": str(png),
                   "reward_errors": self.reward_errors}
        if self.async_totals:  # the overlap over the run (this process's steps)
            summary["async"] = {k: round(v, 3) for k, v in self.async_totals.items()}
        self._write_summary(summary)
        return summary

    def _report(self, summary: dict) -> None:
        self.log(f"reward curves: {summary['reward_curves']}")


def _group_advantages(scored):
    """(sample, reward) of one prompt's group -> (sample, advantage) with advantage
    (r − mean) / (std + 1e-6); a group whose rewards are all equal teaches nothing and is skipped."""
    if len(scored) < 2:
        return []
    rs = [r for _, r in scored]
    mean = sum(rs) / len(rs)
    std = math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs))
    if std < 1e-9:
        return []
    return [(s, (r - mean) / (std + 1e-6)) for s, r in scored]
