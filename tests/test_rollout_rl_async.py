"""`lorafleet rl` with `rollout: {async: true, max_staleness: S}`: the rollout of step t+1 runs
while step t trains, each step trains on samples of a fixed, bounded version, the engine's
logprobs stay the behaviour policy, a failing worker stops the job resumably, and async: false is
the sync path unchanged. A fake engine in-process (tests/test_rollout_rl.py's) stands for vLLM."""

import json
import math
import threading
import zlib

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorafleet.rollout as rollout
from lorafleet.engine import Fleet
from lorafleet.engine.sampling import SampledSequence
from lorafleet.jobs.rl import RLJob, load_rl_config
from lorafleet.jobs import rollout_async

from test_rollout_rl import FakeEngine, _with

SEED_STEP = 100_003  # the job's sampling seed is cfg.seed * SEED_STEP + global step


class RecordingEngine(FakeEngine):
    """Records which version each step's generate sampled and the logprobs it returned. Like a
    real engine it never reads the trainer's live weights (which the next step is changing while
    the worker samples): its completions are a function of (seed, adapter, version, prompt)."""

    def __init__(self):
        super().__init__()
        self.version, self.seen, self.returned = {}, [], set()
        self.started = {}  # global step -> threading.Event set when its first generate starts
        self.prompts = {}  # (global step, adapter) -> the prompts of each generate for it

    def push(self, snap):
        name = super().push(snap)
        self.version[snap.name] = snap.version
        return name

    def generate(self, adapter, prompts, params, n):
        step = params.seed % SEED_STEP
        self.started.setdefault(step, threading.Event()).set()
        self.seen.append((step, adapter, self.version[adapter], threading.current_thread().name))
        self.prompts.setdefault((step, adapter), []).append(prompts)
        self.generated += 1
        if self.fail_from is not None and self.generated >= self.fail_from:
            raise rollout.RolloutError("HTTP 500 {'error': 'engine is down'}")
        vocab = len(self.fleet.tokenizer)
        out = []
        for p in prompts:
            key = repr((params.seed, adapter, self.version[adapter], p)).encode()
            g = torch.Generator().manual_seed(zlib.crc32(key))
            toks = torch.randint(3, vocab, (n, params.max_tokens), generator=g).tolist()
            lps = (-math.log(vocab) + 0.1 * torch.rand(n, params.max_tokens, generator=g)).tolist()
            out.append([SampledSequence(t, lp, "length", None) for t, lp in zip(toks, lps)])
        self.returned.update(tuple(s.logprobs) for g in out for s in g)
        return out


@pytest.fixture
def engine(monkeypatch):
    eng = RecordingEngine()
    monkeypatch.setattr(rollout, "make_engine", lambda spec, *, base_dir, max_rank: eng)
    real = RLJob._start_engine

    def start(self):
        eng.fleet = self.fleet
        self.fleet.tokenizer = self.tokenizer
        return real(self)

    monkeypatch.setattr(RLJob, "_start_engine", start)
    return eng


def _cfg(tmp_path, steps=4, **rollout_over):
    c = yaml.safe_load(_with(tmp_path, {"engine": "vllm", "url": "http://fake", "retry_wait_s": 0,
                                        **rollout_over}).read_text())
    for a in c["adapters"]:
        a["max_steps"] = steps
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(c))
    return tmp_path / "rl.yaml"


def _metrics(tmp_path, name="up"):
    lines = (tmp_path / "run" / name / "metrics.jsonl").read_text().splitlines()[1:]
    return [json.loads(ln) for ln in lines]


def _workers():
    return [t for t in threading.enumerate() if t.name == "lorafleet-rollouts"]


