"""`torchrun --nproc-per-node 2 -m lorafleet train examples/distributed_tiny.yaml` end to end (EP=2
on a debug MoE, gloo): it finishes, rank 0 alone writes, and its PEFT exports equal a
single-process run of the same file."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distributed_helpers import free_port, rel
from lorafleet.jobs.config import load_config
from lorafleet.jobs.train import TrainJob

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "distributed_tiny.yaml"


def torchrun(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "lorafleet", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_job")
    p = torchrun("train", str(CONFIG), "--threads", "1", "--no-progress", "--run-dir", str(tmp / "two"), cwd=tmp)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cfg = load_config(CONFIG)
    one = copy.deepcopy(cfg)
    one.parallelism, one.run_dir = None, str(tmp / "one")
    TrainJob(one, progress=False, log=lambda *a: None).run()
    return tmp, p


def test_torchrun_job_runs_and_rank0_writes_once(runs):
    tmp, p = runs
    two = tmp / "two"
    assert (two / "summary.json").is_file() and (two / "loss_curves.png").is_file()
    for name in ("rev", "sort"):
        lines = (two / name / "metrics.jsonl").read_text().splitlines()
        steps = [ln for ln in lines if '"loss"' in ln]
        assert len(steps) == {"rev": 4, "sort": 2}[name]  # one writer: no duplicated records
    assert p.stdout.count("finished: PEFT adapter") == 2  # only rank 0 prints


def test_torchrun_exports_equal_single_process(runs):
    tmp, _ = runs
    for name in ("rev", "sort"):
        a = load_file(str(tmp / "two" / name / "final" / "adapter_model.safetensors"))
        b = load_file(str(tmp / "one" / name / "final" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in b:
            assert a[k].shape == b[k].shape and rel(a[k], b[k]) <= 1e-5, (name, k, rel(a[k], b[k]))


def test_torchrun_resume_of_finished_run(runs):
    tmp, _ = runs
    p = torchrun("train", str(CONFIG), "--threads", "1", "--no-progress", "--run-dir", str(tmp / "two"), "--resume",
                 cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already complete" in p.stdout


def test_bad_degrees_fail_on_every_rank_before_any_collective(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("expert_parallel_degree: 2", "expert_parallel_degree: 3")
                   .replace("data/", str(ROOT / "examples" / "data") + "/"))
    p = torchrun("train", str(bad), "--threads", "1", "--no-progress", "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert p.returncode != 0
    msg = "world size 2 is not divisible by the fixed degrees' product 3"
    assert p.stderr.count(msg) == 2, p.stderr[-2000:]  # both ranks, the same line
