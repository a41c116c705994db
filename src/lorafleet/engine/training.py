"""Training on a fleet: `forward_backward` over mixed-adapter examples, per-adapter `optim_step`.

Every adapter keeps its own optimizer config, AdamW moments, step count and pending-gradient
flag. Gradients accumulate in the slot tensors across `forward_backward` calls until that
adapter's `optim_step`; the losses are per-example sums, so nothing one adapter computes depends
on another adapter's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..types import Example
from .logprobs import token_logprobs
from .losses import NEEDS, dpo, example_loss, resolve_config
from .optim import AdamState, OptimConfig, adamw_step


@dataclass
class AdapterTrainState:
    optim: OptimConfig = field(default_factory=OptimConfig)
    adam: AdamState = field(default_factory=AdamState)
    pending: bool = False  # gradients accumulated since the last optim_step


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
        self._train[name].optim = config

    def train_state(self, name: str) -> AdapterTrainState:
        self.slot_of(name)
        return self._train[name]

    def reset_optimizer(self, name: str) -> None:
        """Forget an adapter's AdamW moments and step (its weights and optimizer config stay):
        e.g. after loading weights without optimizer state."""
        self.train_state(name).adam = AdamState()

    def pending_adapters(self) -> list[str]:
        return [n for n in self.adapters if self._train[n].pending]

    def adapter_grads(self, name: str, views=None) -> list[torch.Tensor]:
        views = views if views is not None else self.adapter_views(name)
        return [p.grad[idx] if p.grad is not None else torch.zeros_like(p[idx]) for _, p, idx in views]

    def zero_grad(self, name: str) -> None:
        for _, p, idx in self.adapter_views(name):
            if p.grad is not None:
                p.grad[idx].zero_()
        self._train[name].pending = False

    def optim_step(self, adapters: list[str] | None = None) -> dict[str, dict]:
        """AdamW-step each named adapter (default: every adapter with pending gradients) with its
        own config, schedule and clipping; then clear its gradients. Returns per-adapter metrics
        (lr, grad_norm before clipping, step)."""
        names = self.pending_adapters() if adapters is None else list(adapters)
        for n in names:
            self.slot_of(n)  # every name is checked before any adapter steps
        out = {}
        for n in names:
            st = self._train[n]
            views = self.adapter_views(n)
            out[n] = adamw_step([(k, p[idx]) for k, p, idx in views], self.adapter_grads(n, views), st.adam, st.optim)
            self.zero_grad(n)
        return out

    # --------------------------------------------------------- forward/backward
    def forward_backward(self, examples: list[Example], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None, forward_only: bool = False) -> ForwardBackwardResult:
        """One shared forward (and backward) over examples of any adapters; see `Example`."""
        cfg = resolve_config(loss_fn, loss_fn_config)
        self._check_examples(examples, loss_fn, forward_only)
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
            hidden = self.run_routed(self.model.base_model, slot, input_ids=ids, attention_mask=mask,
                                     use_cache=False).last_hidden_state
            hidden = hidden[mask.bool()]  # [sum(lens), H], rows in order, padding dropped
            lm_head = self.model.get_output_embeddings()
            if getattr(lm_head, "bias", None) is not None:
                raise ValueError("LM heads with a bias are not supported by the chunked loss")
            lp_flat, ent_flat = token_logprobs(hidden, lm_head.weight, targets, self.logprob_chunk)
            lp_rows = dict(zip(rows, lp_flat.split(lens)))
            ent_rows = dict(zip(rows, ent_flat.split(lens)))
            losses = self._losses(examples, lp_rows, loss_fn, cfg, dev)
            if not forward_only:
                total = torch.stack(list(losses.values())).sum() if losses else None
                if total is not None and total.requires_grad:
                    total.backward()
        return self._result(examples, lp_rows, ent_rows, losses, forward_only)

    @property
    def lora_device(self) -> torch.device:
        return next(self.lora_parameters()).device

    def _check_examples(self, examples, loss_fn, forward_only):
        if not examples:
            raise ValueError("forward_backward needs at least one example")
        for i, e in enumerate(examples):
            if not isinstance(e, Example):
                raise ValueError(f"example {i} is a {type(e).__name__}, not a lorafleet.Example")
            if e.adapter is None and not forward_only:
                raise ValueError(f"example {i} has adapter=None (base model): only forward_only can use it")
            if e.adapter is not None:
                self.slot_of(e.adapter)
            for arr in NEEDS[loss_fn]:
                if getattr(e, arr) is None:
                    raise ValueError(f"example {i}: loss_fn {loss_fn!r} needs {arr!r}")
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
        metrics: dict[str, dict[str, float]] = {}
        loss_vals = []
        for i, e in enumerate(examples):
            loss = float(losses[i].detach()) if i in losses else 0.0
            loss_vals.append(loss)
            if e.adapter is None:
                continue
            m = metrics.setdefault(e.adapter, {"loss:sum": 0.0, "tokens:sum": 0.0, "examples:sum": 0.0})
            m["loss:sum"] += loss
            m["tokens:sum"] += float(sum(1 for w in e.weights if w != 0))
            m["examples:sum"] += 1.0
            if not forward_only:
                self._train[e.adapter].pending = True
        return ForwardBackwardResult(
            logprobs=[lp_rows[i].detach().tolist() for i in range(len(examples))],
            losses=loss_vals,
            entropy=[ent_rows[i].tolist() for i in range(len(examples))],
            metrics=metrics,
        )
