"""An engine lorafleet has no sink for is refused by name, and an engine that cannot be reached
stops `lorafleet rl` at its start with one line — never a traceback, never a silent fall-back to
the built-in sampler. (The sinks themselves: tests/test_rollout_vllm*.py, test_rollout_sglang.py.)"""

import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.rollout import ENGINES, RolloutUnavailable, make_engine
from lorafleet.rollout.vllm_local import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_an_engine_without_a_sink_is_refused_by_name():
    assert set(ENGINES) == {"vllm", "vllm-local", "vllm-inprocess", "sglang"}
    with pytest.raises(RolloutUnavailable, match="rollout engine 'tgi' is not available"):
        make_engine({"engine": "tgi", "url": "http://127.0.0.1:9"}, base_dir="/nonexistent", max_rank=8)


def test_the_cli_says_one_line_and_writes_no_adapter(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = (ROOT / "examples" / "rl_vllm.yaml").read_text().replace("max_steps: 40", "max_steps: 2")
    cfg = cfg.replace("engine: vllm-local, max_loras: 2", f"engine: vllm, url: {url}")
    (tmp_path / "data").symlink_to(ROOT / "examples" / "data")
    (tmp_path / "rewards.py").symlink_to(ROOT / "examples" / "rewards.py")
    (tmp_path / "rl.yaml").write_text(cfg.replace("pretrain_steps: 400", "pretrain_steps: 0"))
    p = subprocess.run([sys.executable, "-m", "lorafleet", "rl", str(tmp_path / "rl.yaml"),
                        "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                            "LORAFLEET_CACHE": str(tmp_path / "cache")})
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and f"rollout engine vllm: could not start: vllm at {url}: GET /v1/models: unreachable" \
        in err[0], p.stderr
    assert not list((tmp_path / "run").glob("shout/**/adapter_model.safetensors"))
