"""The service's job API (`lorafleet submit | status | cancel | download`), in process.

One server on the debug base with only 2 slots, two tenants. Jobs run in shared mixed steps,
queue when the pool is full, export a PEFT adapter that loads back, and every bad request is
a 4xx naming the problem.
"""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pytest
import torch

from lorafleet.cli import main as cli
from lorafleet.client import ClientError, JobClient, job_request
from lorafleet.service.core import ServiceConfig
from lorafleet.service.server import ServerThread, build_service, make_app

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "job_rev.yaml"
KEY_A, KEY_B = "tml-alice-jobs", "tml-bob-jobs"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobsvc")
    # the random-init debug base: it starts at once (the pretrained default is for learning)
    cfg = ServiceConfig(data_dir=str(d), max_adapters=2, max_rank=8, dataset_roots=[str(ROOT / "examples" / "data")])
    svc = build_service("debug:qwen3_moe", cfg, log_fn=lambda *a: None)
    app, _ = make_app(svc, keys={KEY_A: "alice", KEY_B: "bob"})
    srv = ServerThread(app)
    url = srv.start()
    yield svc, url
    srv.stop()
    svc.close()


def small_job(tmp_path: Path, name: str, steps: int, **extra) -> Path:
    spec = {"name": name, "data": str(ROOT / "examples/data/rev_train.jsonl"),
            "eval_data": str(ROOT / "examples/data/rev_eval.jsonl"), "rank": 4, "alpha": 8,
            "target_modules": ["q_proj", "v_proj"], "experts": False, "optimizer": {"lr": 1e-2},
            "batch_size": 4, "max_steps": steps, "max_length": 32, "checkpoint_every": 3, **extra}
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(spec))  # JSON is YAML
    return p


def wait_done(c: JobClient, ids, timeout=240.0):
    deadline = time.monotonic() + timeout
    while True:
        st = {i: c.status(i) for i in ids}
        if all(s["status"] in ("succeeded", "failed", "cancelled") for s in st.values()):
            return st
        assert time.monotonic() < deadline, {i: s["status"] for i, s in st.items()}
        time.sleep(0.2)


def test_jobs_queue_batch_export(server, tmp_path):
    svc, url = server
    a, b = JobClient(url, KEY_A), JobClient(url, KEY_B)
    calls0, ops0 = svc.scheduler.stats["fwdbwd_calls"], svc.scheduler.stats["fwdbwd_ops"]
    ja = a.submit(small_job(tmp_path, "ja", 6))
    jb = b.submit(small_job(tmp_path, "jb", 6), server_paths=True)  # read from the server's dataset root
    jc = a.submit(small_job(tmp_path, "jc", 3))  # the pool has 2 slots: this one waits
    assert ja["status"] == "queued" and ja["total_steps"] == 6
    st = wait_done(a, [ja["job_id"], jc["job_id"]])
    stb = wait_done(b, [jb["job_id"]])[jb["job_id"]]
    assert all(s["status"] == "succeeded" for s in st.values()) and stb["status"] == "succeeded"
    # two tenants' jobs ran in the same forward_backward calls
    calls, ops = svc.scheduler.stats["fwdbwd_calls"] - calls0, svc.scheduler.stats["fwdbwd_ops"] - ops0
    assert ops == 6 + 6 + 3 and calls < ops and svc.scheduler.stats["max_tenants_per_step"] >= 2
    # jc started only after a slot freed
    assert st[jc["job_id"]]["started"] >= min(st[ja["job_id"]]["finished"], stb["finished"])
    m = st[ja["job_id"]]["metrics"]
    assert [r["step"] for r in m] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m) and "eval_acc" in m[-1]
    # tenants see only their own jobs
    assert {j["job_id"] for j in a.list()} >= {ja["job_id"], jc["job_id"]}
    assert jb["job_id"] not in {j["job_id"] for j in a.list()}
    with pytest.raises(ClientError, match="404"):
        a.status(jb["job_id"])
    with pytest.raises(ClientError, match="404"):
        a.download(jb["job_id"], tmp_path / "x.tar.gz")
    # the export is a PEFT adapter equal to the job's last weights: reload it into the fleet
    out = a.download(ja["job_id"], tmp_path / "ja.tar.gz")
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "ja", filter="data")
    cfg = json.loads((tmp_path / "ja" / "ja" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    assert not svc.fleet.adapters  # every job freed its slot


def test_cancel_and_cli(server, tmp_path, capsys):
    svc, url = server
    args = ["--url", url, "--api-key", KEY_A]
    assert cli(["submit", str(small_job(tmp_path, "long", 10_000)), *args]) == 0
    job_id = capsys.readouterr().out.split()[1]
    deadline = time.monotonic() + 60
    while JobClient(url, KEY_A).status(job_id)["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert cli(["status", job_id, *args]) == 0
    assert "running" in capsys.readouterr().out
    assert cli(["cancel", job_id, *args]) == 0
    st = wait_done(JobClient(url, KEY_A), [job_id])[job_id]
    assert st["status"] == "cancelled" and not st["downloadable"]
    assert cli(["download", job_id, *args, "-o", str(tmp_path / "no.tar.gz")]) == 2
    assert "no export" in capsys.readouterr().err
    assert cli(["status", *args]) == 0 and job_id in capsys.readouterr().out
    assert not svc.fleet.adapters


@pytest.mark.parametrize("change, message", [
    ({"rank": 64}, "max_rank"),
    ({"bogus": 1}, "unknown field"),
    ({"target_modules": ["nope_proj"]}, "nope_proj"),
    ({"max_steps": None}, "max_steps or epochs"),
    ({"data": "/etc/passwd"}, "outside the server's dataset roots"),
    ({"max_length": 0}, "max_length"),
])
def test_bad_jobs_are_refused(server, tmp_path, change, message):
    _, url = server
    c = JobClient(url, KEY_A)
    server_paths = "data" in change
    with pytest.raises(ClientError, match=message) as e:
        c.submit(small_job(tmp_path, "bad", 3, **change), server_paths=server_paths)
    assert str(e.value).startswith("400")


def test_malformed_dataset_line(server, tmp_path):
    _, url = server
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(ClientError, match=r"data \(uploaded\):2: malformed JSON"):
        JobClient(url, KEY_A).submit(small_job(tmp_path, "bad", 3, data=str(bad)))
    body = job_request(small_job(tmp_path, "ok", 3))
    assert set(body) == {"adapter", "data", "eval_data", "max_length", "checkpoint_every"}
    assert "jsonl" in body["data"] and "data" not in body["adapter"]
