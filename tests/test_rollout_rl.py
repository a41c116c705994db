"""`lorafleet rl` with a `rollout:` engine: the block's validation, and that a config without it
keeps today's resume hash (the built-in sampler stays the default, unchanged)."""

import hashlib
import json

import pytest
import yaml

from lorafleet.jobs.config import ConfigError, load_config
from lorafleet.jobs.rl import RLAdapterJob, RLJob, load_rl_config
from lorafleet.jobs.train import _config_dict

from test_rl import rl_yaml


def _with(tmp_path, rollout):
    c = yaml.safe_load(rl_yaml(tmp_path).read_text())
    c["rollout"] = rollout
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(c))
    return tmp_path / "rl.yaml"


@pytest.mark.parametrize("rollout,message", [
    ({"engine": "tgi", "url": "http://x"}, r"rollout\.engine: must be one of"),
    ({"engine": "vllm"}, r"rollout\.url: engine vllm needs the server's url"),
    ({"engine": "vllm", "url": "localhost:8000"}, r"rollout\.url: engine vllm needs"),
    ({"engine": "vllm-local", "url": "http://x"}, r"rollout\.url: engine vllm-local .* takes no url"),
    ({"engine": "vllm", "url": "http://x", "retries": -1}, r"rollout\.retries must be an integer >= 0"),
    ({"engine": "vllm", "url": "http://x", "async": "yes"}, r"rollout\.async: expected true or false"),
    ({"engine": "vllm", "url": "http://x", "max_staleness": 2}, r"rollout\.max_staleness: only meaningful"),
    ({"engine": "vllm", "url": "http://x", "async": True, "max_staleness": 0},
     r"rollout\.max_staleness must be an integer >= 1"),
    ({"engine": "vllm", "url": "http://x", "async": True, "max_staleness": 2, "max_versions": 2},
     r"rollout\.max_versions: async rollouts with max_staleness 2 need max_versions >= 3"),
    ("vllm", r"rollout: expected a mapping"),
])
def test_bad_rollout_block_is_one_line_naming_the_field(tmp_path, rollout, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_rl_config(_with(tmp_path, rollout))
    assert "\n" not in str(e.value)


def test_rollout_block_defaults_and_train_refuses_it(tmp_path):
    cfg = load_rl_config(_with(tmp_path, {"engine": "vllm", "url": "http://127.0.0.1:8000/", "retries": "2"}))
    assert cfg.rollout == {"engine": "vllm", "url": "http://127.0.0.1:8000", "async": False, "max_staleness": 1,
                           "retries": 2, "retry_wait_s": 1.0}
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['rollout'\]"):
        load_config(tmp_path / "rl.yaml", RLAdapterJob)  # `lorafleet train`'s reading


def test_no_rollout_block_keeps_the_resume_hash(tmp_path):
    """Checkpoints of runs from before the block existed still resume: the hash is the old one."""
    cfg = load_rl_config(rl_yaml(tmp_path))
    assert cfg.rollout is None
    old = _config_dict(load_config(rl_yaml(tmp_path), RLAdapterJob))
    assert "rollout" not in old
    want = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert RLJob(cfg, progress=False, log=lambda *a: None).config_hash == want
    with_engine = load_rl_config(_with(tmp_path, {"engine": "vllm", "url": "http://x"}))
    assert RLJob(with_engine, progress=False, log=lambda *a: None).config_hash == want


# ---- the engine path, with an in-process fake engine wrapping the trainer's own sampler, behind
# the real lorafleet.rollout (make_engine patched) and the fleet's real snapshots and versions.
import sys
import types

import lorafleet.rollout as rollout
from lorafleet.engine import Fleet
from lorafleet.engine.sampling import SampledSequence, SampleRequest


class FakeEngine:
    """Samples with the trainer's fleet; logprobs shifted by OFFSET so they are visibly its own."""
    OFFSET = -0.01

    def __init__(self, fail_generate_from=None):
        self.fleet, self.pushed, self.generated, self.fail_from = None, [], 0, fail_generate_from
        self.refuse_push = None

    def push(self, snap):
        self.pushed.append((snap.name, snap.version))
        if self.refuse_push:
            raise rollout.RolloutRefused(self.refuse_push)
        return snap.name

    def generate(self, adapter, prompts, params, n):
        self.generated += 1
        if self.fail_from is not None and self.generated >= self.fail_from:
            raise rollout.RolloutError("HTTP 500 {'error': 'engine is down'}")
        res = self.fleet.sample([SampleRequest(adapter, p, n) for p in prompts], params)
        return [[SampledSequence(s.tokens, [lp + self.OFFSET for lp in s.logprobs], s.stop_reason, None)
                 for s in g] for g in res]

    def close(self):
        pass


@pytest.fixture
def fake_rollout(monkeypatch):
    engine = FakeEngine()

    def make_engine(spec, *, base_dir, max_rank):
        assert (base_dir and max_rank == 8)
        return engine

    monkeypatch.setattr(rollout, "make_engine", make_engine)
    real_rollouts = RLJob._start_engine

    def start(self):
        engine.fleet = self.fleet
        self.fleet.tokenizer = self.tokenizer
        return real_rollouts(self)

    monkeypatch.setattr(RLJob, "_start_engine", start)
    return engine


def test_engine_pushes_each_step_and_its_logprobs_are_the_behaviour_policy(tmp_path, fake_rollout):
    cfg = load_rl_config(_with(tmp_path, {"engine": "vllm", "url": "http://fake"}))
    RLJob(cfg, progress=False, log=lambda *a: None).run()
    # pushed before the first rollout (version 0), then after each of its 4 optimizer steps but the last
    for n in ("up", "ppo"):
        assert [v for a, v in fake_rollout.pushed if a == n] == [0, 1, 2, 3]
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "up" / "metrics.jsonl").read_text().splitlines()[1:]]
    gaps = [r["kl_sample_train"] for r in recs if "kl_sample_train" in r]
    # the train forward recomputes the fleet's own logprobs: the gap is exactly the engine's offset
    assert gaps and all(abs(g - FakeEngine.OFFSET) < 1e-4 for g in gaps)


