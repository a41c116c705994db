"""`torchrun --nproc-per-node 2 -m lorafleet rl examples/distributed_rl_tiny.yaml` end to end (plain
data parallelism, gloo): it finishes; rank 0 alone writes and prints (rank 1's own stdout and
stderr, kept apart by torchrun's --redirects, are empty, the base-building line included); and
its rewards per step and exported adapters equal a single-process run of the same file, so each
rank sampling its share of the requests really draws what one process draws."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distributed_helpers import free_port, rel
from lorafleet.jobs.rl import RLJob, load_rl_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "distributed_rl_tiny.yaml"
NAMES = ("shout", "terse")
EXACT = ("step", "global_step", "reward", "completion_tokens", "trained_tokens", "dropped", "reward_errors", "lr",
         "tokens")  # what sampling and scoring decide: equal only if every draw is one process's draw


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_rl")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), LORAFLEET_CACHE=str(tmp / "cache"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "--log-dir", str(tmp / "logs"), "--redirects", "3",
           "-m", "lorafleet", "rl", str(CONFIG), "--threads", "1", "--no-progress", "--run-dir", str(tmp / "two")]
    p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    logs = {int(f.parent.name): f for f in (tmp / "logs").rglob("stdout.log")}
    out = {r: (f.read_text(), (f.parent / "stderr.log").read_text()) for r, f in logs.items()}
    assert p.returncode == 0, p.stderr[-3000:] + str(out)[-3000:]
    cfg = copy.deepcopy(load_rl_config(CONFIG))
    cfg.parallelism, cfg.run_dir = None, str(tmp / "one")
    old = os.environ.get("LORAFLEET_CACHE")
    os.environ["LORAFLEET_CACHE"] = str(tmp / "cache")  # the base the torchrun run built
    try:
        RLJob(cfg, progress=False, log=lambda *a: None).run()
    finally:
        if old is None:
            os.environ.pop("LORAFLEET_CACHE")
        else:
            os.environ["LORAFLEET_CACHE"] = old
    return tmp, out


def records(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / name / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_rl_equals_one_process_step_by_step(runs):
    tmp, _ = runs
    for n in NAMES:
        got, want = records(tmp / "two", n), records(tmp / "one", n)
        assert len(got) == len(want) == 4  # the data line and 3 steps: one writer, no duplicates
        for g, w in zip(got[1:], want[1:]):
            assert {k: g[k] for k in EXACT} == {k: w[k] for k in EXACT}, n
            for k in ("entropy", "grad_norm"):
                assert abs(g[k] - w[k]) <= 1e-5 * abs(w[k]), (n, k, g[k], w[k])
            assert ("kl" in g) == ("kl" in w) and abs(g.get("kl", 0) - w.get("kl", 0)) <= 1e-6, n
        assert len({r["reward"] for r in got[1:]}) > 1  # the draws differ from step to step


def test_torchrun_rl_exports_equal_one_process(runs):
    tmp, _ = runs
    for n in NAMES:
        a = load_file(str(tmp / "two" / n / "final" / "adapter_model.safetensors"))
        b = load_file(str(tmp / "one" / n / "final" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in b:
            assert a[k].shape == b[k].shape and rel(a[k], b[k]) <= 1e-5, (n, k, rel(a[k], b[k]))
    assert (tmp / "two" / "summary.json").is_file() and (tmp / "two" / "reward_curves.png").is_file()


def test_only_rank_0_prints(runs):
    _, out = runs
    assert sorted(out) == [0, 1]
    stdout0, _ = out[0]
    # about the base, at most one line: rank 0 "building" it, "waiting" for rank 1 that won the
    # cache lock, or none when rank 1 had built it before rank 0 looked (a cache hit is silent)
    assert stdout0.count("qwen3_moe debug base") <= 1, stdout0
    assert all(stdout0.count(f"[{n}] finished: PEFT adapter") == 1 for n in NAMES), stdout0
    assert stdout0.count("reward curves:") == 1, stdout0
    assert out[1] == ("", ""), out[1]  # rank 1: not a line, not a progress bar
