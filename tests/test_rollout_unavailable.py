"""An engine without a sink (SGLang, until it is built) is refused at the job's start with one
line — never a traceback, never a silent fall-back to the built-in sampler. (vLLM's sinks:
tests/test_rollout_vllm.py.)"""

import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.rollout import BUILT, ENGINES, RolloutUnavailable, make_engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("engine", [e for e in ENGINES if e not in BUILT])
def test_every_engine_is_refused_by_name(engine):
    with pytest.raises(RolloutUnavailable, match=f"rollout engine '{engine}' is not available"):
        make_engine({"engine": engine, "url": "http://127.0.0.1:9"}, base_dir="/nonexistent", max_rank=8)


def test_the_cli_says_one_line_and_writes_no_adapter(tmp_path):
    cfg = (ROOT / "examples" / "rl_vllm.yaml").read_text().replace("max_steps: 40", "max_steps: 2")
    cfg = cfg.replace("engine: vllm-local", "engine: sglang, url: http://127.0.0.1:9")
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
    assert len(err) == 1 and "rollout engine 'sglang' is not available" in err[0], p.stderr
    assert not list((tmp_path / "run").glob("shout/**/adapter_model.safetensors"))
