"""API keys per tenant.

Keys come from a file (``--api-keys FILE``: one ``tenant:key`` per line, ``#`` comments; or a
JSON object ``{"tenant": "key" | ["key", ...]}``) and/or the environment variable
``LORAFLEET_API_KEYS="tenant:key,tenant:key"``. With no keys at all the server runs as a single
tenant (``local``) that accepts any key, and only on a loopback address.

The Tinker SDK sends the key in the ``X-API-Key`` header and refuses keys that do not start
with ``tml-`` before sending, so keys should look like ``tml-...``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
from pathlib import Path

ENV_VAR = "LORAFLEET_API_KEYS"
LOCAL_TENANT = "local"
_TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class AuthError(Exception):
    """Missing or unknown API key (HTTP 401)."""


def _add(keys: dict[str, str], tenant: str, key: str, where: str):
    tenant, key = tenant.strip(), key.strip()
    if not _TENANT_RE.match(tenant) or tenant in (".", ".."):
        raise ValueError(f"{where}: tenant name {tenant!r} must match [A-Za-z0-9_.-]{{1,64}}")
    if len(key) < 8:
        raise ValueError(f"{where}: the key of tenant {tenant!r} is shorter than 8 characters")
    if key in keys and keys[key] != tenant:
        raise ValueError(f"{where}: the same key is given to tenants {keys[key]!r} and {tenant!r}")
    keys[key] = tenant


def parse_pairs(text: str, where: str) -> dict[str, str]:
    """``tenant:key`` pairs separated by commas or newlines -> {key: tenant}."""
    keys: dict[str, str] = {}
    for n, item in enumerate(re.split(r"[,\n]", text), 1):
        item = item.split("#", 1)[0].strip()
        if not item:
            continue
        if ":" not in item:
            raise ValueError(f"{where}: entry {n} is not 'tenant:key'")
        tenant, key = item.split(":", 1)
        _add(keys, tenant, key, where)
    return keys


def load_keys(path: str | os.PathLike | None = None, environ=None) -> dict[str, str]:
    """{key: tenant} from the file and the environment (both may be given)."""
    environ = os.environ if environ is None else environ
    keys: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--api-keys: {p} is not a file")
        text = p.read_text()
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: invalid JSON ({e})") from None
            for tenant, ks in data.items():
                for k in [ks] if isinstance(ks, str) else list(ks):
                    _add(keys, str(tenant), str(k), str(p))
        else:
            keys.update(parse_pairs(text, str(p)))
    if environ.get(ENV_VAR):
        for k, t in parse_pairs(environ[ENV_VAR], ENV_VAR).items():
            _add(keys, t, k, ENV_VAR)
    return keys


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host in ("localhost", "testclient"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authenticator:
    def __init__(self, keys: dict[str, str]):
        self.keys = dict(keys)
        self.open = not keys  # single-tenant loopback mode

    def tenant_for(self, key: str | None, client_host: str | None) -> str:
        if self.open:
            if not is_loopback(client_host):
                raise AuthError("this server has no API keys configured and only serves loopback clients")
            return LOCAL_TENANT
        if not key:
            raise AuthError("missing API key (send it in the X-API-Key header)")
        for k, tenant in self.keys.items():
            if hmac.compare_digest(k.encode(), key.encode()):
                return tenant
        raise AuthError("invalid API key")
