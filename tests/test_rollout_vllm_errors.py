"""The vLLM sinks' errors that need no running vLLM: an engine without --enable-lora or without
runtime LoRA loading (vLLM's own answers, served by a stub), a vllm-local server that dies or
never comes up (stopped, no process left), and bad options. The real server's refusals (a rank
above --max-lora-rank, a wrong URL, an unknown adapter): tests/test_rollout_vllm.py.

A second real vLLM started without --enable-lora would cost ~50 s of the suite, so the stub
answers what vLLM 0.32 answers then: the worker's RuntimeError (its text read from the vLLM
source in .venv-vllm, so a reworded message fails here), wrapped by the engine core and the
executor exactly as the real server wrapped the rank refusal (test_rollout_vllm.py), as HTTP 500.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rollout_helpers import require_vllm_python

import lorafleet as lf
from lorafleet.engine.snapshot import Snapshot
from lorafleet.models.debug import build_debug_model
from lorafleet.rollout import RolloutError, RolloutUnavailable, make_engine
from lorafleet.rollout.vllm_local import VLLMServer, start_local_engine


def _vllm_source(rel: str) -> str:
    python = require_vllm_python()
    site = next((python.parent.parent / "lib").glob("python3*/site-packages"))
    return (site / "vllm" / rel).read_text()


def _no_lora_answer() -> str:
    src = _vllm_source("v1/worker/lora_model_runner_mixin.py")
    msg = re.search(r'def _ensure_lora_enabled.*?RuntimeError\("([^"]+)"\)', src, re.S).group(1)
    assert "Call to {name} method failed" in _vllm_source("v1/engine/core.py")
    return (f"Call to add_lora method failed: Worker failed with error '{msg}', please check the stack trace "
            f"above for the root cause")


class _Stub:
    """A tiny HTTP server: GET /v1/models names a base; POST /v1/load_lora_adapter answers ``load``."""

    def __init__(self, load: tuple[int, dict]):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "base", "parent": None}]})

            def do_POST(self):
                stub.requests.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                self._send(*load) if self.path == "/v1/load_lora_adapter" else self._send(404, {"detail": "Not Found"})

        self.requests = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _snapshot():
    fleet = lf.Fleet(build_debug_model("qwen3"), max_adapters=1, max_rank=8)
    fleet.add_adapter("a", lf.AdapterConfig(rank=4, target_modules=["q_proj"], seed=0))
    return fleet.snapshot("a")


@pytest.mark.parametrize("answer, hint", [
    ("no_lora", "start vLLM with --enable-lora"),
    ("no_route", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1"),
])
def test_an_engine_that_cannot_load_adapters_is_one_line_naming_its_answer(tmp_path, answer, hint):
    if answer == "no_lora":
        msg = _no_lora_answer()
        load = (500, {"error": {"message": msg, "type": "InternalServerError", "param": None, "code": 500}})
    else:  # the route exists only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1: FastAPI's 404
        msg, load = "Not Found", (404, {"detail": "Not Found"})
    stub = _Stub(load)
    try:
        eng = make_engine({"engine": "vllm", "url": stub.url, "adapter_dir": str(tmp_path)}, base_dir="", max_rank=8)
        with pytest.raises(RolloutError) as e:
            eng.push(_snapshot())
        text = str(e.value)
        assert "\n" not in text and msg in text and hint in text and "POST /v1/load_lora_adapter" in text
        assert stub.requests[0][1]["load_inplace"] is True
        assert not any((tmp_path / "a").iterdir())  # the refused directory is not left behind
    finally:
        stub.close()


def test_a_3d_moe_peft_snapshot_asks_vllm_for_the_3d_format(tmp_path):
    import torch

    snap = Snapshot("m", "peft", 1, 4, {"base_model.model.x.experts.base_layer.lora_A.weight": torch.zeros(8, 4, 16)},
                    {"r": 4, "lora_alpha": 8, "peft_type": "LORA"})
    stub = _Stub((200, {}))
    try:
        eng = make_engine({"engine": "vllm", "url": stub.url, "adapter_dir": str(tmp_path)}, base_dir="", max_rank=8)
        eng.push(snap)
        assert stub.requests[0][1]["is_3d_lora_weight"] is True
    finally:
        stub.close()


def _fake_python(tmp_path, body: str) -> str:
    p = tmp_path / "python"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def _base(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    return tmp_path / "base"


def test_a_server_that_dies_at_start_is_one_line_with_its_log_tail(tmp_path):
    python = _fake_python(tmp_path, 'echo "ValueError: this model cannot be served"\nexit 3\n')
    with pytest.raises(RolloutError, match=r"vllm-local exited with code 3 while starting .*"
                                           r"this model cannot be served.*full log: "):
        start_local_engine(_base(tmp_path), max_lora_rank=8, python=python)


def test_a_server_that_never_answers_is_stopped_with_its_children(tmp_path):
    python = _fake_python(tmp_path, f"sleep 300 &\necho $! > {tmp_path}/child\necho loading\nsleep 300\n")
    server = VLLMServer(_base(tmp_path), max_lora_rank=8, python=python).start()
    t = time.monotonic()
    with pytest.raises(RolloutError, match=r"did not answer /health within 1.5 s and was stopped .*loading"):
        server.wait_ready(1.5)
    assert time.monotonic() - t < 20
    child = int((tmp_path / "child").read_text())
    assert server.proc.poll() is not None
    assert _running_in_group(server.proc.pid) == [] and not _running(child)  # no orphan left


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) from /proc, None for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[2])


def _running(pid: int) -> bool:
    st = _state(pid)  # a zombie ("Z") is dead: only its parent's reaping is left (PID 1 here may not reap)
    return st is not None and st[0] != "Z"


def _running_in_group(pgid: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [p for p in pids if (st := _state(p)) is not None and st[1] == pgid and st[0] != "Z"]


def test_bad_options_and_a_missing_vllm_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAFLEET_VLLM_PYTHON", raising=False)
    base = str(_base(tmp_path))
    with pytest.raises(RolloutError, match=r"no vLLM python at /nonexistent/python: create it .*python3 -m venv"):
        make_engine({"engine": "vllm-local", "python": "/nonexistent/python"}, base_dir=base, max_rank=8)
    with pytest.raises(ValueError, match="is not a Hugging Face model directory"):
        make_engine({"engine": "vllm-local"}, base_dir=str(tmp_path / "nothing"), max_rank=8)
    with pytest.raises(ValueError, match="engine vllm-local has no option 'url'"):
        make_engine({"engine": "vllm-local", "url": "http://x:1"}, base_dir=str(tmp_path), max_rank=8)
    with pytest.raises(ValueError, match="max_loras must be an integer >= 1"):
        make_engine({"engine": "vllm-local", "max_loras": 0}, base_dir=str(tmp_path / "base"), max_rank=8)
    with pytest.raises(ValueError, match=r"max_versions=2 .* needs --max-loras >= 3, it was started with --max-lo"):
        make_engine({"engine": "vllm-local", "max_versions": 2, "max_loras": 2, "python": _fake_python(tmp_path, "")},
                    base_dir=str(tmp_path / "base"), max_rank=8)
    with pytest.raises(RolloutUnavailable, match="rollout engine 'vllm_local' is not available"):
        make_engine({"engine": "vllm_local"}, base_dir="", max_rank=8)


FAKE_SERVER = r'''
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
print("fake vLLM up", flush=True)

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, body):
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "base", "parent": None}]} if self.path == "/v1/models" else "")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/load_lora_adapter":
            return self._send("Success: LoRA adapter added successfully.")
        print("fake vLLM: engine core died", flush=True)
        os._exit(7)

HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def test_a_local_server_that_dies_mid_job_is_named_with_its_exit_code_and_log(tmp_path):
    import sys

    (tmp_path / "fake_vllm.py").write_text(FAKE_SERVER)
    python = _fake_python(tmp_path, f'exec {sys.executable} {tmp_path / "fake_vllm.py"} "$@"\n')
    eng = start_local_engine(_base(tmp_path), max_lora_rank=8, python=python, startup_timeout_s=60)
    try:
        assert eng.push(_snapshot()) == "a"  # started, ready, loads go through
        with pytest.raises(RolloutError, match=r"POST /v1/completions: .*the vllm-local server exited with code 7 "
                                               r"\(last log lines: .*engine core died"):
            eng.generate("a", [[1, 2]], lf.SamplingParams(max_tokens=2), 1)
    finally:
        eng.close()
    assert not _running_in_group(eng.server.proc.pid)
