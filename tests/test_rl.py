"""`lorafleet rl`: group advantages, per-adapter rewards, bad reward functions, KL penalty,
exact resume."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafleet.jobs.config import ConfigError
from lorafleet.jobs.rl import RLJob, _group_advantages, load_rl_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

REWARDS = '''
calls = {"n": 0}

def upper(prompt, completion, row):
    return sum(c.isupper() for c in completion) / max(len(completion), 1)

def flaky(prompt, completion, row):
    calls["n"] += 1
    if calls["n"] % 3 == 0:
        raise RuntimeError("reward service down")
    if calls["n"] % 3 == 1:
        return "not a number"
    return float(len(completion) % 3)
'''


def rl_yaml(tmp_path, steps=4, **over):
    (tmp_path / "rw.py").write_text(REWARDS)
    prompts = [json.loads(ln) for ln in (EXAMPLES / "data" / "rl_prompts.jsonl").read_text().splitlines()[:12]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    cfg = {"base": {"debug": "qwen3_moe"}, "run_dir": str(tmp_path / "run"), "max_adapters": 2, "max_rank": 8,
           "max_length": 16, "checkpoint_every": 2, "adapters": [
               {"name": "up", "data": "p.jsonl", "reward": "rw.py:upper", "rank": 4, "group_size": 3,
                "batch_size": 2, "max_steps": steps, "optimizer": {"lr": 1e-2}, "seed": 1,
                "sampling": {"max_tokens": 4, "temperature": 1.0}},
               {"name": "ppo", "data": "p.jsonl", "reward": "rw.py:upper", "rank": 8, "group_size": 2,
                "batch_size": 3, "max_steps": steps, "loss": "ppo", "kl_coef": 0.1, "seed": 2,
                "expert_sharing": "shared_a", "optimizer": {"lr": 1e-2},
                "sampling": {"max_tokens": 3, "temperature": 1.0}},
           ]}
    cfg.update(over)
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_group_advantages():
    assert _group_advantages([("a", 1.0), ("b", 1.0)]) == []  # no signal in a flat group
    adv = dict(_group_advantages([("a", 0.0), ("b", 1.0), ("c", 2.0)]))
    std = (2 / 3) ** 0.5
    assert abs(adv["a"] + 1 / std) < 1e-5 and abs(adv["b"]) < 1e-9 and abs(adv["c"] - 1 / std) < 1e-5
    assert _group_advantages([("a", 3.0)]) == []


def test_rl_job_runs_logs_rewards_kl_and_resumes_exactly(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = load_rl_config(rl_yaml(tmp_path / "a"))
    summary = RLJob(straight, progress=False, log=lambda *a: None).run()
    run = Path(straight.run_dir)
    assert sorted(summary["adapters"]) == ["ppo", "up"] and (run / "reward_curves.png").is_file()
    recs = [json.loads(ln) for ln in (run / "ppo" / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(recs) == 4 and all("reward" in r and "completion_tokens" in r for r in recs)
    kls = [r["kl"] for r in recs if "kl" in r]  # measured whenever some group had a reward spread
    assert kls and any(k != 0 for k in kls[1:] or kls)

    crashed = load_rl_config(rl_yaml(tmp_path / "b"))
    real = RLJob._shared_step

    def crash(self):
        if self.global_step == 3:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(RLJob, "_shared_step", crash)
    with pytest.raises(KeyboardInterrupt):
        RLJob(crashed, progress=False, log=lambda *a: None).run()
    monkeypatch.setattr(RLJob, "_shared_step", real)
    RLJob(crashed, resume=True, progress=False, log=lambda *a: None).run()
    for name in ("up", "ppo"):
        a = load_file(str(run / name / "final" / "adapter_model.safetensors"))
        b = load_file(str(Path(crashed.run_dir) / name / "final" / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        ra = [json.loads(ln)["reward"] for ln in (run / name / "metrics.jsonl").read_text().splitlines()[1:]]
        rb = [json.loads(ln)["reward"] for ln in (Path(crashed.run_dir) / name / "metrics.jsonl").read_text().splitlines()[1:]]
        assert ra == rb


def test_bad_reward_function_drops_samples_and_reports_once(tmp_path):
    c = yaml.safe_load(rl_yaml(tmp_path, steps=2).read_text())
    c["adapters"] = c["adapters"][:1]
    c["adapters"][0]["reward"] = "rw.py:flaky"
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(c))
    logs = []
    RLJob(load_rl_config(tmp_path / "rl.yaml"), progress=False, log=logs.append).run()
    reports = [m for m in logs if "reward function rw.py:flaky failed" in m]
    assert len(reports) == 1 and "Traceback" in reports[0]
    recs = [json.loads(ln) for ln in (Path(c["run_dir"]) / "up" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert recs[-1]["reward_errors"] == 8 and recs[0]["dropped"] == 4  # 2 of every 3 calls fail


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.update(reward="rw.py:nope"), "cannot be loaded"),
    (lambda a: a.update(reward="no_colon"), "module:function"),
    (lambda a: a.update(loss="cross_entropy"), "loss must be one of"),
    (lambda a: a.update(group_size=1), "group_size must be >= 2"),
    (lambda a: a.update(sampling={"top_p": 2}), "sampling: .*top_p"),
    (lambda a: a.update(loss_config={"clip": 1}), "takes no option 'clip'"),
])
def test_bad_rl_config(tmp_path, mutate, message):
    c = yaml.safe_load(rl_yaml(tmp_path).read_text())
    mutate(c["adapters"][0])
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(c))
    with pytest.raises(ConfigError, match=message):
        RLJob(load_rl_config(tmp_path / "rl.yaml"), progress=False, log=lambda *a: None).run()
    assert not (tmp_path / "run").exists()