@pytest.mark.parametrize("S", [1, 2])
def test_rollouts_overlap_training_with_bounded_fixed_staleness(tmp_path, engine, monkeypatch, S):
    """Step t's optimizer step waits (up to 20 s) for the generate of step t+1 to start: a
    rollout that did not overlap training would never start and the test fails. Each step b
    samples exactly version max(b - S, 0), and trains on the engine's own logprobs."""
    real_step, real_fb = Fleet.optim_step, Fleet.forward_backward
    overlapped, behaviour = [], []

    def optim_step(self, names):
        nxt = self._test_job.global_step + 1
        if nxt < 5:  # every adapter trains 5 steps: step nxt has a rollout
            overlapped.append(engine.started.setdefault(nxt, threading.Event()).wait(20))
        return real_step(self, names)

    def forward_backward(self, examples, **kw):
        for e in examples:
            if e.adapter is not None and not kw.get("forward_only"):
                behaviour.append(tuple(lp for lp, w in zip(e.logprobs, e.weights) if w > 0))
        return real_fb(self, examples, **kw)

    monkeypatch.setattr(Fleet, "optim_step", optim_step)
    monkeypatch.setattr(Fleet, "forward_backward", forward_backward)
    real_shared = RLJob._shared_step

    def shared(self):
        self.fleet._test_job = self
        return real_shared(self)

    monkeypatch.setattr(RLJob, "_shared_step", shared)
    cfg = load_rl_config(_cfg(tmp_path, steps=5, **{"async": True, "max_staleness": S}))
    assert cfg.rollout["max_versions"] == S + 1
    summary = RLJob(cfg, progress=False, log=lambda *a: None).run()
    assert set(summary["async"]) == {"rollout_wait_s", "rollout_idle_s"}
    assert overlapped and all(overlapped)
    assert {(step, v) for step, a, v, _ in engine.seen if a == "up"} == {(b, max(b - S, 0)) for b in range(5)}
    assert {t for step, _, _, t in engine.seen if step > 0} == {"lorafleet-rollouts"}  # the worker samples
    recs = _metrics(tmp_path)
    assert [r["staleness"] for r in recs] == [min(b, S) for b in range(5)]
    assert all(r["rollout_wait_s"] >= 0 and r["rollout_idle_s"] >= 0 for r in recs)
    assert behaviour and all(lp in engine.returned for lp in behaviour)  # the engine's logprobs, unchanged
    assert not _workers()


def test_async_runs_are_reproducible(tmp_path, engine):
    finals = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        d.mkdir()
        RLJob(load_rl_config(_cfg(d, **{"async": True})), progress=False, log=lambda *a: None).run()
        finals.append(load_file(d / "run" / "up" / "final" / "adapter_model.safetensors"))
    assert finals[0].keys() == finals[1].keys()
    assert all((finals[0][k] == finals[1][k]).all() for k in finals[0])


def test_worker_failure_stops_with_the_sync_paths_checkpoint_and_resumes(tmp_path, engine):
    """The job of step 2 fails in the worker: one line, a checkpoint at global step 2 whose
    cursors are those of a synchronous run's (the queued prompts are given back), no thread
    left; the resume's first step is synchronous and the run completes."""
    sync_dir = tmp_path / "sync"
    sync_dir.mkdir()
    RLJob(load_rl_config(_cfg(sync_dir)), progress=False, log=lambda *a: None).run()  # checkpoint_every: 2
    sync_ckpt = json.loads((sync_dir / "run" / "checkpoints" / "step-000002" / "job.json").read_text())

    engine.seen.clear()
    engine.generated, engine.fail_from = 0, 5  # steps 0 and 1 sample (2 adapters each), step 2 fails
    path = _cfg(tmp_path, retries=1, **{"async": True})
    with pytest.raises(ValueError, match=r"generate for adapter 'up' failed 2 time\(s\): HTTP 500 .*engine is "
                                         r"down.*checkpoint saved at global step 2; resume with --resume") as e:
        RLJob(load_rl_config(path), progress=False, log=lambda *a: None).run()
    assert "\n" not in str(e.value)
    assert not _workers()
    ckpt = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "job.json").read_text())
    assert {n: r["cursor"] for n, r in ckpt["active"].items()} == \
        {n: r["cursor"] for n, r in sync_ckpt["active"].items()}
    engine.fail_from = None
    summary = RLJob(load_rl_config(path), resume=True, progress=False, log=lambda *a: None).run()
    assert sorted(summary["adapters"]) == ["ppo", "up"]
    assert [r["staleness"] for r in _metrics(tmp_path) if r["global_step"] > 2] == [0, 1]
    assert not _workers()


