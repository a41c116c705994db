"""The sampling side of `Service` (sampling sessions and `asample`): the request checked at the
door, then handed to the rollout engine or the scheduler. A mixin, so core.py stays the model
and session side."""

from __future__ import annotations

import math

from ..engine import SamplingParams
from .scheduler import Op
from .store import Invalid, Sampler

MAX_SEED = 2**63 - 1  # seeds are int64 (torch.Generator.manual_seed)


def check_seed(seed, what: str) -> int | None:
    """``seed`` as an int in [0, 2**63), None for None; Invalid otherwise (checked at the door)."""
    if seed is None:
        return None
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise Invalid(f"{what} must be an integer in [0, 2**63 - 1], got {seed!r}")
    return seed


class SamplingAPI:
    """Mixed into `Service`: uses its store, checkpoints, scheduler, budget, quotas and rollout."""

    def _register_loader(self, s: Sampler):
        src = s.source

        def loader(fleet, adapter):
            if src[0] == "peft":
                fleet.load_adapter(adapter, src[1])
            else:
                fleet.load_state(adapter, src[1])

        self.scheduler.register_sampler_loader(s.adapter_key, loader)

    def create_sampling_session(self, tenant: str, body: dict) -> dict:
        session = self.store.get_session(str(body.get("session_id")), tenant)
        sss = body.get("sampling_session_seq_id")
        if not isinstance(sss, int) or sss < 0:
            raise Invalid("sampling_session_seq_id must be a non-negative integer")
        base = self.check_base(body.get("base_model"))
        path = body.get("model_path")
        sid = f"{session.session_id}:sample:{sss}"
        s = Sampler(sid, tenant, session.session_id, base, model_path=path)
        if path is not None:
            kind, d = self.checkpoints.resolve(tenant, path)
            s.source = ("peft" if kind == "sampler_weights" else "state", d)
            s.adapter_key = f"{tenant}/{path}"
        self.store.add_sampler(s)
        if s.adapter_key:
            self._register_loader(s)
        return {"type": "create_sampling_session", "sampling_session_id": sid}

    def get_sampler(self, tenant: str, sampler_id: str) -> dict:
        s = self.store.get_sampler(sampler_id, tenant)
        return {"sampler_id": s.sampler_id, "base_model": s.base_model, "model_path": s.model_path}

    def asample(self, tenant: str, body: dict) -> dict:
        c = self.config
        self.quotas.check_queue(tenant)
        if body.get("sampling_session_id") is not None:
            s = self.store.get_sampler(str(body["sampling_session_id"]), tenant)
            if s.source is not None and s.source[0] == "pending":
                raise Invalid(f"sampling session {s.sampler_id!r} is not ready yet")
            if s.source is not None and s.source[0] == "lost":
                raise Invalid(f"sampling session {s.sampler_id!r} lost its weights: the server restarted while "
                              "saving them; save them again")
            adapter = s.adapter_key
        elif body.get("model_path") is not None:
            kind, d = self.checkpoints.resolve(tenant, body["model_path"])
            s = Sampler(f"adhoc:{body['model_path']}", tenant, "", self.base_name, body["model_path"],
                        ("peft" if kind == "sampler_weights" else "state", d), f"{tenant}/{body['model_path']}")
            self._register_loader(s)
            adapter = s.adapter_key
        else:
            self.check_base(body.get("base_model"))
            adapter, s = None, None
        prompt = _prompt_tokens(body.get("prompt"))
        if not prompt:
            raise Invalid("prompt has no tokens")
        if len(prompt) > c.max_prompt_tokens:
            raise Invalid(f"prompt has {len(prompt)} tokens; the limit is {c.max_prompt_tokens} (--max-prompt-tokens)")
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise Invalid(f"prompt token ids must be in [0, {self.vocab})")
        n = body.get("num_samples", 1)
        if not isinstance(n, int) or not 1 <= n <= c.max_samples:
            raise Invalid(f"num_samples must be an integer in [1, {c.max_samples}]")
        for k in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(k):
                raise Invalid(f"{k} is not supported by this server")
        if body.get("target_prompt_logprobs") is not None:
            raise Invalid("target_prompt_logprobs is not supported by this server")
        sp = body.get("sampling_params") or {}
        if not isinstance(sp, dict):
            raise Invalid("sampling_params must be an object")
        max_tokens = sp.get("max_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens  # 0 is refused below, not read as "unset"
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= c.max_sample_tokens:
            raise Invalid(f"sampling_params.max_tokens must be an integer in [1, {c.max_sample_tokens}]")
        stop = sp.get("stop")
        stop_on_eos = True
        if isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, list):
            if len(stop) == 0:
                stop_on_eos = False
            if any(isinstance(x, int) and not 0 <= x < self.vocab for x in stop):
                raise Invalid(f"stop token ids must be in [0, {self.vocab})")
        elif stop is not None:
            raise Invalid("sampling_params.stop must be a string, a list of strings or a list of token ids")
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=float(sp.get("temperature", 1.0)),
                                    top_p=float(sp.get("top_p", 1.0)), top_k=int(sp.get("top_k", -1)),
                                    stop=list(stop) if stop else None,
                                    seed=check_seed(sp.get("seed"), "sampling_params.seed"),
                                    stop_on_eos=stop_on_eos)
        except (TypeError, ValueError) as e:
            raise Invalid(f"sampling_params: {e}") from None
        if not (math.isfinite(params.temperature) and math.isfinite(params.top_p)):
            raise Invalid("sampling_params.temperature and top_p must be finite numbers")
        last_n = body.get("prompt_logprobs_last_n")
        if last_n is not None and (not isinstance(last_n, int) or not 1 <= last_n <= len(prompt) - 1):
            raise Invalid("prompt_logprobs_last_n must be between 1 and len(prompt) - 1")
        if self.rollout is not None and self.rollout.takes(s):  # the engine samples, off the scheduler thread
            self.rollout.check_door()
            rid = self._future(tenant, "sample")
            self.rollout.submit(rid, s, prompt, n, params, bool(body.get("prompt_logprobs")), last_n)
            return {"request_id": rid, "sample_sequence_ids": [f"{rid}:{j}" for j in range(n)]}
        self.budget.check_sample(n, len(prompt), max_tokens, bool(body.get("prompt_logprobs")))
        rid = self._future(tenant, "sample")
        self.scheduler.submit(Op(rid, tenant, "sample", sample={
            "adapter": adapter, "prompt": prompt, "num_samples": n, "params": params,
            "prompt_logprobs": bool(body.get("prompt_logprobs")), "prompt_logprobs_last_n": last_n}))
        return {"request_id": rid, "sample_sequence_ids": [f"{rid}:{j}" for j in range(n)]}


def _prompt_tokens(prompt) -> list[int]:
    if not isinstance(prompt, dict) or not isinstance(prompt.get("chunks"), list):
        raise Invalid("prompt must be {chunks: [{type: 'encoded_text', tokens: [...]}]}")
    out: list[int] = []
    for i, ch in enumerate(prompt["chunks"]):
        if not isinstance(ch, dict) or ch.get("type", "encoded_text") != "encoded_text":
            raise Invalid(f"prompt chunk {i}: only encoded_text chunks are supported")
        toks = ch.get("tokens")
        if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
            raise Invalid(f"prompt chunk {i}: tokens must be a list of integers")
        out.extend(toks)
    return out
