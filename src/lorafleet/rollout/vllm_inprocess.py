"""vLLM in the trainer's own process (``rollout: {engine: vllm-inprocess}``): ``vllm.LLM(...,
enable_lora=True)`` on the base directory, adapters as ``LoRARequest(name, int_id, path)``.

Only for an environment where lorafleet and vLLM share one venv (vLLM pins its own torch and
``transformers<5.20``; lorafleet runs from source there). vLLM's V1 engine starts a worker
process, so a script that builds this engine must do it under ``if __name__ == "__main__":``.

Pushes write the snapshot atomically to ``adapter_dir/<name>`` and register it with
``llm_engine.add_lora``: with ``max_versions: 1`` (default) in place (``load_inplace``, same name and
int id), otherwise under versioned names ``name@vN`` with fresh int ids, old ones removed with
``remove_lora`` once no request uses them (rollout/versions.py). Sampling mirrors the vLLM HTTP
sink (rollout/vllm.py): prompt i gets seed ``seed + i``; greedy asks one sample and copies it
(vLLM refuses ``n > 1`` at temperature 0); the sampled token's logprob (``logprobs=0``) is the
behaviour policy. Calls into ``LLM`` are serialized (it is not thread-safe).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import threading
from pathlib import Path

from ..engine.sampling import SampledSequence, SamplingParams
from ..engine.snapshot import Snapshot
from ..utils.values import one_line
from .base import RolloutError, RolloutRefused
from .versions import AdapterVersions, check_max_versions, slots_needed

ENGINE = "vllm-inprocess"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
OPTIONS = ("max_versions", "max_loras", "adapter_dir", "dtype", "max_model_len", "enforce_eager",
           "gpu_memory_utilization")
_INT64 = 2 ** 63


def make_vllm_inprocess_engine(spec: dict, *, base_dir: str, max_rank: int) -> VLLMInProcessEngine:
    """The in-process vLLM sink of a ``rollout:`` spec; ValueError naming a bad field."""
    if spec.get("engine") != ENGINE:
        raise ValueError(f"engine: make_vllm_inprocess_engine takes engine: {ENGINE}, got {spec.get('engine')!r}")
    unknown = sorted(set(spec) - {"engine", *OPTIONS})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option for engine {ENGINE} (its options: {', '.join(OPTIONS)})"
                         + ("; it runs in this process and takes no url" if unknown[0] == "url" else ""))
    opts = {k: spec[k] for k in OPTIONS if k in spec}
    for key in ("max_loras", "max_model_len"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{key}: must be an integer >= 1, got {v!r}")
    if "enforce_eager" in opts and not isinstance(opts["enforce_eager"], bool):
        raise ValueError(f"enforce_eager: must be true or false, got {opts['enforce_eager']!r}")
    g = opts.get("gpu_memory_utilization")
    if g is not None and not (isinstance(g, (int, float)) and not isinstance(g, bool) and 0 < g <= 1):
        raise ValueError(f"gpu_memory_utilization: must be a number in (0, 1], got {g!r}")
    return VLLMInProcessEngine(base_dir, max_rank=max_rank, **opts)


class VLLMInProcessEngine:
    def __init__(self, base_dir, *, max_rank: int, max_versions: int = 1, max_loras: int | None = None,
                 adapter_dir: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 enforce_eager: bool = True, gpu_memory_utilization: float | None = None, llm=None):
        """``llm``: an ``LLM`` built by the caller (then the other engine options are its own)."""
        check_max_versions(max_versions, in_place=True)
        need = slots_needed(max_versions, in_place=True)
        max_loras = need if max_loras is None else max_loras
        check_max_versions(max_versions, in_place=True, engine_max_loras=max_loras, limit_flag="max_loras")
        self.engine_rank = next((r for r in VLLM_RANKS if r >= max_rank), None)
        if self.engine_rank is None:
            raise ValueError(f"max_rank {max_rank} is above vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}")
        self.base_dir, self.max_rank = str(base_dir), max_rank
        self._lock = threading.RLock()
        if llm is None:
            from vllm import LLM

            kw = {"gpu_memory_utilization": gpu_memory_utilization} if gpu_memory_utilization else {}
            try:
                llm = LLM(model=self.base_dir, enable_lora=True, max_lora_rank=self.engine_rank, max_loras=max_loras,
                          dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager, **kw)
            except Exception as e:  # noqa: BLE001 - vLLM's own start errors, one line
                raise RolloutError(f"{self.where}: vLLM did not start on {self.base_dir}: {_one_line(e)}") from None
        self.llm = llm
        self._own_dir = adapter_dir is None
        self.adapter_dir = Path(adapter_dir) if adapter_dir else Path(tempfile.mkdtemp(prefix="lorafleet-vllm-"))
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self._requests: dict[str, object] = {}  # engine name -> its LoRARequest
        self._next_id = 1
        self.versions = AdapterVersions(self._load, self._unload, max_versions=max_versions, in_place=True)

    where = f"rollout engine {ENGINE}"

    # ------------------------------------------------------------------ RolloutEngine
    def push(self, snap: Snapshot) -> str:
        if snap.layout not in ("peft", "vllm"):
            raise ValueError(f"engine {ENGINE} loads snapshots in the 'peft' or 'vllm' layout, got {snap.layout!r}")
        if snap.rank > self.engine_rank:
            raise RolloutRefused(f"{self.where}: adapter {snap.name!r} has rank {snap.rank}, above --max-lora-rank "
                               f"{self.engine_rank}")
        self.versions.push(snap.name, snap.version, snap)
        return snap.name

    def generate(self, adapter: str | None, prompts: list[list[int]], params: SamplingParams, n: int
                 ) -> list[list[SampledSequence]]:
        if not prompts:
            return []
        from vllm import SamplingParams as VLLMSamplingParams

        asked = 1 if params.temperature == 0 else n
        sps = [VLLMSamplingParams(
            n=asked, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, logprobs=0, ignore_eos=not params.stop_on_eos,
            stop=[s for s in params.stop or [] if isinstance(s, str)] or None,
            stop_token_ids=[s for s in params.stop or [] if not isinstance(s, str)] or None,
            seed=None if params.seed is None else (params.seed + i + _INT64) % (2 * _INT64) - _INT64)
            for i in range(len(prompts))]
        outs = self._run(adapter, [{"prompt_token_ids": list(map(int, p))} for p in prompts], sps)
        groups = [self._sequences(o, asked) for o in outs]
        if asked != n:
            groups = [[SampledSequence(list(g[0].tokens), list(g[0].logprobs), g[0].stop_reason) for _ in range(n)]
                      for g in groups]
        return groups

    def prompt_logprobs(self, adapter: str | None, tokens: list[int]) -> list[float | None]:
        if not tokens:
            return []
        from vllm import SamplingParams as VLLMSamplingParams

        (out,) = self._run(adapter, [{"prompt_token_ids": list(map(int, tokens))}],
                           [VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)])
        per_pos = out.prompt_logprobs or []
        try:
            return [None] + [float(d[t].logprob) for d, t in zip(per_pos[1:], tokens[1:], strict=True)]
        except (KeyError, TypeError, ValueError) as e:
            raise RolloutError(f"{self.where}: prompt logprobs without the prompt tokens' ({type(e).__name__}: {e})"
                               ) from None

    def close(self) -> None:
        try:
            self.versions.retire_all()
            with self._lock:
                core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
                if core is not None and hasattr(core, "shutdown"):
                    core.shutdown()
                self.llm = None
        finally:
            if self._own_dir:
                shutil.rmtree(self.adapter_dir, ignore_errors=True)

    # ------------------------------------------------------------------ internals
    def _run(self, adapter, prompts, sps):
        with (self.versions.use(adapter) if adapter is not None else _NoAdapter()) as engine_name:
            req = self._requests.get(engine_name) if engine_name else None
            with self._lock:
                try:
                    return self.llm.generate(prompts, sps, lora_request=req, use_tqdm=False)
                except Exception as e:  # noqa: BLE001 - vLLM's refusal, one line
                    raise RolloutError(f"{self.where}: generate failed: {_one_line(e)}") from None

    def _sequences(self, out, n: int) -> list[SampledSequence]:
        if len(out.outputs) != n:
            raise RolloutError(f"{self.where}: {len(out.outputs)} completions for n={n}")
        seqs = []
        for c in out.outputs:
            tokens, lps = list(c.token_ids), c.logprobs
            if lps is None or len(lps) != len(tokens):
                raise RolloutError(f"{self.where}: a completion without its sampling logprobs")
            if c.finish_reason not in ("stop", "length"):
                raise RolloutError(f"{self.where}: a completion finished with {c.finish_reason!r}")
            seqs.append(SampledSequence(tokens, [float(d[t].logprob) for d, t in zip(lps, tokens)], c.finish_reason))
        return seqs

    def _path(self, engine_name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._@-]", "_", engine_name)
        return self.adapter_dir / f"{safe}-{hashlib.sha1(engine_name.encode()).hexdigest()[:8]}"

    def _load(self, engine_name: str, snap: Snapshot, replace: bool) -> None:
        from vllm.lora.request import LoRARequest

        path = snap.write(self._path(engine_name))
        with self._lock:
            old = self._requests.get(engine_name)
            if replace and old is not None:  # in place: same name and int id, vLLM reloads the files
                int_id = old.lora_int_id
            else:  # a new name needs a new id: vLLM caches adapters by lora_int_id
                int_id, self._next_id = self._next_id, self._next_id + 1
            moe_3d = snap.layout == "peft" and any(t.dim() == 3 for t in snap.tensors.values())
            req = LoRARequest(engine_name, int_id, str(path), load_inplace=replace, is_3d_lora_weight=moe_3d)
            try:
                ok = self.llm.llm_engine.add_lora(req)
            except Exception as e:  # noqa: BLE001 - vLLM's refusal (shapes, rank, modules), one line
                raise RolloutError(f"{self.where}: loading adapter {engine_name} failed: {_one_line(e)}") from None
            if ok is False:
                raise RolloutError(f"{self.where}: vLLM refused adapter {engine_name} (add_lora returned False)")
            self._requests[engine_name] = LoRARequest(engine_name, int_id, str(path), is_3d_lora_weight=moe_3d)

    def _unload(self, engine_name: str) -> None:
        with self._lock:
            req = self._requests.pop(engine_name, None)
            if req is not None and self.llm is not None:
                self.llm.llm_engine.remove_lora(req.lora_int_id)
        shutil.rmtree(self._path(engine_name), ignore_errors=True)


class _NoAdapter:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _one_line(e) -> str:
    return one_line(e, limit=300)
