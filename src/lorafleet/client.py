"""`JobClient`: the HTTP client behind `lorafleet submit | status | cancel | download`.

A job file is one adapter of a `lorafleet train` config (``name``, ``data``, ``rank``,
``optimizer``, ``max_steps`` ...) plus, optionally, ``max_length``, ``overflow`` and
``checkpoint_every``. Its ``data`` / ``eval_data`` files are uploaded (paths relative to the job
file), or, with ``server_paths=True``, sent as paths for the server to read from its dataset
roots.
"""

from __future__ import annotations

import os
from pathlib import Path

from .jobs.config import read_yaml_mapping

JOB_LEVEL = ("max_length", "overflow", "checkpoint_every")
DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(ValueError):
    pass


def job_request(path: str | Path, server_paths: bool = False) -> dict:
    """The POST /jobs body for a job file."""
    path = Path(path)
    spec = read_yaml_mapping(path, "job file")
    if "data" not in spec:
        raise ClientError(f"{path}: a job file is a mapping of one adapter's fields, with at least 'data'")
    body: dict = {k: spec.pop(k) for k in JOB_LEVEL if k in spec}
    for key in ("data", "eval_data"):
        if key not in spec:
            continue
        f = Path(spec.pop(key))
        f = f if f.is_absolute() else path.parent / f
        if server_paths:
            body[key] = {"path": str(f.resolve())}
        elif not f.is_file():
            raise ClientError(f"{path}: {key} file {str(f)!r} does not exist")
        else:
            body[key] = {"jsonl": f.read_text()}
    body["adapter"] = spec
    return body


class JobClient:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 120.0):
        import httpx

        self.url = (url or os.environ.get("LORAFLEET_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("LORAFLEET_API_KEY") or os.environ.get("TINKER_API_KEY") or "tml-local"
        self.http = httpx.Client(base_url=self.url + "/api/v1", headers={"X-API-Key": key}, timeout=timeout)

    def _call(self, method: str, path: str, **kw):
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {self.url}: {e}") from None
        if r.status_code >= 400:
            try:
                msg = r.json().get("error") or r.text
            except ValueError:
                msg = r.text
            raise ClientError(f"{r.status_code}: {msg}")
        return r

    def submit(self, job_file: str | Path, server_paths: bool = False) -> dict:
        return self._call("POST", "/jobs", json=job_request(job_file, server_paths)).json()

    def list(self) -> list[dict]:
        return self._call("GET", "/jobs").json()["jobs"]

    def status(self, job_id: str) -> dict:
        return self._call("GET", f"/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/jobs/{job_id}/cancel").json()

    def download(self, job_id: str, out: str | Path | None = None) -> Path:
        """Write the job's PEFT export archive (``<job_id>.tar.gz`` by default); its path."""
        r = self._call("GET", f"/jobs/{job_id}/download")
        out = Path(out or f"{job_id}.tar.gz")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(r.content)
        return out


def format_jobs(jobs: list[dict]) -> str:
    head = f"{'job_id':18} {'name':14} {'status':10} {'step':>11}  loss"
    lines = [head, "-" * len(head)]
    for j in jobs:
        loss = j.get("last_loss")
        lines.append(f"{j['job_id']:18} {j['name'][:14]:14} {j['status']:10} {j['step']:>5}/{j['total_steps']:<5}  "
                     + (f"{loss:.4f}" if isinstance(loss, float) else "-"))
    return "\n".join(lines)
