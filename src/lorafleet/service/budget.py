"""Memory bounded by design: what one engine call may cost, derived from the model and a limit.

`lorafleet serve --memory-limit-mb` (default: 80 % of the machine's memory, or of the GPU's
when the fleet lives there) bounds the process. The base model and the server's own state,
measured once the fleet is built, plus a reserve for request bodies, are taken off; what is
left is the **work budget** of one engine call (the scheduler makes one call at a time). Every
call's peak is estimated from the model's shape:

* attention: eager and the CPU's SDPA fallback materialize ``heads × T × T`` scores (fp32
  softmax included) per row and layer, kept for the backward in every layer, and the
  ``[rows, 1, T, T]`` mask; a long datum is quadratic, so it is the attention term that makes
  one 32,768-token datum cost tens of GB;
* per token and layer: the activations (hidden, q/k/v, the experts' or MLP's intermediates)
  kept for the backward, times a safety factor;
* logits: ``chunk × vocab`` fp32 (the loss is chunked, engine/logprobs.py); sampling's prefill
  computes ``rows × prompt × vocab`` logits, and its KV cache grows to
  ``rows × (prompt + max_tokens) × layers × 2 × kv_dim``.

The estimate was checked against measured peaks on the debug qwen3_moe (forward_backward of
one datum: 1,024 tokens 144 MB measured vs 114 MB estimated... 3,072 tokens 641 vs 944 MB; see
tests/test_service_limits.py, which keeps a real server's VmHWM under its limit).

What it decides: a datum (or a DPO pair, or one sample request) whose cost alone exceeds the
work budget is refused at the door with a 400 naming the limit; a batch of several datums is cut
into micro-batches that each fit (`BudgetedFleet`; exact: losses are per-example sums and
gradients add up); a job whose micro-batch (``batch_size × max_length``) does not fit is
refused at submission.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .store import Invalid

MiB = 1 << 20
ATTN_SCORE_BYTES = 12  # per score: the scores, the fp32 softmax, one transient copy
ACTIVATION_FACTOR = 6  # saved tensors per (token, layer) width: measured ~3.2 on the debug MoE, doubled
PYTHON_TOKEN_BYTES = 200  # per token: the request's lists, Example lists, result lists and encodings
LOGPROB_CHUNK = 1024  # engine/training.py's logprob_chunk: rows of logits at once


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # intermediate width a token passes through per layer (top-k experts + shared, or the MLP)
    vocab: int
    act_bytes: int  # element size of the activations (the model's dtype)
    quadratic: bool  # attention materializes T × T scores (eager, SDPA on CPU); False for flash kernels

    @classmethod
    def of(cls, model) -> "ModelShape":
        c = model.config
        c = getattr(c, "text_config", None) or c
        hidden = int(c.hidden_size)
        heads = int(getattr(c, "num_attention_heads", 1) or 1)
        head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        n_exp = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or getattr(c, "n_routed_experts", None)
        if n_exp:
            top_k = int(getattr(c, "num_experts_per_tok", None) or getattr(c, "top_k", 2) or 2)
            inter = int(getattr(c, "moe_intermediate_size", None) or getattr(c, "intermediate_size", hidden))
            shared = int(getattr(c, "shared_expert_intermediate_size", 0) or 0)
            ffn = top_k * inter + shared + int(n_exp)  # + the router's logits
        else:
            ffn = int(getattr(c, "intermediate_size", 4 * hidden) or 4 * hidden)
        p = next(model.parameters())
        impl = str(getattr(c, "_attn_implementation", "eager") or "eager")
        quadratic = not ("flash" in impl or (impl == "sdpa" and p.device.type == "cuda"))
        return cls(layers=int(c.num_hidden_layers), hidden=hidden, heads=heads, kv_heads=kv, head_dim=head_dim,
                   ffn=ffn, vocab=int(model.get_output_embeddings().weight.shape[0]),
                   act_bytes=p.element_size(), quadratic=quadratic)

    @property
    def token_width(self) -> int:
        """Values per token and layer kept for the backward (before the safety factor)."""
        q, kv = self.heads * self.head_dim, 2 * self.kv_heads * self.head_dim
        return 2 * self.hidden + q + kv + 3 * self.ffn


def machine_memory_bytes(device: str = "cpu") -> int:
    """The memory of the device the fleet computes on: the GPU's, or the machine's RAM (a cgroup
    limit when it is smaller)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = open(f).read().strip()
        except OSError:
            continue
        if v.isdigit():
            total = min(total, int(v))
    return total


