"""SGLang over HTTP (``rollout: {engine: sglang, url: ...}``): adapters pushed with
``POST /load_lora_adapter``, sampled with ``POST /generate``.

The request and response formats follow SGLang 0.5.23 (python/sglang/srt/entrypoints/http_server.py,
python/sglang/srt/managers/io_struct.py ``GenerateReqInput`` / ``LoadLoRAAdapterReqInput``,
python/sglang/srt/sampling/sampling_params.py, and the /generate JSON contract in
python/sglang/api/v1/api_types.py, which refuses unknown ``sampling_params`` keys with a 400):

- push: the ``sglang`` snapshot, with zero LoRAs for the q/k/v and gate/up members it lacks beside
  a targeted one (SGLang stacks those groups: ``with_stack_partners``), is written atomically
  (``Snapshot.write``) to ``adapter_dir/<name@vN>``, then ``{"lora_name", "lora_path", "pinned"}``
  is posted. SGLang has
  no in-place reload (a loaded name is refused: "already loaded"), so every version gets its own
  name ``name@vN`` (rollout/versions.py) and an old one is unloaded
  (``/unload_lora_adapter {"lora_name"}``) once no request of ours uses it.
- generate: one batch, each prompt repeated n times in order, one ``sampling_params`` dict per
  row (its own ``sampling_seed``), ``lora_path`` = the version's name, ``return_logprob: true``;
  tokens from ``output_ids``, logprobs from ``meta_info.output_token_logprobs``
  (``[logprob, token_id, text]`` per token).
- prompt logprobs: ``max_new_tokens: 0``, ``logprob_start_len: 0``,
  ``meta_info.input_token_logprobs`` (None at position 0).

A connection refused / reset or an HTTP 502/503/504 is retried ``request_retries`` times; any
other failure is a RolloutError of one line naming SGLang's answer (the RL job retries those
and then stops with a resumable checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..engine.sampling import SampledSequence, SamplingParams
from ..adapters.formats_layouts import sglang_dense_partners
from ..engine.snapshot import Snapshot
from .base import RolloutError, RolloutRefused
from .versions import AdapterVersions, check_max_versions

ENGINE = "sglang"
OPTIONS = {  # the engine's own options (beyond engine / url) -> what each must be
    "max_versions": "an integer >= 1",
    "pinned": "true or false",
    "adapter_dir": "a directory path the SGLang server can read",
    "timeout_s": "a number > 0",
    "request_retries": "an integer >= 0",
    "wait_s": "a number >= 0",
}
TRANSIENT_HTTP = (502, 503, 504)


def make_sglang_engine(spec: dict, *, base_dir: str, max_rank: int) -> SGLangEngine:
    """The SGLang sink of a ``rollout:`` spec: ``engine: sglang``, ``url``, and the options in
    OPTIONS; ValueError naming the field for anything else."""
    if not isinstance(spec, dict):
        raise ValueError(f"expected a mapping such as {{engine: sglang, url: http://127.0.0.1:30000}}, got {spec!r}")
    if spec.get("engine") != ENGINE:
        raise ValueError(f"engine: make_sglang_engine takes engine: sglang, got {spec.get('engine')!r}")
    unknown = sorted(set(spec) - {"engine", "url", *OPTIONS})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option for engine sglang (its options: url, {', '.join(OPTIONS)})")
    url = check_url(spec.get("url"))
    opts = {k: spec[k] for k in OPTIONS if k in spec}
    check_max_versions(opts.get("max_versions", 1), in_place=False)
    for key, ok in (("pinned", lambda v: isinstance(v, bool)),
                    ("adapter_dir", lambda v: isinstance(v, str) and v.strip() != ""),
                    ("timeout_s", lambda v: _number(v) and v > 0),
                    ("request_retries", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                    ("wait_s", lambda v: _number(v) and v >= 0)):
        if key in opts and not ok(opts[key]):
            raise ValueError(f"{key}: must be {OPTIONS[key]}, got {opts[key]!r}")
    return SGLangEngine(url, base_dir=base_dir, max_rank=max_rank, **opts)


def check_url(url) -> str:
    if not isinstance(url, str):
        raise ValueError(f"url: engine sglang needs the server's url (http://host:port), got {url!r}")
    parts = urllib.parse.urlsplit(url.strip())
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.query or parts.fragment:
        raise ValueError(f"url: engine sglang needs the server's url (http://host:port), got {url!r}")
    return url.strip().rstrip("/")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class SGLangEngine:
    """A running SGLang server the trainer pushes adapters into and samples from."""

    def __init__(self, url: str, *, base_dir: str, max_rank: int, max_versions: int = 1, pinned: bool = False,
                 adapter_dir: str | None = None, timeout_s: float = 600.0, request_retries: int = 2,
                 wait_s: float = 300.0, retry_wait_s: float = 0.5):
        self.url, self.base_dir, self.max_rank = check_url(url), base_dir, max_rank
        self.pinned, self.timeout_s = pinned, timeout_s
        self.request_retries, self.retry_wait_s = request_retries, retry_wait_s
        self.server_info = self._server_info()
        self._check_server(max_versions)
        self._own_dir = adapter_dir is None  # a temporary directory of ours, removed at close
        self.adapter_dir = Path(adapter_dir) if adapter_dir else Path(tempfile.mkdtemp(prefix="lorafleet-sglang-"))
        self.adapter_dir.mkdir(parents=True, exist_ok=True)  # an unwritable directory fails here, not at a push
        self.versions = AdapterVersions(self._load, self._unload, max_versions=max_versions, in_place=False,
                                        wait_s=wait_s)

    # ------------------------------------------------------------------ RolloutEngine
    def push(self, snap: Snapshot) -> str:
        """Load the snapshot as ``name@v{version}``; returns the adapter's name, which every
        later request resolves to the newest version pushed."""
        if snap.layout != "sglang":
            raise ValueError(f"engine sglang loads snapshots in the 'sglang' layout, got {snap.layout!r}")
        limit = self.server_info.get("max_lora_rank")
        if isinstance(limit, int) and snap.rank > limit:
            raise RolloutRefused(f"{self.where}: adapter {snap.name!r} has rank {snap.rank}, above the server's "
                               f"--max-lora-rank {limit}")
        try:
            snap = with_stack_partners(snap, self._base_config())
        except ValueError as e:
            raise RolloutError(f"{self.where}: adapter {snap.name!r}: {e}") from None
        refused = sglang_cannot_load(snap, self.server_info)
        if refused:
            raise RolloutRefused(f"{self.where}: adapter {snap.name!r}: {refused}")
        self.versions.push(snap.name, snap.version, snap)
        return snap.name

    def generate(self, adapter: str | None, prompts: list[list[int]], params: SamplingParams, n: int
                 ) -> list[list[SampledSequence]]:
        if not prompts:
            return []
        rows = [p for p in prompts for _ in range(n)]  # prompt-major, as the answer is read back
        body = {"input_ids": [list(map(int, p)) for p in rows],
                "sampling_params": [sampling_params(params, row) for row in range(len(rows))],
                "return_logprob": True}
        with self._adapter(adapter) as engine_name:
            if engine_name is not None:
                body["lora_path"] = engine_name
            out = self._post("/generate", body)
        outs = out if isinstance(out, list) else [out]
        if len(outs) != len(rows):
            raise RolloutError(f"{self.where}: /generate answered {len(outs)} completions for {len(rows)} requests")
        seqs = [_sampled(o, self.where) for o in outs]
        return [seqs[i * n:(i + 1) * n] for i in range(len(prompts))]

    def prompt_logprobs(self, adapter: str | None, tokens: list[int]) -> list[float | None]:
        if not tokens:
            return []
        body = {"input_ids": list(map(int, tokens)), "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                "return_logprob": True, "logprob_start_len": 0}
        with self._adapter(adapter) as engine_name:
            if engine_name is not None:
                body["lora_path"] = engine_name
            out = self._post("/generate", body)
        out = out[0] if isinstance(out, list) and len(out) == 1 else out
        entries = (out.get("meta_info") or {}).get("input_token_logprobs") if isinstance(out, dict) else None
        if not isinstance(entries, list) or len(entries) != len(tokens):
            raise RolloutError(f"{self.where}: /generate answered {_count(entries)} prompt logprobs for "
                               f"{len(tokens)} tokens")
        lps = [None]
        for i, e in enumerate(entries[1:], 1):
            if not (isinstance(e, (list, tuple)) and len(e) >= 2 and e[1] == tokens[i] and _is_float(e[0])):
                raise RolloutError(f"{self.where}: /generate prompt logprob {i} is {e!r} for token {tokens[i]}")
            lps.append(float(e[0]))
        return lps

    def close(self) -> None:
        """Unload our adapters from the server (best effort: it may be gone) and remove the
        temporary adapter directory."""
        try:
            self.versions.retire_all()
        finally:
            if self._own_dir:
                shutil.rmtree(self.adapter_dir, ignore_errors=True)

    # ------------------------------------------------------------------ the adapters
    @property
    def where(self) -> str:
        return f"rollout engine sglang at {self.url}"

    def _base_config(self) -> dict:
        """The base's config.json (what SGLang sizes its LoRA buffers from), {} if unreadable."""
        if not hasattr(self, "_base_cfg"):
            try:
                cfg = json.loads((Path(self.base_dir) / "config.json").read_text())
            except (OSError, ValueError):
                cfg = {}
            self._base_cfg = cfg if isinstance(cfg, dict) else {}
        return self._base_cfg

    def _adapter(self, adapter: str | None):
        if adapter is None:
            return _NoAdapter()
        return self.versions.use(adapter)

    def adapter_path(self, engine_name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._@-]", "_", engine_name)
        return self.adapter_dir / f"{safe}-{hashlib.sha1(engine_name.encode()).hexdigest()[:8]}"

    def _load(self, engine_name: str, snap: Snapshot, replace: bool) -> None:
        path = snap.write(self.adapter_path(engine_name))
        body = {"lora_name": engine_name, "lora_path": str(path), "pinned": self.pinned}
        try:
            self._post("/load_lora_adapter", body)
        except RolloutError as e:
            if "already loaded" not in str(e):
                raise
            # left by an earlier run (a resume): no request of ours uses it, so replace it
            self._post("/unload_lora_adapter", {"lora_name": engine_name})
            self._post("/load_lora_adapter", body)

    def _unload(self, engine_name: str) -> None:
        try:
            self._post("/unload_lora_adapter", {"lora_name": engine_name})
        except RolloutError as e:
            # gone already (a retried unload whose first answer was lost, a restarted server)
            if "does not exist" not in str(e):
                raise
        shutil.rmtree(self.adapter_path(engine_name), ignore_errors=True)

    # ------------------------------------------------------------------ the server
    def _server_info(self) -> dict:
        """SGLang's resolved server args (``GET /server_info``; ``/get_server_info`` before
        0.5.2x), or {} when neither answers: then the checks are left to the loads."""
        for path in ("/server_info", "/get_server_info"):
            try:
                info = self._request("GET", path, None)
            except RolloutError as e:
                if "HTTP 404" in str(e):
                    continue
                raise
            return info if isinstance(info, dict) else {}
        return {}

    def _check_server(self, max_versions: int) -> None:
        info = self.server_info
        if info.get("enable_lora") is False:
            raise RolloutError(f"{self.where}: the server was started without --enable-lora (start it with "
                               f"--enable-lora --max-lora-rank {self.max_rank} --lora-target-modules ...)")
        limit = info.get("max_lora_rank")
        if isinstance(limit, int) and limit < self.max_rank:
            raise RolloutError(f"{self.where}: the server's --max-lora-rank is {limit}, below the job's max_rank "
                               f"{self.max_rank}")
        per_batch = info.get("max_loras_per_batch")
        check_max_versions(max_versions, in_place=False,
                           engine_max_loras=per_batch if isinstance(per_batch, int) else None,
                           limit_flag="--max-loras-per-batch")

    def _post(self, path: str, body: dict):
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body):
        data = None if body is None else json.dumps(body).encode()
        last = None
        for attempt in range(self.request_retries + 1):
            if attempt:
                time.sleep(self.retry_wait_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                return json.loads(raw) if raw.strip() else None
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {_answer(e.read())}"
                if e.code not in TRANSIENT_HTTP:
                    break
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                last = _one_line(getattr(e, "reason", None) or e)
            except json.JSONDecodeError as e:
                last = f"the answer is not JSON ({e})"
                break
        raise RolloutError(f"{self.where}: {method} {path}: {last}")


class _NoAdapter:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def with_stack_partners(snap: Snapshot, base_config: dict) -> Snapshot:
    """The snapshot with zero LoRA factors for the q/k/v and gate/up members it lacks beside a
    targeted one (adapters/formats_layouts.sglang_dense_partners: SGLang 0.5.23 stacks these groups
    and fails on, or skips, an incomplete one; a zero LoRA changes nothing), their names added to
    ``target_modules``. Output sizes no present member gives come from the base's config.json as
    SGLang computes them (``get_default_hidden_dim``). ValueError when they cannot be known."""
    cfg = base_config.get("text_config") if isinstance(base_config.get("text_config"), dict) else base_config

    def out_features(path):
        name = path.rsplit(".", 1)[-1]
        try:
            head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
            heads = cfg["num_attention_heads"] if name == "q_proj" else cfg["num_key_value_heads"]
            return int(head) * int(heads) if name in ("q_proj", "k_proj", "v_proj") else None
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    partners = sglang_dense_partners(snap.tensors, out_features)
    if not partners:
        return snap
    names = {k[: -len(".lora_A.weight")].rsplit(".", 1)[-1] for k in partners if k.endswith(".lora_A.weight")}
    targets = snap.config.get("target_modules")
    config = {**snap.config, "target_modules": sorted(set(targets) | names) if isinstance(targets, list) else targets}
    return dataclasses.replace(snap, tensors={**snap.tensors, **partners}, config=config)


def sglang_cannot_load(snap: Snapshot, server_info: dict) -> str | None:
    """What SGLang 0.5.23 would load wrongly or refuse, said before the push. Its MoE LoRA pool is
    either per-expert or shared-outer for the whole server (``--experts-shared-outer-loras``,
    ``experts_shared_outer_loras`` in /server_info; None: detected from the adapters given at
    start). The per-expert pool copies expert e of a 3-D tensor into expert e only, so a
    shared-outer export (gate_up lora_A of expert dim 1) would give its shared factors to expert 0
    alone; the shared-outer pool refuses a per-expert one."""
    if "experts_shared_outer_loras" not in server_info:
        return None  # an older server, or none answered /server_info: its load decides
    mode = server_info["experts_shared_outer_loras"]
    def factors(suffix):
        return [t for k, t in snap.tensors.items() if k.endswith(suffix) and t.dim() == 3]

    gate_up_a, down_a = factors("experts.gate_up_proj.lora_A.weight"), factors("experts.down_proj.lora_A.weight")
    if not gate_up_a:
        return None
    # formats_layouts.sglang_write: expert dim 1 (on a base of several experts) only when shared-outer
    shared_outer = any(t.shape[0] == 1 for t in gate_up_a) and any(t.shape[0] > 1 for t in down_a)
    if shared_outer and mode is not True:
        return ("expert_sharing shared_outer: its shared gate_up A / down B need SGLang's shared-outer pool, but the "
                f"server's experts_shared_outer_loras is {mode!r} (its per-expert pool would give them to expert 0 "
                "only); start it with --experts-shared-outer-loras")
    if mode is True and not shared_outer and any(t.shape[0] > 1 for t in gate_up_a):
        return ("its experts LoRA is per expert, but the server runs the shared-outer pool "
                "(--experts-shared-outer-loras), which takes only expert_sharing shared_outer adapters")
    return None


def sampling_params(params: SamplingParams, row: int) -> dict:
    """SGLang's ``sampling_params`` for one row (only the keys its JSON contract admits)."""
    out = {"max_new_tokens": int(params.max_tokens), "temperature": float(params.temperature),
           "top_p": float(params.top_p), "top_k": int(params.top_k)}
    strs = [s for s in params.stop or [] if isinstance(s, str)]
    ids = [s for s in params.stop or [] if not isinstance(s, str)]
    if strs:
        out["stop"] = strs
    if ids:
        out["stop_token_ids"] = ids
    if not params.stop_on_eos:
        out["ignore_eos"] = True
    if params.seed is not None:  # one seed per row, or n samples of a prompt would be equal
        out["sampling_seed"] = (int(params.seed) + row) % (2 ** 63)
    return out


def _sampled(out, where: str) -> SampledSequence:
    if not isinstance(out, dict) or not isinstance(out.get("meta_info"), dict):
        raise RolloutError(f"{where}: /generate answered {str(out)[:200]!r}, not a completion")
    meta = out["meta_info"]
    tokens = out.get("output_ids")
    entries = meta.get("output_token_logprobs")
    if not isinstance(tokens, list) or not isinstance(entries, list) or len(entries) != len(tokens):
        raise RolloutError(f"{where}: /generate answered {_count(tokens)} tokens with {_count(entries)} logprobs "
                           "(sampling logprobs are needed)")
    lps = []
    for t, e in zip(tokens, entries):
        if not (isinstance(e, (list, tuple)) and len(e) >= 2 and e[1] == t and _is_float(e[0])):
            raise RolloutError(f"{where}: /generate logprob entry {e!r} does not match token {t}")
        lps.append(float(e[0]))
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "abort":
        raise RolloutError(f"{where}: /generate aborted the request: {_one_line(reason.get('message', reason))}")
    return SampledSequence(tokens=[int(t) for t in tokens], logprobs=lps,
                           stop_reason="length" if kind == "length" else "stop")


def _answer(raw: bytes) -> str:
    """SGLang's error text: ``{"error": {"message"}}`` (a refused generate),
    ``{"error": "..."}`` (the JSON contract), ``{"error_message"}`` (a LoRA load), else the body."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _one_line(raw.decode("utf-8", "replace")) or "(empty answer)"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return _one_line(err["message"])
        detail = body.get("detail")
        if isinstance(detail, list) and detail and all(isinstance(x, dict) for x in detail):  # FastAPI's 422 / 400
            detail = "; ".join(".".join(str(p) for p in (x.get("loc") or [])[1:]) + ": " + str(x.get("msg"))
                               if x.get("loc") else str(x.get("msg")) for x in detail)
        for text in (err, body.get("error_message"), body.get("message"), detail):
            if text:
                return _one_line(text)
    return _one_line(json.dumps(body))


def _one_line(x) -> str:
    text = " ".join(str(x).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _is_float(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _count(x) -> str:
    return str(len(x)) if isinstance(x, list) else "no"
