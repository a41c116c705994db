"""The vLLM sink over HTTP: snapshots pushed with ``POST /v1/load_lora_adapter`` (in place),
samples from ``/v1/completions`` with token-id prompts and per-token sampling logprobs.

vLLM 0.32's OpenAI server, as read in its source (entrypoints/openai/completion/protocol.py,
entrypoints/serve/lora/): ``prompt`` takes token ids; ``logprobs: 0`` returns the sampled token's
logprob at each step (vLLM's default ``--logprobs-mode raw_logprobs``: the model's own
distribution before temperature / top-k / top-p, as lorafleet's sampler reports it);
``return_token_ids`` returns the sampled ids; ``prompt_logprobs: 0`` returns each prompt token's
logprob (``max_tokens`` must be >= 1). The server does not report its ``--max-lora-rank``, so the
rank check before a push uses ``max_lora_rank`` from the spec (vllm-local knows its own).

Each push writes the snapshot to a NEW directory (``adapter_dir/<name>/v<version>-<id>``) and
then loads it in place under the adapter's name: vLLM keys its prefix cache on (name, path), so
reloading changed weights from the same path would serve stale cached blocks (vLLM warns so).
The previous directory of that adapter is removed once the new one is loaded.

``max_versions`` K > 1 (asynchronous rollouts): each push loads ``name@v<version>`` instead, the
newest K stay loaded and older ones are unloaded once no request uses them (`versions.py`);
the server needs ``--max-loras`` >= K+1.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from ..engine.sampling import SampledSequence, SamplingParams
from ..engine.snapshot import Snapshot
from .base import RolloutError, RolloutRefused
from .http import EngineHTTP
from .versions import AdapterVersions, check_max_versions

_INT64 = 2**63
_NO_LORA_HINT = "the engine runs without LoRA: start vLLM with --enable-lora (and --max-lora-rank / --max-loras)"
_NO_ROUTE_HINT = ("the engine does not accept adapter loads: start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 "
                  "in its environment and --enable-lora")


def file_rank(snap: Snapshot) -> int:
    """The largest rank in the adapter's files (PEFT ``r`` and any ``rank_pattern`` entry): what
    vLLM compares with its ``--max-lora-rank``."""
    ranks = [int(snap.config.get("r") or snap.rank)]
    ranks += [int(v) for v in (snap.config.get("rank_pattern") or {}).values()]
    return max(ranks)


def is_3d_moe(snap: Snapshot) -> bool:
    """A PEFT-layout snapshot with 3-D expert tensors (``target_parameters``): vLLM loads it only
    with ``is_3d_lora_weight`` on the request and ``--enable-mixed-moe-lora-format`` on the server."""
    return snap.layout == "peft" and any(t.dim() == 3 for t in snap.tensors.values())


class VLLMEngine:
    """A running vLLM OpenAI server (``vllm serve BASE --enable-lora``) as a `RolloutEngine`."""

    kind = "vllm"

    def __init__(self, url: str, *, max_lora_rank: int | None = None, adapter_dir: str | None = None,
                 timeout_s: float = 300.0, max_versions: int = 1, max_loras: int | None = None,
                 max_parallel: int = 16):
        if max_lora_rank is not None and (isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int)
                                          or max_lora_rank < 1):
            raise ValueError(f"max_lora_rank must be an integer >= 1 (the server's --max-lora-rank), "
                             f"got {max_lora_rank!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
        self.http = EngineHTTP(url, engine=self.kind, timeout=timeout_s)
        self.url = self.http.url
        self.max_lora_rank = max_lora_rank
        self.max_parallel = max_parallel
        self._own_dir = adapter_dir is None
        self.adapter_dir = Path(adapter_dir) if adapter_dir else Path(tempfile.mkdtemp(prefix="lorafleet-vllm-"))
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        check_max_versions(max_versions, in_place=True, engine_max_loras=max_loras)
        # K=1: the plain name, replaced in place; K>1: name@vN, the newest K kept (versions.py)
        self.versions = AdapterVersions(self._load, self.unload, max_versions=max_versions, in_place=True)
        self.paths: dict[str, Path] = {}  # engine name -> the directory the engine loaded it from
        self.base_model = self._base_model()  # also proves the server answers

    def _base_model(self) -> str:
        models = self.http.get("/v1/models", timeout=30)
        data = models.get("data") if isinstance(models, dict) else None
        bases = [m["id"] for m in data or [] if isinstance(m, dict) and m.get("id") and not m.get("parent")]
        if not bases:
            raise RolloutError(f"vllm at {self.url}: GET /v1/models named no base model ({str(models)[:200]})")
        return bases[0]

    # ------------------------------------------------------------------------------ pushes
    def push(self, snap: Snapshot) -> str:
        if snap.layout not in ("peft", "vllm"):
            raise RolloutRefused(f"vllm takes adapters in the peft or vllm layout, not {snap.layout!r}")
        rank = file_rank(snap)
        if self.max_lora_rank is not None and rank > self.max_lora_rank:
            raise RolloutRefused(f"vllm at {self.url}: adapter {snap.name!r} has rank {rank}, above the engine's "
                               f"--max-lora-rank {self.max_lora_rank}; not pushed (restart vLLM with "
                               f"--max-lora-rank >= {rank} or lower the adapter's rank)")
        path = self.adapter_dir / _safe(snap.name) / f"v{snap.version}-{uuid.uuid4().hex[:8]}"
        snap.write(path)
        try:
            engine_name = self.versions.push(snap.name, snap.version, (path, is_3d_moe(snap)))
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        if self.paths.get(engine_name) != path:  # that version was loaded already: this copy is unused
            shutil.rmtree(path, ignore_errors=True)
        return engine_name

    def _load(self, engine_name: str, payload, replace: bool) -> None:
        """AdapterVersions' load: the directory under ``engine_name``, in place (a new name is
        loaded the same way); the directory it replaces is removed once the load succeeded."""
        path, is_3d = payload
        body = {"lora_name": engine_name, "lora_path": str(path.resolve()), "load_inplace": True}
        if is_3d:
            body["is_3d_lora_weight"] = True
        try:
            self.http.post("/v1/load_lora_adapter", body)
        except RolloutError as e:
            hint = self._hint(str(e))
            # an engine without LoRA answers the same to every retry
            kind = RolloutRefused if hint == _NO_LORA_HINT else RolloutError
            raise kind(f"{e} ({hint})" if hint else str(e)) from None
        old, self.paths[engine_name] = self.paths.get(engine_name), path
        if old is not None and old != path:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _hint(message: str) -> str | None:
        if "LoRA is not enabled" in message:
            return _NO_LORA_HINT
        if "HTTP 404: Not Found" in message:
            return _NO_ROUTE_HINT
        return None

    def unload(self, engine_name: str) -> None:
        """Unload one engine name (an old ``name@vN``) and remove its directory."""
        # a short timeout: close() unloads every adapter, and a vanished host must not hold it for long
        self.http.post("/v1/unload_lora_adapter", {"lora_name": engine_name}, timeout=min(self.http.timeout, 30.0))
        path = self.paths.pop(engine_name, None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def _serving(self, adapter: str | None):
        """``with`` the engine name to send for ``adapter``: an adapter pushed here is counted in
        use (its version is not unloaded meanwhile); anything else (None: the base, an engine
        name such as ``a@v3``) is sent as it is."""
        if adapter is not None and self.versions.current(adapter) is not None:
            return self.versions.use(adapter)
        return nullcontext(adapter)

    # ---------------------------------------------------------------------------- sampling
    def generate(self, adapter: str | None, prompts: list[list[int]], params: SamplingParams, n: int
                 ) -> list[list[SampledSequence]]:
        """One request per prompt (sent concurrently: vLLM batches them), each with ``n`` samples.
        Prompt i gets seed ``params.seed + i``: one seed for every prompt would give them all the
        same random draws. Greedy (temperature 0): vLLM refuses ``n > 1``, so one sample is asked
        for and copied ``n`` times (what lorafleet's sampler returns then too)."""
        if not prompts:
            return []
        asked = 1 if params.temperature == 0 else n
        with self._serving(adapter) as model:
            bodies = [self._completion_body(model, p, params, asked, i) for i, p in enumerate(prompts)]
            if len(bodies) == 1:
                answers = [self.http.post("/v1/completions", bodies[0])]
            else:
                with ThreadPoolExecutor(max_workers=min(self.max_parallel, len(bodies))) as pool:
                    answers = list(pool.map(lambda b: self.http.post("/v1/completions", b), bodies))
        groups = [self._sequences(a, asked) for a in answers]
        if asked != n:
            groups = [[SampledSequence(list(g[0].tokens), list(g[0].logprobs), g[0].stop_reason) for _ in range(n)]
                      for g in groups]
        return groups

    def _completion_body(self, adapter, prompt, params: SamplingParams, n: int, i: int) -> dict:
        body = {"model": adapter or self.base_model, "prompt": [list(prompt)], "n": n,
                "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "top_k": params.top_k, "logprobs": 0, "return_token_ids": True,
                "stop": [s for s in params.stop or [] if isinstance(s, str)],
                "stop_token_ids": [s for s in params.stop or [] if isinstance(s, int)],
                "ignore_eos": not params.stop_on_eos}
        if params.seed is not None:
            body["seed"] = (params.seed + i + _INT64) % (2 * _INT64) - _INT64  # inside vLLM's int64 range
        return body

    def _sequences(self, answer, n: int) -> list[SampledSequence]:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != n:
            raise RolloutError(f"vllm at {self.url}: /v1/completions returned "
                               f"{len(choices) if isinstance(choices, list) else 'no'} choices for n={n}")
        out = []
        for c in sorted(choices, key=lambda c: c.get("index", 0)):
            tokens = c.get("token_ids")
            logprobs = (c.get("logprobs") or {}).get("token_logprobs")
            if not isinstance(tokens, list) or not isinstance(logprobs, list) or len(tokens) != len(logprobs):
                raise RolloutError(f"vllm at {self.url}: a completion without token ids and their logprobs "
                                   f"({str(c)[:200]})")
            if c.get("finish_reason") not in ("stop", "length"):
                raise RolloutError(f"vllm at {self.url}: a completion finished with {c.get('finish_reason')!r}")
            out.append(SampledSequence(list(tokens), [_finite(x) for x in logprobs], c["finish_reason"]))
        return out

    def prompt_logprobs(self, adapter: str | None, tokens: list[int]) -> list[float | None]:
        if not tokens:
            return []
        with self._serving(adapter) as model:
            answer = self.http.post("/v1/completions", {
                "model": model or self.base_model, "prompt": [list(tokens)], "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": 0})
        try:
            per_pos = answer["choices"][0]["prompt_logprobs"]
            out = [None] + [float(d[str(t)]["logprob"]) for d, t in zip(per_pos[1:], tokens[1:], strict=True)]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise RolloutError(f"vllm at {self.url}: prompt_logprobs answer without the prompt tokens' "
                               f"logprobs ({type(e).__name__}: {e})") from None
        return out

    def close(self) -> None:
        try:
            self.versions.retire_all()  # old name@vN versions leave the engine (K=1 keeps its name loaded)
        except Exception:  # noqa: BLE001 - an engine already gone has nothing left to unload
            pass
        if self._own_dir:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def _finite(x) -> float:
    v = float(x) if x is not None else math.nan
    if not math.isfinite(v) and v != -math.inf:
        raise RolloutError(f"vllm returned a sampling logprob of {x!r}")
    return v
