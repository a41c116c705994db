"""Values as people write them in a `lorafleet train | rl` config, the `optimizer:` mapping and a
`lorafleet submit` job file: `1e-3` (a string to YAML 1.1), `3e-4`, `1_000` and `1e3` for an integer
are read as numbers; a value of the wrong type is one line naming the field, its value and what
was expected -- a ConfigError in Python, one stderr line in the CLI, a 400 from the service."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lorafleet.jobs.config as config_module
from lorafleet.client import job_request
from lorafleet.engine.optim import LossScaler, OptimConfig
from lorafleet.jobs.config import ConfigError, parse_config
from lorafleet.jobs.rl import RLAdapterJob
from lorafleet.service.jobs import check_job
from lorafleet.service.store import Invalid

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
SOURCE = str(ROOT / "job.yaml")  # relative data paths resolve against the repository root


def train_cfg() -> dict:
    return {"base": {"debug": "qwen3_moe"}, "run_dir": "runs/x", "adapters": [
        {"name": "rev", "data": str(DATA / "rev_train.jsonl"), "rank": 4, "max_steps": 10,
         "optimizer": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 2, "grad_clip_norm": 1.0}}]}


def rl_cfg() -> dict:
    return {"base": {"debug": "qwen3_moe"}, "run_dir": "runs/x", "adapters": [
        {"name": "up", "data": str(DATA / "rl_prompts.jsonl"), "reward": "rewards.py:upper", "rank": 4,
         "max_steps": 4, "loss": "ppo", "group_size": 3, "kl_coef": 0.1,
         "loss_config": {"clip_low_threshold": 0.8}, "sampling": {"max_tokens": 4, "temperature": 1.0}}]}


def assert_one_line(message: str, *parts: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    for part in parts:
        assert part in message, (part, message)


def test_documented_schema_loads_verbatim():
    block = re.search(r"```yaml\n(.*?)```", config_module.__doc__, re.S).group(1)
    cfg = parse_config(yaml.safe_load(block), SOURCE)
    a = cfg.adapters[0]
    assert a.optimizer["lr"] == 1e-3 and isinstance(a.optimizer["lr"], float)
    assert a.optim_config(a.max_steps).lr == 1e-3 and cfg.checkpoint_every == 50


def test_numbers_as_people_write_them():
    text = """
base: {debug: qwen3_moe, pretrain_steps: 1e2}
max_length: 1_000
adapters:
  - name: rev
    data: examples/data/rev_train.jsonl
    alpha: 1.6e1
    batch_size: 8.0
    max_steps: 1_000
    eval_every: 1e3
    optimizer: {lr: 3e-4, weight_decay: 1e-2, betas: [0.9, 9.5e-1], warmup_steps: 1_0}