def process_memory_bytes(device: str = "cpu") -> int:
    """Memory this process uses now: VmRSS (CPU), or what torch has allocated on the GPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.memory_allocated())
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class MemoryBudget:
    """The work budget of one engine call and the estimates checked against it (module doc)."""

    MIN_WORK = 32 * MiB

    def __init__(self, shape: ModelShape, limit_bytes: int, baseline_bytes: int, reserve_bytes: int,
                 banks_bytes: int = 0):
        self.shape, self.limit, self.baseline, self.reserve = shape, int(limit_bytes), int(baseline_bytes), \
            int(reserve_bytes)
        self.banks = int(banks_bytes)  # LoRA banks allocated later (the LM head's), counted from the start
        self.work = self.limit - self.baseline - self.reserve - self.banks

    @classmethod
    def for_model(cls, model, limit_mb: int, max_body_bytes: int, device: str = "cpu",
                  banks_bytes: int = 0) -> "MemoryBudget":
        """The server's budget; ``limit_mb`` 0: 80 % of the device's memory. ``banks_bytes``: LoRA
        banks not allocated yet but expected (the LM head's, `unembed.head_bank_bytes`): they
        are taken off the work from the start, so what fits never shrinks when the first adapter
        allocates them. ValueError when the limit leaves less than 32 MiB for work."""
        limit = int(limit_mb) * MiB if limit_mb else int(0.8 * machine_memory_bytes(device))
        self = cls(ModelShape.of(model), limit, process_memory_bytes(device), 4 * max_body_bytes + 256 * MiB,
                   banks_bytes)
        if self.work < self.MIN_WORK:
            banks = f", the LM head's LoRA bank {self.banks // MiB} MiB" if self.banks else ""
            raise ValueError(
                f"--memory-limit-mb {self.limit // MiB} leaves no room for work: the base model and the server "
                f"take {self.baseline // MiB} MiB{banks} and {self.reserve // MiB} MiB are kept for request bodies "
                f"(4 x --max-body-bytes + 256 MiB); give at least "
                f"{(self.baseline + self.banks + self.reserve + self.MIN_WORK) // MiB}")
        return self

    # ------------------------------------------------------------------ estimates (bytes)
    def _attention(self, rows: int, t: int, layers_kept: int) -> int:
        s = self.shape
        if not s.quadratic:
            return 0
        return rows * t * t * (s.heads * ATTN_SCORE_BYTES * layers_kept + 4)  # + the [rows, 1, T, T] mask

    def train_bytes(self, lengths: list[int], forward_only: bool = False, dpo: bool = False) -> int:
        """One ``forward_backward`` over datums of these token counts (rows padded to the longest;
        dpo adds the reference rows)."""
        if not lengths:
            return 0
        s = self.shape
        rows, t = len(lengths) * (2 if dpo else 1), max(lengths)
        tokens = rows * t
        kept = 1 if forward_only else s.layers  # the backward keeps every layer's activations
        act = tokens * s.token_width * s.act_bytes * ACTIVATION_FACTOR * kept
        logits = min(tokens, LOGPROB_CHUNK) * s.vocab * 4 * 4
        return act + self._attention(rows, t, kept) + logits + tokens * PYTHON_TOKEN_BYTES

    def sample_bytes(self, rows: int, prompt: int, max_tokens: int) -> int:
        """One sampling call: ``rows`` sequences (num_samples each) of a ``prompt``-token prompt."""
        s = self.shape
        tokens = rows * prompt
        prefill = tokens * (s.token_width * s.act_bytes * ACTIVATION_FACTOR + s.vocab * s.act_bytes)
        kv = rows * (prompt + max_tokens) * s.layers * 2 * s.kv_heads * s.head_dim * s.act_bytes * 2
        return prefill + self._attention(rows, prompt, 1) + kv + rows * s.vocab * 4 * 3 \
            + rows * (prompt + max_tokens) * PYTHON_TOKEN_BYTES

    # ------------------------------------------------------------------ limits
    def max_datum_tokens(self, forward_only: bool = False) -> int:
        """The longest single datum one call can hold."""
        lo, hi = 0, 1 << 24
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.train_bytes([mid], forward_only) <= self.work:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def max_rows(self, length: int, forward_only: bool = False) -> int:
        """How many ``length``-token datums one call can hold."""
        if self.train_bytes([length], forward_only) > self.work:
            return 0
        lo, hi = 1, 1 << 24
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.train_bytes([length] * mid, forward_only) <= self.work:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _over(self, need: int) -> str:
        banks = f", {self.banks // MiB} MiB for the LM head's LoRA bank" if self.banks else ""
        return (f"needs about {math.ceil(need / MiB)} MiB, over the {self.work // MiB} MiB one step may use "
                f"(the server's --memory-limit-mb {self.limit // MiB}, less {self.baseline // MiB} MiB for the "
                f"base{banks} and {self.reserve // MiB} MiB reserved)")

    def check_datums(self, lengths: list[int], forward_only: bool, dpo: bool) -> None:
        """Invalid naming the limit when a datum (a DPO pair) alone does not fit in one call;
        several datums that fit one by one are cut into micro-batches by `BudgetedFleet`."""
        step = 2 if dpo else 1
        for i in range(0, len(lengths), step):
            need = self.train_bytes(lengths[i:i + step], forward_only, dpo)
            if need > self.work:
                what = f"dpo pair {i // 2}" if dpo else f"datum {i}"
                raise Invalid(f"{what} ({max(lengths[i:i + step])} tokens) {self._over(need)}; the longest datum "
                              f"this server takes is {self.max_datum_tokens(forward_only)} tokens")

    def check_sample(self, num_samples: int, prompt: int, max_tokens: int, prompt_logprobs: bool) -> None:
        need = self.sample_bytes(num_samples, prompt, max_tokens)
        if prompt_logprobs:
            need = max(need, self.train_bytes([prompt], forward_only=True))
        if need > self.work:
            raise Invalid(f"sampling {num_samples} x {max_tokens} tokens after a {prompt}-token prompt {self._over(need)}; "
                          "ask for fewer samples, fewer tokens or a shorter prompt")

    def check_job(self, batch_size: int, max_length: int, eval_batch_size: int) -> None:
        for what, rows, fwd in (("batch_size", batch_size, False), ("eval_batch_size", eval_batch_size, True)):
            need = self.train_bytes([max_length] * rows, forward_only=fwd)
            if need > self.work:
                most = self.max_rows(max_length, fwd)
                raise Invalid(f"{what} {rows} x max_length {max_length} tokens {self._over(need)}; at this max_length "
                              f"the most is {what} {most}" + ("" if most else " (shorten max_length)"))

    def micro_batches(self, lengths: list[int], forward_only: bool, dpo: bool) -> list[tuple[int, int]]:
        """Consecutive ``[start, end)`` ranges of the datums, each within the budget (DPO pairs
        stay together); one range when everything fits."""
        step = 2 if dpo else 1
        out, start = [], 0
        for i in range(step, len(lengths) + 1, step):
            if i - start > step and self.train_bytes(lengths[start:i], forward_only, dpo) > self.work:
                out.append((start, i - step))
                start = i - step
        out.append((start, len(lengths)))
        return out

    def describe(self) -> str:
        banks = f", LM head LoRA bank {self.banks // MiB} MiB" if self.banks else ""
        return (f"memory limit {self.limit // MiB} MiB (base and server {self.baseline // MiB} MiB{banks}, reserve "
                f"{self.reserve // MiB} MiB): {self.work // MiB} MiB per step, datums up to "
                f"{self.max_datum_tokens()} tokens ({self.max_rows(128)} x 128 tokens per step)")
