"""A small stand-in for an SGLang 0.5.23 server (stdlib http.server in a thread), for testing the
SGLang sink without a GPU. It checks requests the way SGLang does and answers in its format:

- field names from python/sglang/srt/managers/io_struct.py (``GenerateReqInput``,
  ``LoadLoRAAdapterReqInput``, ``UnloadLoRAAdapterReqInput``) and the sampling keys of the
  /generate JSON contract (python/sglang/api/v1/api_types.py: an unknown key is a 400 with
  ``{"error": "unknown field `x`, expected one of ..."}``). SGLang itself ignores unknown
  *top-level* fields; the fake refuses them too (400), so a misspelled field cannot pass here.
- errors as SGLang words them: ``{"error": {"message"}}`` for a refused generate,
  ``{"success": false, "error_message"}`` for a refused load (lora/lora_manager.py).
- a load reads the adapter directory as SGLang's LoRAConfig / LoRAAdapter do (adapter_config.json:
  peft_type LORA, r, lora_alpha, target_modules; adapter_model.safetensors with PEFT names) and
  checks every tensor's shape against the base model's config.json and ``--max-lora-rank``.

Its "model" is a deterministic function of the prompt and the loaded adapter's weights, so the
sink's token / logprob bookkeeping (and a push changing the output) can be checked exactly.
It also records what SGLang must never see: an unload of a name a request is using.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GENERATE_FIELDS = {
    "audio_data", "background", "bootstrap_host", "bootstrap_pair_key", "bootstrap_port", "bootstrap_room",
    "cache_salt", "conversation_id", "custom_labels", "custom_logit_processor", "data_parallel_rank",
    "decode_tp_size", "disagg_prefill_dp_rank", "encoder_urls", "external_trace_header", "extra_key",
    "http_worker_ipc", "image_data", "image_max_dynamic_patch", "images_config", "input_embeds", "input_ids",
    "kv_hints", "log_metrics", "logprob_start_len", "lora_id", "lora_path", "max_dynamic_patch",
    "max_thinking_tokens", "min_dynamic_patch", "mm_content_hashes", "mm_hashes", "mm_processor_kwargs",
    "modalities", "multi_item_delimiter_indices", "need_wait_for_mm_inputs", "no_logs", "num_items_assigned",
    "positional_embed_overrides", "priority", "received_time", "require_reasoning", "return_bytes",
    "return_entropy", "return_flat_raw_output_top_logprobs", "return_flat_raw_top_logprobs",
    "return_flat_raw_top_logprobs_b64", "return_hidden_states", "return_indexer_topk", "return_logprob",
    "return_prompt_token_ids", "return_routed_experts", "return_sampling_mask", "return_text_in_logprobs", "rid",
    "routed_dp_rank", "routed_experts_start_len", "routing_key", "sampling_logprobs_mode", "sampling_params",
    "session_id", "session_params", "stream", "text", "token_ids_logprob", "token_indices_to_pool",
    "top_logprobs_num", "use_audio_in_video", "video_config", "video_data", "video_max_dynamic_patch", "watermark"}
SAMPLING_KEYS = [  # in the contract's order (its error message lists them so)
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice"]
LOAD_FIELDS = {"rid", "http_worker_ipc", "lora_name", "lora_path", "pinned", "lora_id"}
UNLOAD_FIELDS = {"rid", "http_worker_ipc", "lora_name", "lora_id"}
CANDIDATES = 24  # the fake model's logits cover token ids [0, 24)
_NAME_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class BadRequest(Exception):
    def __init__(self, status, body):
        super().__init__(body)
        self.status, self.body = status, body


class FakeSGLang:
    def __init__(self, base_dir, *, enable_lora=True, max_lora_rank=16, max_loras_per_batch=8,
                 server_info=True, generate_delay_s=0.0, experts_shared_outer_loras=None):
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
        self.cfg, self.base_dir = cfg, str(base_dir)
        self.enable_lora, self.max_lora_rank, self.max_loras_per_batch = enable_lora, max_lora_rank, max_loras_per_batch
        self.serve_server_info, self.generate_delay_s = server_info, generate_delay_s
        self.experts_shared_outer_loras = experts_shared_outer_loras  # SGLang's default: None (auto-detected)
        eos = cfg.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.loaded: dict[str, float] = {}  # lora_name -> the adapter's weight signature
        self.in_flight: dict[str, int] = {}
        self.violations: list[str] = []
        self.requests: list[tuple[str, dict]] = []
        self.fail_next: list[tuple[int, dict | None]] = []  # (status, body); body None: drop the connection
        self.hold = False  # while True, a generate waits for `release` (a request kept in flight)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ the endpoints
    def server_info(self):
        if not self.serve_server_info:
            raise BadRequest(404, {"detail": "Not Found"})
        return {"model_path": self.base_dir, "enable_lora": self.enable_lora, "max_lora_rank": self.max_lora_rank,
                "max_loras_per_batch": self.max_loras_per_batch, "max_loaded_loras": None, "version": "0.5.23",
                "experts_shared_outer_loras": self.experts_shared_outer_loras}

    def load(self, body):
        _fields(body, LOAD_FIELDS, "LoadLoRAAdapterReqInput")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not isinstance(body.get("pinned", False), bool):
            raise BadRequest(400, {"detail": [{"msg": "lora_name and lora_path must be strings, pinned a bool"}]})
        if not self.enable_lora:
            return _lora_error("LoRA is not enabled. Please set `--enable-lora` to enable LoRA.")
        with self.lock:
            if name in self.loaded:
                return _lora_error(f"Failed to load LoRA adapter {name} because it is already loaded")
        try:
            signature = self._read_adapter(Path(path), name)
        except ValueError as e:
            return _lora_error(str(e))
        with self.lock:
            self.loaded[name] = signature
            return {"success": True, "error_message": None, "loaded_adapters": dict.fromkeys(self.loaded, "")}

    def unload(self, body):
        _fields(body, UNLOAD_FIELDS, "UnloadLoRAAdapterReqInput")
        name = body.get("lora_name")
        with self.lock:
            if self.in_flight.get(name):
                self.violations.append(f"unload of {name} while {self.in_flight[name]} request(s) use it")
            if name not in self.loaded:
                return _lora_error(f"LoRA with name {name} does not exist. Loaded LoRAs: {self.loaded.keys()}")
            del self.loaded[name]
            return {"success": True, "error_message": None, "loaded_adapters": dict.fromkeys(self.loaded, "")}

    def generate(self, body):
        _fields(body, GENERATE_FIELDS, "GenerateReqInput")
        ids = body.get("input_ids")
        single = isinstance(ids, list) and bool(ids) and all(isinstance(t, int) for t in ids)
        rows = [ids] if single else ids
        if not isinstance(rows, list) or not rows or not all(
                isinstance(r, list) and r and all(isinstance(t, int) and not isinstance(t, bool) for t in r)
                for r in rows):
            raise BadRequest(400, {"error": {"message": "input_ids should be a list of ints or a list of lists"}})
        sps = body.get("sampling_params") or {}
        sps = [sps] * len(rows) if isinstance(sps, dict) else sps
        if len(sps) != len(rows):
            raise BadRequest(400, {"error": {"message": "The length of sampling_params should equal the batch size"}})
        for sp in sps:
            bad = [k for k in sp if k not in SAMPLING_KEYS]
            if bad:
                raise BadRequest(400, {"error": f"unknown field `{bad[0]}`, expected one of "
                                                + ", ".join(f"`{k}`" for k in SAMPLING_KEYS)})
        lora = body.get("lora_path")
        loras = lora if isinstance(lora, list) else [lora] * len(rows)
        start = body.get("logprob_start_len", -1)
        with self.lock:
            for name in {n for n in loras if n is not None}:
                if not self.enable_lora:
                    raise BadRequest(400, {"error": {"message": f"LoRA adapter '{name}' was requested, but LoRA "
                                                                "is not enabled. Please launch the server with "
                                                                "--enable-lora"}})
                if name not in self.loaded:
                    raise BadRequest(400, {"error": {"message": "The following requested LoRA adapters are "
                                                                f"not loaded: {name}\nLoaded adapters: "
                                                                f"{list(self.loaded)}."}})
            sigs = [self.loaded.get(n, 0.0) if n else 0.0 for n in loras]
            for n in loras:
                if n:
                    self.in_flight[n] = self.in_flight.get(n, 0) + 1
        try:
            if self.hold:
                self.release.wait(30)
            if self.generate_delay_s:
                time.sleep(self.generate_delay_s)
            outs = [self._one(r, sp, sig, start, body.get("return_logprob"))
                    for r, sp, sig in zip(rows, sps, sigs)]
        finally:
            with self.lock:
                for n in loras:
                    if n:
                        self.in_flight[n] -= 1
        return outs[0] if single else outs

    # ------------------------------------------------------------------ the fake model
    def logprobs_next(self, prefix, signature):
        """log-softmax over CANDIDATES token ids, a function of the prefix and the adapter."""
        rng = random.Random(hash((tuple(prefix[-4:]), len(prefix), round(signature, 6))))
        logits = [rng.gauss(0.0, 2.0) for _ in range(CANDIDATES)]
        m = max(logits)
        z = m + math.log(sum(math.exp(x - m) for x in logits))
        return [x - z for x in logits]

    def _one(self, prompt, sp, sig, start, return_logprob):
        max_new = sp.get("max_new_tokens", 128)
        temperature, top_k = sp.get("temperature", 1.0), sp.get("top_k", -1)
        greedy = temperature < 1e-6 or top_k == 1
        rng = random.Random(sp.get("sampling_seed", 0))
        stops = set(sp.get("stop_token_ids") or []) | (set() if sp.get("ignore_eos") else self.eos)
        tokens, lps, seq, reason = [], [], list(prompt), {"type": "length", "length": max_new}
        for _ in range(max_new):
            lp = self.logprobs_next(seq, sig)
            if greedy:
                t = max(range(CANDIDATES), key=lp.__getitem__)
            else:
                t = rng.choices(range(CANDIDATES), weights=[math.exp(x / temperature) for x in lp])[0]
            tokens.append(t)
            lps.append(lp[t])
            seq.append(t)
            if t in stops:
                reason = {"type": "stop", "matched": t}
                break
        meta = {"id": f"{rng.random():.12f}", "finish_reason": reason, "prompt_tokens": len(prompt),
                "completion_tokens": len(tokens), "cached_tokens": 0}
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, tokens)]
            if start == 0:
                meta["input_token_logprobs"] = [[None, prompt[0], None]] + [
                    [self.logprobs_next(prompt[:i], sig)[prompt[i]] if prompt[i] < CANDIDATES else -30.0,
                     prompt[i], None] for i in range(1, len(prompt))]
        return {"text": "", "output_ids": tokens, "meta_info": meta}

    def _read_adapter(self, path: Path, name: str) -> float:
        """What SGLang's LoRAConfig + LoRAAdapter.initialize_weights need from the directory."""
        from safetensors.torch import load_file

        try:
            config = json.loads((path / "adapter_config.json").read_text())
            tensors = load_file(str(path / "adapter_model.safetensors"))
        except (OSError, ValueError) as e:
            raise ValueError(f"Failed to load LoRA adapter {name}: {e}") from None
        if str(config.get("peft_type", "")).lower() != "lora":
            raise ValueError(f"{name}: peft_type {config.get('peft_type')!r} is not LORA")
        r, targets = config["r"], set(config["target_modules"])
        config["lora_alpha"]  # noqa: B018 - SGLang reads it (scaling = alpha / r)
        if r > self.max_lora_rank:
            raise ValueError(f"LoRA adapter {name} with rank {r} is incompatible with the current LoRA memory pool "
                             "configuration. Please ensure that the LoRA adapter's rank is within the configured "
                             "`--max-lora-rank` and that the target modules are included in `--lora-target-modules`.")
        c = self.cfg
        head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        dims = {"q_proj": (c["hidden_size"], c["num_attention_heads"] * head),
                "k_proj": (c["hidden_size"], c["num_key_value_heads"] * head),
                "v_proj": (c["hidden_size"], c["num_key_value_heads"] * head),
                "o_proj": (c["num_attention_heads"] * head, c["hidden_size"]),
                "gate_proj": (c["hidden_size"], c["intermediate_size"]),
                "up_proj": (c["hidden_size"], c["intermediate_size"]),
                "down_proj": (c["intermediate_size"], c["hidden_size"])}
        _check_stacks(tensors, name)
        signature = 0.0
        for key, t in tensors.items():
            m = _NAME_RE.match(key)
            if not m or int(m.group(1)) >= c["num_hidden_layers"] or m.group(3) not in dims:
                raise ValueError(f"{name}: unexpected tensor {key}")
            if m.group(3) not in targets:
                raise ValueError(f"{name}: {key} is not in target_modules {sorted(targets)}")
            fin, fout = dims[m.group(3)]
            want = (r, fin) if m.group(4) == "A" else (fout, r)
            if tuple(t.shape) != want:
                raise ValueError(f"{name}: {key} has shape {list(t.shape)}, expected {list(want)}")
            signature += float(t.double().sum())
        return signature

    # ------------------------------------------------------------------ HTTP
    def _handler(self):
        fake = self
        routes = {("GET", "/server_info"): fake.server_info, ("POST", "/load_lora_adapter"): fake.load,
                  ("POST", "/unload_lora_adapter"): fake.unload, ("POST", "/generate"): fake.generate}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _serve(self, method):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                with fake.lock:
                    planned = fake.fail_next.pop(0) if fake.fail_next else None
                if planned is not None and planned[1] is None:
                    self.connection.close()  # a reset: no answer at all
                    return
                status, answer = 200, None
                try:
                    if planned is not None:
                        raise BadRequest(*planned)
                    fn = routes.get((method, self.path))
                    if fn is None:
                        raise BadRequest(404, {"detail": "Not Found"})
                    body = json.loads(raw) if raw else {}
                    with fake.lock:
                        fake.requests.append((self.path, body))
                    answer = fn() if method == "GET" else fn(body)
                    if isinstance(answer, tuple):
                        status, answer = answer
                except BadRequest as e:
                    status, answer = e.status, e.body
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

        return Handler


