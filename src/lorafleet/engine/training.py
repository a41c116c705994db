"""Training on a fleet: `forward_backward` over mixed-adapter examples, per-adapter `optim_step`.

Every adapter keeps its own optimizer config, AdamW moments, step count and pending-gradient
flag. Gradients accumulate across `forward_backward` calls until that adapter's `optim_step`;
the losses are per-example sums, so nothing one adapter computes depends on another adapter's
rows. fp32 factors accumulate in the slot tensors' ``.grad``. Low-precision (bf16/fp16) factors
accumulate in fp32: after each backward the adapter's rank-sliced bank gradient is moved (added,
then zeroed) into an fp32 buffer of its own (``AdapterTrainState.grad_acc``), so summing many
micro-batches does not round at bf16 precision each time. fp16 also scales each adapter's loss
by its `LossScaler` before backward and unscales when moving the gradient.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from ..types import Example
from .logprobs import token_logprobs
from .losses import NEEDS, dpo, example_loss, resolve_config
from .optim import AdamState, LossScaler, OptimConfig, adamw_step, grad_norm, low_precision


@dataclass
class AdapterTrainState:
    optim: OptimConfig = field(default_factory=OptimConfig)
    adam: AdamState = field(default_factory=AdamState)
    pending: bool = False  # gradients accumulated since the last optim_step
    # fp32 gradient sums of low-precision factors (keys of adapter_views), while pending
    grad_acc: dict[str, torch.Tensor] = field(default_factory=dict)
    scaler: LossScaler | None = None  # dynamic loss scale (fp16 only)
    dropout_step: int = 0  # train-mode forwards so far: the counter of the adapter's dropout masks


@dataclass
class ForwardBackwardResult:
    logprobs: list[list[float]]  # per example (caller order): logprob of each target token
    losses: list[float]  # per example (dpo: the pair's loss on its chosen example, 0 on rejected)
    entropy: list[list[float]]  # per example: entropy of the next-token distribution per position
    metrics: dict[str, dict[str, float]]  # per adapter: {"loss:sum", "tokens:sum", "examples:sum"}


class TrainingMixin:
    """Mixed into `Fleet`; relies on its registry (`slot_of`, `adapter_views`, `run_routed`)."""

    logprob_chunk: int = 1024  # rows of logits materialized at once

    # ------------------------------------------------------------- optimizer
    def set_optimizer(self, name: str, config: OptimConfig) -> None:
        """Set (or change) an adapter's optimizer and schedule; moments and step are kept."""
        self.slot_of(name)
        if not isinstance(config, OptimConfig):
            raise ValueError(f"set_optimizer needs a lorafleet.OptimConfig, got {type(config).__name__}")
        config.validate()  # its fields may have been assigned since construction (nan weight_decay, ...)
        self._train[name].optim = config

    def train_state(self, name: str) -> AdapterTrainState:
        self.slot_of(name)
        return self._train[name]

    def reset_optimizer(self, name: str) -> None:
        """Forget an adapter's AdamW moments and step (its weights and optimizer config stay):
        e.g. after loading weights without optimizer state. fp32 master weights are weights, not
        optimizer state: they stay."""
        st = self.train_state(name)
        st.adam = AdamState(master=st.adam.master)

    def pending_adapters(self) -> list[str]:
        return [n for n in self.adapters if self._train[n].pending]

    @property
    def lora_dtype(self) -> torch.dtype:
        return next(self.lora_parameters()).dtype

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 factors or an fp16 base: gradients need a loss scale to stay inside fp16's range."""
        return torch.float16 in (self.lora_dtype, getattr(self.model, "dtype", None))

    def _fp32_grads(self, name: str) -> bool:
        """Whether the adapter's gradients accumulate in its fp32 ``grad_acc`` (low-precision
        factors, or a loss scale to undo) instead of in the bank's ``.grad``."""
        return low_precision(self.lora_dtype) or self._train[name].scaler is not None

    @torch.no_grad()
    def _move_grads(self, name: str, views=None, inv_scale: float = 1.0) -> None:
        """Add the adapter's bank gradient (times ``inv_scale``) into its fp32 ``grad_acc`` and
        zero it in the bank. Exact for the first micro-batch: the buffer starts at zero."""
        st = self._train[name]
        accs, gs = [], []
        for key, p, idx in views if views is not None else self.adapter_views(name):
            if p.grad is None:
                continue
            g = p.grad[idx]
            acc = st.grad_acc.get(key)
            if acc is None:
                acc = st.grad_acc[key] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            accs.append(acc)
            gs.append(g)
        if gs:  # multi-tensor ops: CUDA can batch what would be views x 2 tiny kernels (unmeasured)
            torch._foreach_add_(accs, gs, alpha=inv_scale)
            torch._foreach_zero_(gs)

    def adapter_grads(self, name: str, views=None) -> list[torch.Tensor]:
        """The adapter's accumulated gradient per view: the bank's ``.grad`` slices for fp32
        factors; fp32 tensors (unscaled) for low-precision ones. A bank gradient written by a
        backward outside `forward_backward` is moved into the fp32 buffer first."""
        views = views if views is not None else self.adapter_views(name)
        if not self._fp32_grads(name):
            return [p.grad[idx] if p.grad is not None else torch.zeros_like(p[idx]) for _, p, idx in views]
        self._move_grads(name, views)
        acc = self._train[name].grad_acc
        return [acc[k] if k in acc else torch.zeros(p[idx].shape, dtype=torch.float32, device=p.device)
                for k, p, idx in views]

    def zero_grad(self, name: str) -> None:
        for _, p, idx in self.adapter_views(name):
            if p.grad is not None:
                p.grad[idx].zero_()
        st = self._train[name]
        st.grad_acc = {}  # freed while nothing is pending
        st.pending = False

    def optim_step(self, adapters: list[str] | None = None) -> dict[str, dict]:
        """AdamW-step each named adapter (default: every adapter with pending gradients) with its
        own config, schedule and clipping; then clear its gradients. Returns per-adapter metrics
        (lr, grad_norm before clipping, step, skipped). In every dtype, a gradient holding an
        inf/nan (its global norm is not finite) skips that adapter's step: weights, moments and
        step count untouched, ``skipped`` True, the gradient dropped; the other adapters step as
        usual. An adapter with a loss scaler (fp16) also lowers its scale on a skip and reports
        ``loss_scale`` (for its next forward_backward)."""
        if isinstance(adapters, (str, bytes)):
            raise ValueError(f"optim_step takes a list of adapter names, got the string {adapters!r} "
                             f"(write [{adapters!r}])")
        names = self.pending_adapters() if adapters is None else list(adapters)
        for n in names:
            self.slot_of(n)  # every name is checked before any adapter steps
        if len(set(names)) != len(names):
            raise ValueError(f"optim_step: adapter {next(n for n in names if names.count(n) > 1)!r} is named twice")
        out = {}
        all_views = {n: self.adapter_views(n) for n in names}
        all_grads = {n: self.adapter_grads(n, all_views[n]) for n in names}
        if self.comm is not None:  # distributed: SUM each stepping adapter's gradient over the ranks
            self.comm.reduce_gradients(all_views, all_grads)
        for n in names:
            st = self._train[n]
            views, grads = all_views[n], all_grads[n]
            # an adapter's norm spans its shards on other ranks (None: the local grad_norm)
            norm = self.comm.grad_norm(n) if self.comm is not None else None
            if norm is None:
                norm = grad_norm(grads)
            # an inf/nan anywhere in the gradient makes its norm inf/nan; under comm the norm is
            # computed after the reduction, over every shard, so all ranks take the same decision
            finite = math.isfinite(norm)
            scaler = st.scaler
            if scaler is not None:
                scaler.update(finite)
            if finite:
                out[n] = adamw_step([(k, p[idx]) for k, p, idx in views], grads, st.adam, st.optim, norm=norm)
            else:
                out[n] = {"lr": st.optim.lr_at(st.adam.step), "grad_norm": norm, "step": st.adam.step}
            out[n]["skipped"] = not finite
            if scaler is not None:
                out[n]["loss_scale"] = scaler.scale
            self.zero_grad(n)
        return out

    # --------------------------------------------------------- forward/backward
    def forward_backward(self, examples: list[Example], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None, forward_only: bool = False) -> ForwardBackwardResult:
        """One shared forward (and backward) over examples of any adapters; see `Example`."""
        cfg = resolve_config(loss_fn, loss_fn_config)
        self._check_examples(examples, loss_fn, forward_only)
        if self.comm is not None:  # distributed: this rank runs its share, results are gathered
            return self.comm.forward_backward(self, examples, loss_fn, cfg, forward_only)
        return self._forward_backward_local(examples, loss_fn, cfg, forward_only)

    def _forward_backward_local(self, examples, loss_fn, cfg, forward_only) -> ForwardBackwardResult:
        rows = list(range(len(examples)))  # row -> example index; dpo adds base-model reference rows
        if loss_fn == "dpo":
            rows += [-1 - i for i in range(len(examples))]
        slot = [self.slot_of(examples[i].adapter) if i >= 0 and examples[i].adapter is not None else -1
                for i in rows]
        order = sorted(range(len(rows)), key=lambda j: slot[j])  # adapter-major, stable
        rows, slot = [rows[j] for j in order], [slot[j] for j in order]
        ex_of = [examples[i if i >= 0 else -1 - i] for i in rows]
        lens = [len(e.input_tokens) for e in ex_of]
        T = max(lens)
        dev = self.lora_device
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for r, e in enumerate(ex_of):
            ids[r, : lens[r]] = torch.tensor(e.input_tokens)
            mask[r, : lens[r]] = 1
        targets = torch.cat([torch.tensor(e.target_tokens, dtype=torch.long) for e in ex_of]).to(dev)
        ids, mask = ids.to(dev), mask.to(dev)

        grad_ctx = torch.no_grad() if forward_only else torch.enable_grad()
        with grad_ctx:
            with self.lora_dropout_scope(not forward_only):  # dropout trains, never in forward-only
                hidden = self.run_routed(self.backbone, slot, input_ids=ids, attention_mask=mask,
                                         use_cache=False).last_hidden_state
            hidden = hidden[mask.bool()]  # [sum(lens), H], rows in order, padding dropped
            lm_head = self.model.get_output_embeddings()
            if getattr(lm_head, "bias", None) is not None:
                raise ValueError("LM heads with a bias are not supported by the chunked loss")
            lp_flat, ent_flat = token_logprobs(hidden, lm_head.weight, targets, self.logprob_chunk,
                                               self.head_lora_runs(slot, lens))  # LoRA on lm_head, if any
            lp_rows = dict(zip(rows, lp_flat.split(lens)))
            ent_rows = dict(zip(rows, ent_flat.split(lens)))
            losses = self._losses(examples, lp_rows, loss_fn, cfg, dev)
            if not forward_only:
                scale = {i: self._train[examples[i].adapter].scaler.scale for i in losses
                         if self._train[examples[i].adapter].scaler is not None}
                parts = [loss * scale[i] if i in scale else loss for i, loss in losses.items()]
                total = torch.stack(parts).sum() if parts else None
                if total is None and self.comm is not None:  # ranks with no loss still join backward's collectives
                    total = self.comm.backward_anchor(hidden)
                if total is not None and total.requires_grad:
                    total.backward()
                    for n in dict.fromkeys(examples[i].adapter for i in losses):
                        if self._fp32_grads(n):
                            sc = self._train[n].scaler
                            self._move_grads(n, inv_scale=1.0 if sc is None else 1.0 / sc.scale)
        return self._result(examples, lp_rows, ent_rows, losses, forward_only)

    @property
    def lora_device(self) -> torch.device:
        return next(self.lora_parameters()).device

    def vocab_sizes(self) -> tuple[int, int]:
        """(rows of the input embedding, rows of the LM head): input ids must be below the first,
        target ids below the second."""
        return (self.model.get_input_embeddings().weight.shape[0],
                self.model.get_output_embeddings().weight.shape[0])

    def _check_examples(self, examples, loss_fn, forward_only):
        """Everything a batch could get wrong, checked before any work (or collective): an empty
        batch, types, adapter names, token ids (integers in range), and finite loss arrays."""
        if isinstance(examples, Example):
            raise ValueError("forward_backward takes a list of Examples, got one Example (write [example])")
        if not examples:
            raise ValueError("forward_backward needs at least one example (got an empty batch)")
        vocab_in, vocab_out = self.vocab_sizes()
        for i, e in enumerate(examples):
            if not isinstance(e, Example):
                raise ValueError(f"example {i} is a {type(e).__name__}, not a lorafleet.Example")
            if e.adapter is None and not forward_only:
                raise ValueError(f"example {i} has adapter=None (base model): only forward_only can use it")
            if e.adapter is not None:
                self.slot_of(e.adapter)
            check_token_ids(e.input_tokens, vocab_in, f"example {i}: input")
            check_token_ids(e.target_tokens, vocab_out, f"example {i}: target")
            for arr in NEEDS[loss_fn]:
                if getattr(e, arr) is None:
                    raise ValueError(f"example {i}: loss_fn {loss_fn!r} needs {arr!r}")
            for arr in ("weights", "logprobs", "advantages"):
                if getattr(e, arr) is not None:
                    _check_finite(getattr(e, arr), f"example {i}: {arr}")
        if loss_fn == "dpo":
            if len(examples) % 2:
                raise ValueError("dpo needs (chosen, rejected) pairs: an even number of examples")
            for i in range(0, len(examples), 2):
                if examples[i].adapter != examples[i + 1].adapter:
                    raise ValueError(f"dpo pair {i // 2}: chosen and rejected belong to different adapters")

    def _losses(self, examples, lp_rows, loss_fn, cfg, dev) -> dict[int, torch.Tensor]:
        def arr(e, name):
            return torch.tensor(getattr(e, name), dtype=torch.float32, device=dev)

        losses = {}
        if loss_fn == "dpo":
            for i in range(0, len(examples), 2):
                c, r = examples[i], examples[i + 1]
                losses[i] = dpo(lp_rows[i], lp_rows[i + 1], lp_rows[-1 - i].detach(), lp_rows[-2 - i].detach(),
                                arr(c, "weights"), arr(r, "weights"), cfg["beta"])
            return losses
        for i, e in enumerate(examples):
            if e.adapter is None:
                continue
            losses[i] = example_loss(loss_fn, cfg, lp_rows[i], {k: arr(e, k) for k in NEEDS[loss_fn]})
        return losses

    def _result(self, examples, lp_rows, ent_rows, losses, forward_only) -> ForwardBackwardResult:
        loss_vals = [float(losses[i].detach()) if i in losses else 0.0 for i in range(len(examples))]
        return ForwardBackwardResult(
            logprobs=[lp_rows[i].detach().tolist() for i in range(len(examples))],
            losses=loss_vals,
            entropy=[ent_rows[i].tolist() for i in range(len(examples))],
            metrics=self._metrics(examples, loss_vals, forward_only),
        )

    def _metrics(self, examples, loss_vals, forward_only) -> dict[str, dict[str, float]]:
        """Per-adapter sums in example order; marks the adapters' gradients pending."""
        metrics: dict[str, dict[str, float]] = {}
        for e, loss in zip(examples, loss_vals):
            if e.adapter is None:
                continue
            m = metrics.setdefault(e.adapter, {"loss:sum": 0.0, "tokens:sum": 0.0, "examples:sum": 0.0})
            m["loss:sum"] += loss
            m["tokens:sum"] += float(sum(1 for w in e.weights if w != 0))
            m["examples:sum"] += 1.0
            if not forward_only:
                self._train[e.adapter].pending = True
        return metrics