def test_engine_failure_stops_with_a_resumable_checkpoint(tmp_path, fake_rollout):
    fake_rollout.fail_from = 5  # steps 0 and 1 sample (2 adapters each), step 2 fails
    c = yaml.safe_load(_with(tmp_path, {"engine": "vllm", "url": "http://fake", "retries": 1,
                                        "retry_wait_s": 0}).read_text())
    c["checkpoint_every"] = 0
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(c))
    cfg = load_rl_config(tmp_path / "rl.yaml")
    with pytest.raises(ValueError, match=r"generate for adapter 'up' failed 2 time\(s\): HTTP 500 .*engine is "
                                         r"down.*checkpoint saved at global step 2; resume with --resume") as e:
        RLJob(cfg, progress=False, log=lambda *a: None).run()
    assert "\n" not in str(e.value)
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "job.json").is_file()
    fake_rollout.fail_from = None
    summary = RLJob(load_rl_config(tmp_path / "rl.yaml"), resume=True, progress=False, log=lambda *a: None).run()
    assert sorted(summary["adapters"]) == ["ppo", "up"]


def test_a_refused_push_stops_at_once_without_retries(tmp_path, fake_rollout):
    """A refusal no retry can change (rank above the engine's limit, no LoRA) stops the job at its
    first push with the engine's answer instead of retrying it."""
    fake_rollout.refuse_push = "adapter 'up' has rank 8, above the engine's --max-lora-rank 4"
    cfg = load_rl_config(_with(tmp_path, {"engine": "vllm", "url": "http://fake", "retries": 3,
                                          "retry_wait_s": 0}))
    with pytest.raises(ValueError, match=r"push of adapter .* refused: .*above the engine's --max-lora-rank 4"):
        RLJob(cfg, progress=False, log=lambda *a: None).run()
    assert len(fake_rollout.pushed) == 1


def test_no_rollout_block_never_touches_an_engine(tmp_path, monkeypatch):
    """Without `rollout:` the built-in sampler runs as before: no engine module is imported, no
    snapshot is taken, no engine metric is logged, and two runs are bit-identical."""
    poisoned = types.ModuleType("lorafleet.rollout")

    def refuse(*a, **k):
        raise AssertionError("the built-in path reached the rollout engine")

    poisoned.__getattr__ = lambda name: refuse()
    monkeypatch.setitem(sys.modules, "lorafleet.rollout", poisoned)
    monkeypatch.setattr(Fleet, "snapshot", refuse, raising=False)
    runs = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        d.mkdir()
        cfg = load_rl_config(rl_yaml(d))
        RLJob(cfg, progress=False, log=lambda *a: None).run()
        lines = (d / "run" / "up" / "metrics.jsonl").read_text().splitlines()[1:]
        recs = [{k: v for k, v in json.loads(ln).items() if "time" not in k and "per_s" not in k} for ln in lines]
        assert recs and not any("kl_sample_train" in r for r in recs)
        runs.append(recs)
    assert runs[0] == runs[1]