def _fields(body, allowed, what):
    if not isinstance(body, dict):
        raise BadRequest(400, {"detail": [{"msg": f"{what}: expected a JSON object"}]})
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(400, {"detail": [{"loc": ["body", unknown[0]], "msg": f"{what} has no field {unknown[0]!r}"}]})


def _check_stacks(tensors, name):
    """SGLang 0.5.23's LoRAAdapter._normalize_weights (srt/lora/lora.py): q/k/v are stacked into
    qkv_proj from the q_proj key, which looks v_proj up beside it (a bare KeyError when absent);
    gate/up into gate_up_proj from the gate_proj key. k/v without q and up without gate stay
    unstacked and match no target module: the pool skips them with a warning (an error here, as
    with SGLang's strict loading, so a push that would sample without them cannot pass)."""
    for key in tensors:
        if ".q_proj." in key and key.replace(".q_proj.", ".v_proj.") not in tensors:
            raise ValueError(f"Failed to load LoRA adapter {name}: KeyError: {key.replace('.q_proj.', '.v_proj.')!r}")
        for part, lead in ((".k_proj.", ".q_proj."), (".v_proj.", ".q_proj."), (".up_proj.", ".gate_proj.")):
            if part in key and key.replace(part, lead) not in tensors:
                raise ValueError(f"LoRA adapter '{name}': 1 weight(s) skipped because they did not match any target "
                                 f"module. Skipped weights: [{key!r}]")


def _lora_error(message):
    return 400, {"success": False, "error_message": message, "loaded_adapters": {}}