def check_token_ids(ids, vocab: int, what: str) -> None:
    """ValueError unless every id is an integer (not a bool; a float 5.7 is refused, never
    truncated to 5) in [0, vocab). ``what`` starts the message: "{what} token ids must be ..."."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise ValueError(f"{what} token ids must be integers, got a {ids.dtype} tensor")
        ids = ids.flatten().tolist()
    elif isinstance(ids, (str, bytes)):
        raise ValueError(f"{what} token ids must be a list of integers, got the string {ids!r}")
    for tp in set(map(type, ids)):
        if tp is bool or not issubclass(tp, numbers.Integral):
            bad = next(t for t in ids if type(t) is tp)
            raise ValueError(f"{what} token ids must be integers, got {bad!r} ({tp.__name__})")
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        bad = min(ids) if min(ids) < 0 else max(ids)
        raise ValueError(f"{what} token ids must be in [0, {vocab}), got {bad}")


def _check_finite(values, what: str) -> None:
    """ValueError naming the first value that is not a finite number (nan, inf, a string)."""
    try:
        if all(map(math.isfinite, values)):
            return
    except (TypeError, ValueError):
        pass
    for j, v in enumerate(values):
        try:
            ok = not isinstance(v, (str, bytes)) and math.isfinite(v)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{what}[{j}] is {v!r}: every value must be a finite number")
