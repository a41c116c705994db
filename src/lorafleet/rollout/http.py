"""JSON over HTTP to a rollout engine (vLLM, SGLang), stdlib only.

Every failure is a `RolloutError` whose one line names the engine, the request and the engine's
own answer (its ``error.message`` / ``detail`` / body text). Nothing here retries: the RL job's
`EngineRollouts` retries pushes and generates (``rollout.retries``), so a retry here would
multiply its count.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request

from .base import RolloutError

__all__ = ["EngineHTTP", "check_url", "engine_message"]


def check_url(url) -> str:
    """``url`` without a trailing slash; ValueError naming it unless it is http(s)://host[:port]."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"url must be the engine's http://host:port, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be the engine's http://host:port, got {url!r}")
    try:
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise ValueError(f"url {url!r} has a port that is not a number") from None
    return url.rstrip("/")


def engine_message(body: bytes | str) -> str:
    """The engine's own words from an error body: OpenAI-style ``{"error": {"message"}}``,
    FastAPI's ``{"detail"}``, SGLang's ``{"message"}`` or the text itself; one line."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str) and err:
            text = err
        elif data.get("detail"):
            text = data["detail"] if isinstance(data["detail"], str) else json.dumps(data["detail"])
        elif data.get("message"):
            text = str(data["message"])
    text = " ".join(str(text).split())
    return text if len(text) <= 500 else text[:497] + "..."


class EngineAnswered(RolloutError):
    """The engine answered with an HTTP error: it is up (unlike a refused, dropped or timed-out
    connection). ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status

class EngineHTTP:
    """Requests to one engine: ``get(path)`` / ``post(path, body)`` -> parsed JSON (or the text
    of a non-JSON answer such as vLLM's ``Success: ...``)."""

    def __init__(self, url: str, *, engine: str = "engine", timeout: float = 300.0):
        self.url = check_url(url)
        self.engine = engine
        self.timeout = float(timeout)

    def get(self, path: str, *, timeout: float | None = None):
        return self._call("GET", path, None, timeout)

    def post(self, path: str, body: dict, *, timeout: float | None = None):
        return self._call("POST", path, body, timeout)

    def _call(self, method: str, path: str, body, timeout):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        where = f"{self.engine} at {self.url}: {method} {path}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout if timeout is None else timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise EngineAnswered(f"{where}: HTTP {e.code}: {engine_message(e.read() or e.reason)}", e.code) from None
        except urllib.error.URLError as e:
            raise RolloutError(f"{where}: unreachable ({_reason(e.reason)})") from None
        except (socket.timeout, TimeoutError):
            waited = self.timeout if timeout is None else timeout
            raise RolloutError(f"{where}: no answer within {waited:g} s") from None
        except (ConnectionError, OSError) as e:  # reset mid-answer, etc.
            raise RolloutError(f"{where}: connection failed ({_reason(e)})") from None
        text = raw.decode("utf-8", "replace")
        try:
            return json.loads(text)
        except ValueError:
            return text


def _reason(reason) -> str:
    if isinstance(reason, BaseException):
        return " ".join(str(reason).split()) or type(reason).__name__
    return str(reason)