def test_async_false_never_starts_a_worker_and_is_reproducible(tmp_path, engine, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("async: false started the rollout worker")

    monkeypatch.setattr(rollout_async.AsyncRollouts, "__init__", refuse)
    finals = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        d.mkdir()
        engine.pushed.clear()
        RLJob(load_rl_config(_cfg(d)), progress=False, log=lambda *a: None).run()
        assert [v for a, v in engine.pushed if a == "up"] == [0, 1, 2, 3]
        assert not any("staleness" in r for r in _metrics(d))
        finals.append(load_file(d / "run" / "up" / "final" / "adapter_model.safetensors"))
    assert all((finals[0][k] == finals[1][k]).all() for k in finals[0])


def test_an_admitted_adapter_makes_the_next_step_synchronous(tmp_path, engine):
    """`up` trains 2 steps, then `late` takes its slot: the job queued for step 2 (ppo only) is
    dropped, its prompts given back and drawn again by a synchronous step 2 that samples both."""
    c = yaml.safe_load(_cfg(tmp_path, **{"async": True}).read_text())
    c["adapters"][0]["max_steps"] = 2
    c["adapters"].append({**c["adapters"][0], "name": "late", "max_steps": 2, "seed": 5})
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(c))
    summary = RLJob(load_rl_config(tmp_path / "rl.yaml"), progress=False, log=lambda *a: None).run()
    assert sorted(summary["adapters"]) == ["late", "ppo", "up"]
    assert [r["staleness"] for r in _metrics(tmp_path, "ppo")] == [0, 1, 0, 1]
    assert [r["staleness"] for r in _metrics(tmp_path, "late")] == [0, 1]
    again = engine.prompts[(2, "ppo")]  # the dropped job's draw (if it ran) and the synchronous one
    assert again and all(p == again[0] for p in again)
    assert [v for step, a, v, _ in engine.seen if a == "ppo" and step == 2][-1] == 2
    assert not _workers()


def test_async_rl_through_real_vllm_rewards_rise(tmp_path, vllm_server):
    """The same run as tests/test_rollout_rl_vllm.py, asynchronous: versioned pushes into the
    session's vLLM server, step b trained on version b-1's samples, and the rewards still rise.
    With ppo: the unclipped importance_sampling of the sync test stalls near 0.6 on one-step-stale
    samples at its lr 0.1 (measured: 0.53 -> 0.62 over 20 steps); ppo's clipped ratios climb to
    ~0.75 by steps 6-11 (measured 0.53 -> 0.74), then drift (a toy base and a large lr)."""
    from test_rollout_rl_vllm import STEPS, rl_config

    cfg = rl_config(tmp_path, vllm_server)
    c = yaml.safe_load((tmp_path / "rl.yaml").read_text())
    c["rollout"].update({"async": True, "max_staleness": 1, "max_loras": vllm_server.max_loras})
    c["adapters"][0]["loss"] = "ppo"  # clipped ratios: the loss made for stale samples
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(c))
    cfg = load_rl_config(tmp_path / "rl.yaml")
    RLJob(cfg, progress=False, log=lambda *a: None).run()
    recs = _metrics(tmp_path)
    assert [r["staleness"] for r in recs] == [0] + [1] * (STEPS - 1)
    rewards = [r["reward"] for r in recs]
    print("async rewards", [round(r, 3) for r in rewards],
          "trainer waited", round(sum(r["rollout_wait_s"] for r in recs), 2), "s",
          "gaps", [round(r.get("kl_sample_train", 0), 4) for r in recs])
    half = rewards[STEPS // 2:]
    assert sum(half) / len(half) > sum(rewards[:3]) / 3 + 0.15, rewards
    assert not _workers()
