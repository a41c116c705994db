"""Durability: `kill -9` a real `lorafleet serve` process mid-training and start it again.

Checks the promise of docs/service.md: saved checkpoints are intact and load (into a new
client and back into the old model), a running job resumes from its last checkpoint and
finishes with one metric record per step, a request that was still running answers 410
with a message saying to send it again, and a model whose in-memory state died says which
checkpoint to load instead of silently rewinding.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from lorafleet.client import JobClient
from lorafleet.service.server import free_port

ROOT = Path(__file__).resolve().parents[1]
KEY_A, KEY_B = "tml-alice-restart", "tml-bob-restart"
T = 60


def start(data_dir: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, LORAFLEET_API_KEYS=f"alice:{KEY_A},bob:{KEY_B}", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "serve", "--port", str(port), "--data-dir",
                             str(data_dir), "--base", "debug:qwen3_moe", "--max-rank", "8", "--max-adapters", "4",
                             "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def datum(tok, text):
    ids = tok.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_kill_9_and_restart(tmp_path, procs):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs.append(start(tmp_path, port))

    # a Tinker client trains two steps and saves a checkpoint and sampler weights
    sc = tinker.ServiceClient(base_url=url, api_key=KEY_A)
    base = sc.get_server_capabilities().supported_models[0].model_name
    tc = sc.create_lora_training_client(base_model=base, rank=4)
    tok = tc.get_tokenizer()
    data = [datum(tok, "rev: abc = cba"), datum(tok, "rev: dcab = bacd")]
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy").result(T)
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(T)
    ckpt = tc.save_state("before-crash").result(T).path
    wpath = tc.save_weights_for_sampler("w-before").result(T).path
    tc.forward_backward(data, "cross_entropy").result(T)  # acknowledged, never saved: lost in the crash
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(T)

    # a job that checkpoints every 3 steps; wait until it is past its second checkpoint
    jobs = JobClient(url, KEY_A)
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: crashy\ndata: {ROOT / 'examples/data/rev_train.jsonl'}\nrank: 4\n"
                    "target_modules: [q_proj, v_proj]\nexperts: false\nbatch_size: 4\nmax_steps: 30\n"
                    "max_length: 32\ncheckpoint_every: 3\noptimizer: {lr: 1.0e-2}\n")
    job = jobs.submit(spec)["job_id"]
    deadline = time.monotonic() + T
    while jobs.status(job)["step"] < 7:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    # a long sampling request is in flight when the server dies
    http = httpx.Client(base_url=url + "/api/v1", headers={"X-API-Key": KEY_A}, timeout=30)
    r = http.post("/asample", json={"base_model": base, "prompt": {"chunks": [{"tokens": tok.encode("hi")}]},
                                    "num_samples": 64, "sampling_params": {"max_tokens": 4000, "stop": []}})
    rid = r.json()["request_id"]
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(10)

    procs.append(start(tmp_path, port))
    # the request the dead process never finished: 410, retryable, says what to do
    lost = http.post("/retrieve_future", json={"request_id": rid})
    assert lost.status_code == 410 and "send it again" in lost.json()["error"]
    # bob cannot see alice's request or job
    bob = httpx.Client(base_url=url + "/api/v1", headers={"X-API-Key": KEY_B}, timeout=30)
    assert bob.post("/retrieve_future", json={"request_id": rid}).status_code == 404
    assert bob.get(f"/jobs/{job}").status_code == 404

    # the job resumes from its last checkpoint and finishes with steps 1..30 once each
    deadline = time.monotonic() + 180
    while (st := jobs.status(job))["status"] != "succeeded":
        assert st["status"] in ("queued", "running") and time.monotonic() < deadline, st
        time.sleep(0.2)
    (resumed,) = st["resumed_from"]  # the last checkpoint before the kill: a multiple of 3, at least 6
    assert resumed >= 6 and resumed % 3 == 0 and resumed < 30
    assert [m["step"] for m in st["metrics"]] == list(range(1, 31))
    assert jobs.download(job, tmp_path / "crashy.tar.gz").stat().st_size > 0

    # the old training client's model lost its unsaved state: it says which checkpoint to load
    with pytest.raises(Exception, match="load_state"):
        tc.forward_backward(data, "cross_entropy").result(T)
    tc.load_state_with_optimizer(ckpt).result(T)
    a = tc.forward_backward(data, "cross_entropy").result(T).metrics["loss:sum"]
    # the checkpoint is intact: a new client from it computes the same loss
    sc2 = tinker.ServiceClient(base_url=url, api_key=KEY_A)
    tc2 = sc2.create_training_client_from_state_with_optimizer(ckpt)
    b = tc2.forward_backward(data, "cross_entropy").result(T).metrics["loss:sum"]
    assert abs(a - b) <= 1e-5 * abs(b)
    # sampler weights saved before the crash still sample
    out = sc2.create_sampling_client(model_path=wpath).result(T).sample(
        types.ModelInput.from_ints(tok.encode("rev: ab =")), num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=4)).result(T)
    assert len(out.sequences) == 2
    sc2.close("success").result(T)
    sc.close("success").result(T)
