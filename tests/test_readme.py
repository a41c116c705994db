"""The README's Python blocks run as written, in order, in one session (a fresh working dir)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_library_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = [b for b in python_blocks() if "import tinker" not in b]  # the service block: test_readme_service
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), ns)
    fleet, outs = ns["fleet"], ns["outs"]
    assert (tmp_path / "out" / "a" / "adapter_config.json").exists()
    assert (tmp_path / "ckpt" / "a").exists()
    assert len(outs) == 2 and len(outs[0]) == 4 and outs[0][0].stop_reason in ("stop", "length")
    assert ns["res"].metrics["a"]["tokens:sum"] == 2
    assert fleet._detached


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_block_runs_against_a_real_server(tmp_path):
    """The service section's command starts a real `lorafleet serve`; its Python block (the
    unmodified tinker SDK) runs against it as written, only the port changed."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    text = (ROOT / "README.md").read_text()
    serve = re.search(r'^LORAFLEET_API_KEYS="([^"]+)" \.venv/bin/lorafleet serve --port 8000$', text, re.M)
    assert serve, "README's serve command changed: update this test"
    (block,) = [b for b in python_blocks() if "import tinker" in b]
    port = _free_port()
    env = dict(os.environ, LORAFLEET_API_KEYS=serve.group(1), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "serve", "--port", str(port),
                             "--data-dir", str(tmp_path / "data")], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240  # a cold cache builds the default base first
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
        ns: dict = {}
        exec(compile(block.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), "README.md service block", "exec"), ns)
        assert "sampler" in ns and "tc" in ns
    finally:
        proc.terminate()
        proc.wait(timeout=30)
