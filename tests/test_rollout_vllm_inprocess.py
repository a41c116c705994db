"""The in-process vLLM sink (rollout/vllm_inprocess.py): its spec checks here, and (slow) the sink
itself run from source inside .venv-vllm, where lorafleet and vLLM share one interpreter."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from lorafleet.rollout.vllm_inprocess import make_vllm_inprocess_engine

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.parametrize("spec,message", [
    ({"url": "http://x:1"}, r"^url: unknown option for engine vllm-inprocess .*takes no url"),
    ({"max_lora": 2}, r"^max_lora: unknown option"),
    ({"max_versions": 0}, r"^max_versions must be an integer >= 1"),
    ({"max_versions": 2, "max_loras": 2}, r"^max_versions=2 .* needs max_loras >= 3, it was started with max_loras 2"),
    ({"max_loras": 0}, r"^max_loras: must be an integer >= 1"),
    ({"max_model_len": "256"}, r"^max_model_len: must be an integer >= 1"),
    ({"enforce_eager": "no"}, r"^enforce_eager: must be true or false"),
    ({"gpu_memory_utilization": 1.5}, r"^gpu_memory_utilization: must be a number in \(0, 1\]"),
])
def test_a_bad_spec_is_refused_naming_the_field_before_vllm_starts(spec, message):
    with pytest.raises(ValueError, match=message):
        make_vllm_inprocess_engine({"engine": "vllm-inprocess", **spec}, base_dir="/nonexistent", max_rank=8)


@pytest.mark.slow
def test_in_process_vllm_samples_what_lorafleet_samples(tmp_path):
    """Greedy tokens identical to Fleet.sample (adapter and base), prompt and sampled logprobs
    equal to Fleet.compute_logprobs (fp32, rel <= 1e-5), and an in-place push after 10 more steps
    gives the new adapter's output. 100-240 s on 2 busy cores (vLLM's start)."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing (see lorafleet.rollout.vllm_local.CREATE_VENV)", pytrace=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_inprocess_check.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=env)
    line = next((x for x in run.stdout.splitlines() if x.startswith("VLLM_INPROCESS ")), None)
    assert line, (run.stdout + run.stderr)[-4000:]
    out = json.loads(line.split(" ", 1)[1])
    for tag in ("first", "after_steps"):
        assert out[tag]["vllm"] == out[tag]["ours"], (tag, out[tag])
        assert out[tag]["prompt_rel"] <= 1e-5
    assert out["first"]["ours"] != out["after_steps"]["ours"]  # the push really changed the adapter
    assert out["sampled_rel_max"] <= 1e-5 and out["sampled_distinct"] > 1
    assert out["base_tokens"] == out["base_ours"]