"""
    cfg = parse_config(yaml.safe_load(text), SOURCE)
    a = cfg.adapters[0]
    assert cfg.base.pretrain_steps == 100 and cfg.max_length == 1000
    assert (a.max_steps, a.eval_every, a.batch_size, a.alpha) == (1000, 1000, 8, 16.0)
    assert all(type(v) is int for v in (a.max_steps, a.eval_every, a.batch_size, cfg.max_length))
    opt = a.optim_config(a.max_steps)
    assert (opt.lr, opt.weight_decay, opt.betas, opt.warmup_steps) == (3e-4, 1e-2, (0.9, 0.95), 10)
    assert OptimConfig.from_dict({"lr": "1e-3", "total_steps": "1e3", "schedule": "linear"}).total_steps == 1000


def _set(path: str, value):
    """A mutation of the config dict setting ``path`` (``adapters.0.optimizer.lr``) to ``value``."""
    def mutate(c):
        *keys, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in keys:
            c = c[k]
        c[last] = value
    return mutate


@pytest.mark.parametrize("path, value, message", [
    ("adapters.0.optimizer.lr", "fast", "adapters[0] (rev): optimizer.lr: expected a number, got 'fast'"),
    ("adapters.0.optimizer.lr", True, "adapters[0] (rev): optimizer.lr: expected a number, got True"),
    ("adapters.0.optimizer.lr", math.nan, "optimizer.lr: expected a finite number, got nan"),
    ("adapters.0.optimizer.weight_decay", "nan", "optimizer.weight_decay: expected a finite number, got 'nan'"),
    ("adapters.0.optimizer.grad_clip_norm", math.inf, "optimizer.grad_clip_norm: expected a finite number, got inf"),
    ("adapters.0.optimizer.warmup_steps", 2.5, "optimizer.warmup_steps: expected an integer, got 2.5"),
    ("adapters.0.optimizer.betas", [0.9, "x"], "optimizer.betas[1]: expected a number, got 'x'"),
    ("adapters.0.optimizer", "1e-3", "adapters[0] (rev): optimizer: expected a mapping, got '1e-3'"),
    ("adapters.0.rank", "eight", "adapters[0] (rev): rank: expected an integer, got 'eight'"),
    ("adapters.0.batch_size", 2.5, "adapters[0] (rev): batch_size: expected an integer, got 2.5"),
    ("adapters.0.max_steps", True, "adapters[0] (rev): max_steps: expected an integer, got True"),
    ("adapters.0.alpha", "big", "adapters[0] (rev): alpha: expected a number, got 'big'"),
    ("adapters.0.experts", "yes please", "adapters[0] (rev): experts: expected true or false, got 'yes please'"),
    ("adapters.0.data", 5, "adapters[0] (rev): data: expected a string, got 5"),
    ("max_rank", "1e-3", "job.yaml: max_rank: expected an integer, got '1e-3'"),
    ("checkpoint_every", None, "job.yaml: checkpoint_every: expected an integer, got None"),
    ("base.pretrain_steps", "many", "job.yaml: base: pretrain_steps: expected an integer, got 'many'"),
])
def test_train_config_value_errors(path, value, message):
    c = train_cfg()
    _set(path, value)(c)
    with pytest.raises(ConfigError) as e:
        parse_config(c, SOURCE)
    assert_one_line(str(e.value), message)


def test_rl_config_reads_numbers():
    c = rl_cfg()
    a = c["adapters"][0]
    a.update(group_size="4", kl_coef="1e-2", loss_config={"clip_low_threshold": "8e-1", "clip_high_threshold": "inf"},
             sampling={"max_tokens": "1_0", "temperature": "7e-1", "top_k": 5.0})
    job = parse_config(c, SOURCE, RLAdapterJob).adapters[0]
    assert (job.group_size, job.kl_coef) == (4, 1e-2)
    assert job.loss_config == {"clip_low_threshold": 0.8, "clip_high_threshold": math.inf}  # inf: no upper clip
    assert job.sampling == {"max_tokens": 10, "temperature": 0.7, "top_k": 5}
    assert job.sampling_params(0).max_tokens == 10


@pytest.mark.parametrize("path, value, message", [
    ("adapters.0.group_size", "four", "adapters[0] (up): group_size: expected an integer, got 'four'"),
    ("adapters.0.kl_coef", True, "adapters[0] (up): kl_coef: expected a number, got True"),
    ("adapters.0.sampling.temperature", "hot", "adapters[0] (up): sampling.temperature: expected a number, got 'hot'"),
    ("adapters.0.sampling.max_tokens", 1.5, "sampling.max_tokens: expected an integer, got 1.5"),
    ("adapters.0.sampling", [1], "adapters[0] (up): sampling: expected a mapping, got [1]"),
    ("adapters.0.loss_config.clip_low_threshold", "nan",
     "adapters[0] (up): loss_config.clip_low_threshold: expected a finite number, got 'nan'"),
    ("adapters.0.loss_config.clip_low_threshold", False,
     "adapters[0] (up): loss_config.clip_low_threshold: expected a number, got False"),
    ("adapters.0.optimizer", {"lr": "fast"}, "adapters[0] (up): optimizer.lr: expected a number, got 'fast'"),
])
def test_rl_config_value_errors(path, value, message):
    c = rl_cfg()
    _set(path, value)(c)
    with pytest.raises(ConfigError) as e:
        parse_config(c, SOURCE, RLAdapterJob)
    assert_one_line(str(e.value), message)


@pytest.mark.parametrize("cls, d, message", [
    (OptimConfig, {"lr": "fast"}, "optimizer.lr: expected a number, got 'fast'"),
    (OptimConfig, {"lr": True}, "optimizer.lr: expected a number, got True"),
    (OptimConfig, {"eps": "inf"}, "optimizer.eps: expected a finite number, got 'inf'"),
    (OptimConfig, {"min_lr_ratio": "nan"}, "optimizer.min_lr_ratio: expected a finite number, got 'nan'"),
    (OptimConfig, {"min_lr_ratio": 2}, "min_lr_ratio must be in [0, 1], got 2"),
    (OptimConfig, {"total_steps": "1.25e1", "schedule": "cosine"}, "optimizer.total_steps: expected an integer"),
    (OptimConfig, {"lrr": 1e-3}, "unknown optimizer field(s): ['lrr']"),  # still strict
    (LossScaler, {"growth_interval": "often"}, "loss_scale.growth_interval: expected an integer, got 'often'"),
])
def test_optimizer_mapping_errors(cls, d, message):
    with pytest.raises(ValueError) as e:
        cls.from_dict(d)
    assert_one_line(str(e.value), message)


def test_optimizer_round_trip_unchanged():
    cfg = OptimConfig(lr=3e-4, betas=(0.8, 0.9), grad_clip_norm=1.0, schedule="cosine", total_steps=7)
    assert OptimConfig.from_dict(cfg.to_dict()) == cfg
    assert LossScaler.from_dict(LossScaler(scale=8.0).to_dict()) == LossScaler(scale=8.0)


def job_body(tmp_path: Path, **adapter) -> dict:
    spec = {"name": "rev", "data": str(DATA / "rev_train.jsonl"), "rank": 4, "target_modules": ["q_proj"],
            "experts": False, "batch_size": 2, "max_steps": 1, "max_length": 16, **adapter}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec).replace("'", ""))  # unquoted: 1e-3 reaches YAML as people write it
    return job_request(path)  # what `lorafleet submit` sends


def test_job_file_reads_numbers(tmp_path):
    body = job_body(tmp_path, optimizer={"lr": "1e-3", "warmup_steps": "1_0"}, max_steps="1e3", checkpoint_every="1_0")
    assert body["adapter"]["optimizer"]["lr"] == "1e-3"  # YAML 1.1 left it a string
    a, spec = check_job(body, 50)
    assert a.optim_config(a.max_steps).lr == 1e-3 and a.max_steps == 1000 and spec["checkpoint_every"] == 10
    assert spec["adapter"]["optimizer"] == {"lr": 1e-3, "warmup_steps": 10}  # the record shows numbers
    assert json.loads(json.dumps(spec["adapter"])) == spec["adapter"]


@pytest.mark.parametrize("adapter, message", [
    ({"optimizer": {"lr": "fast"}}, "adapter (rev): optimizer.lr: expected a number, got 'fast'"),
    ({"optimizer": {"lr": "true"}}, "adapter (rev): optimizer.lr: expected a number, got True"),
    ({"rank": "four"}, "adapter (rev): rank: expected an integer, got 'four'"),
    ({"max_length": "long"}, "max_length: expected an integer, got 'long'"),
    ({"checkpoint_every": 2.5}, "checkpoint_every: expected an integer, got 2.5"),
])
def test_job_file_value_errors(tmp_path, adapter, message):
    with pytest.raises(Invalid) as e:
        check_job(job_body(tmp_path, **adapter), 50)
    assert_one_line(str(e.value), message)


def test_job_file_errors_over_http_are_400(tmp_path):
    from fastapi.testclient import TestClient

    from lorafleet.service.core import ServiceConfig
    from lorafleet.service.server import build_service, make_app

    svc = build_service("qwen3_moe", ServiceConfig(data_dir=str(tmp_path / "svc"), max_adapters=1, max_rank=8,
                                                   store="memory"), log_fn=lambda *a: None)
    try:
        app, _ = make_app(svc, keys={"tml-key": "alice"})
        http = TestClient(app, raise_server_exceptions=False)
        headers = {"X-API-Key": "tml-key"}
        for adapter, message in (({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected a number, got 'fast'"),
                                 ({"optimizer": {"lr": "true"}}, "optimizer.lr: expected a number, got True"),
                                 ({"batch_size": "1e-3"}, "batch_size: expected an integer, got '1e-3'")):
            r = http.post("/api/v1/jobs", json=job_body(tmp_path, **adapter), headers=headers)
            assert r.status_code == 400, r.text
            assert_one_line(r.json()["error"], "adapter (rev): " + message)
        r = http.post("/api/v1/jobs", json=job_body(tmp_path, optimizer={"lr": "1e-3"}), headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["adapter"]["optimizer"] == {"lr": 1e-3}
        http.post(f"/api/v1/jobs/{r.json()['job_id']}/cancel", headers=headers)
    finally:
        svc.close()


@pytest.mark.parametrize("command, cfg", [("train", train_cfg), ("rl", rl_cfg)])
def test_cli_prints_one_line(tmp_path, command, cfg):
    c = cfg()
    c["adapters"][0]["optimizer"] = {"lr": "fast"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(c))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "lorafleet.cli", command, str(path)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode != 0 and not r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert_one_line(r.stderr, f"lorafleet {command}: error:", "optimizer.lr: expected a number, got 'fast'")
