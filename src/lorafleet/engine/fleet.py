"""`Fleet`: a slot pool of LoRA adapters attached in place to one frozen causal LM."""

from __future__ import annotations

import contextlib

import torch

from ..adapters.formats_layouts import PARAM_OF_PROJ
from ..adapters.weights import ExpertsArch
from ..config import AdapterConfig
from ..lora import Routing, SlotBank, SlotInfo, use_routing
from ..lora.embedding import peft_embedding_init
from ..lora.linear import dropout_noise, kaiming_uniform_A
from ..lora.routing import RoutingCheckpoint
from ..models import arch_spec, attach
from ..models.attach import attach_vocab
from .logprobs import HeadLoRARun
from .sampling import SamplingMixin
from .snapshot import SnapshotMixin
from .state import StateMixin
from .optim import LossScaler
from .training import AdapterTrainState, TrainingMixin
from .weights_io import WeightsIOMixin


class Fleet(TrainingMixin, SnapshotMixin, StateMixin, SamplingMixin, WeightsIOMixin):
    """Many LoRA adapters on one shared frozen base model.

    ``Fleet(model, max_adapters=8, max_rank=64)`` swaps the model's linears and packed experts
    for slot-routed LoRA layers in place. ``forward(..., adapters=[name | None per row])`` runs a
    batch whose rows belong to different adapters (``None``: the base model).
    ``dtype``: the LoRA factors' dtype (default: the base's). A bf16 base trains in mixed precision:
    bf16 compute; fp32 loss math, gradient accumulation, AdamW moments and master weights; an
    fp16 base adds a per-adapter dynamic loss scale (see docs/precision.md).
    LoRA on the LM head and the input embedding (``target_modules`` ``"lm_head"`` /
    ``"embed_tokens"``, as in PEFT) is attached at the first adapter that asks for it: its banks
    hold ``max_adapters × max_rank × (vocab + hidden)`` values each (docs/architectures.md).
    ``expert_lora``: LoRA on the packed MoE experts too. None (default): where lorafleet supports
    the model's experts (dense LoRA only on e.g. Llama 4 / DBRX); True: required (a ValueError
    where the experts are not supported); False: off.
    """

    # set by `lorafleet.distributed.parallelize`: an object the engine hands its collectives to
    # (split batches, gradient sums, shard gather/slice); None runs everything in this process
    comm = None
    # True inside `lora_dropout_scope(True)`: forward_backward's training forward drops as
    # model.train() would, while the base (jobs, service) stays in eval mode
    _lora_dropout_on = False

    def __init__(self, model, max_adapters: int = 8, max_rank: int = 64, expert_lora: bool | None = None,
                 dtype=None):
        self.spec = arch_spec(model)
        self.model = model
        self.bank = SlotBank(max_adapters, max_rank)
        if expert_lora is None:
            expert_lora = not self.spec.experts_problems
        self.expert_lora = bool(expert_lora) and self.spec.moe
        self._att = attach(model, self.spec, self.bank, experts=self.expert_lora, dtype=dtype)
        self._lora_dtype = dtype  # for the LM head / embedding banks attached on demand
        self._last_dropout: dict = {}  # the dropout plan of the latest routed forward (head LoRA reads it)
        self._slots: dict[str, int] = {}
        self._configs: dict[str, AdapterConfig] = {}
        self._train: dict[str, AdapterTrainState] = {}  # per adapter: optimizer, moments, step
        self._detached = False

    # ----------------------------------------------------------------- registry
    @property
    def adapters(self) -> dict[str, AdapterConfig]:
        """Adapter name -> its config, in slot order."""
        return {n: self._configs[n] for n in sorted(self._slots, key=self._slots.get)}

    @property
    def linear_names(self) -> list[str]:
        """Short names of the decoder linears an adapter can target (``target_modules`` values;
        what ``"all-linear"`` means). `vocab_names` are targets too, named explicitly."""
        return sorted(self._att.linear_names)

    @property
    def vocab_names(self) -> list[str]:
        """Target names of the input embedding and the LM head (their modules' own names, PEFT's
        ``"embed_tokens"`` / ``"lm_head"`` on most models); their banks are allocated on first use."""
        return sorted(self._att.vocab_paths)

    @property
    def backbone(self) -> torch.nn.Module:
        """The decoder without the LM head (what returns ``last_hidden_state``): ``base_model``,
        or the decoder layers' parent where ``base_model_prefix`` names no submodule (Llama 4's
        ``Llama4ForCausalLM`` says 'language_model' but holds ``model``)."""
        bm = self.model.base_model
        if bm is self.model and "." in self.spec.layers_path:
            bm = self.model.get_submodule(self.spec.layers_path.rsplit(".", 1)[0])
        return bm

    @property
    def max_adapters(self) -> int:
        return self.bank.max_adapters

    @property
    def max_rank(self) -> int:
        return self.bank.max_rank

    def slot_of(self, name: str) -> int:
        self._check_alive()
        if not isinstance(name, str):
            raise ValueError(f"adapter names are strings, got {name!r}")
        if name not in self._slots:
            raise ValueError(f"unknown adapter {name!r}; loaded: {sorted(self._slots) or 'none'}")
        return self._slots[name]

    def target_paths(self, config: AdapterConfig) -> list[str]:
        """Module paths an adapter with ``config`` puts LoRA on (validates target names): decoder
        linears first, then the input embedding and the LM head if named (never by "all-linear",
        as in PEFT)."""
        available, vocab = self._att.linear_names, self._att.vocab_paths
        if config.target_modules == "all-linear":
            wanted = available
        else:
            unknown = sorted(set(config.target_modules) - available - set(vocab))
            if unknown:
                raise ValueError(
                    f"unknown target module(s) {unknown} for {self.spec.model_type}; "
                    f"available: {sorted(available | set(vocab))}"
                )
            wanted = set(config.target_modules)
        heads = set(vocab.values())
        paths = [p for p, m in self._att.linears.items()
                 if p not in heads and m.short_name in wanted and self._in_layers(p, config)]
        return paths + [p for p in (self._att.embedding_path, self._att.head_path)
                        if p is not None and p.rsplit(".", 1)[-1] in wanted and self._in_layers(p, config)]

    def vocab_targets(self, config: AdapterConfig) -> list[str]:
        """The input embedding / LM head names (`vocab_names`) that ``config`` targets."""
        tm = config.target_modules
        return [] if isinstance(tm, str) else [n for n in sorted(self._att.vocab_paths) if n in tm]

    def expert_paths(self, config: AdapterConfig) -> list[str]:
        if not (config.experts and self.expert_lora):
            return []
        return [p for p in self._att.experts if self._in_layers(p, config)]

    def layer_index(self, path: str) -> int | None:
        """The decoder layer index of a module path (None: outside the decoder layers)."""
        prefix = self.spec.layers_path + "."
        head = path[len(prefix):].split(".", 1)[0] if path.startswith(prefix) else ""
        return int(head) if head.isdigit() else None

    def _in_layers(self, path: str, config: AdapterConfig) -> bool:
        lt = config.layers_to_transform
        return lt is None or self.layer_index(path) in lt

    def _validate(self, name, config: AdapterConfig, slot: int | None = None):
        self._check_alive()
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._slots:
            raise ValueError(f"adapter {name!r} already exists (slot {self._slots[name]})")
        if not isinstance(config, AdapterConfig):
            raise ValueError(f"config must be a lorafleet.AdapterConfig, got {type(config).__name__}")
        if config.slot_rank > self.bank.max_rank:
            what = f"rank {config.rank}" if config.slot_rank == config.rank else f"rank_pattern rank {config.slot_rank}"
            raise ValueError(f"adapter {name!r}: {what} is above this fleet's max_rank {self.bank.max_rank}")
        if config.experts and self.spec.moe and not self.expert_lora:
            why = "the fleet was built with expert_lora=False" if not self.spec.experts_problems else (
                f"this fleet has none: lorafleet does not support the experts of {self.spec.model_type} "
                f"({self.spec.experts_problems[0][0]}: {self.spec.experts_problems[0][1]})")
            raise ValueError(f"adapter {name!r} asks for expert LoRA but {why}; use AdapterConfig(experts=False)")
        if config.layers_to_transform is not None:
            n = len(self.model.get_submodule(self.spec.layers_path))
            bad = [i for i in config.layers_to_transform if i >= n]
            if bad:
                raise ValueError(f"adapter {name!r}: layers_to_transform {bad} outside the model's {n} decoder "
                                 f"layers (0..{n - 1})")
        paths = self.target_paths(config)
        vocab = self.vocab_targets(config)
        if vocab and config.layers_to_transform is not None:
            raise ValueError(f"adapter {name!r}: target_modules {vocab} lie outside the decoder layers, so "
                             "layers_to_transform leaves them without LoRA (PEFT skips them silently); drop one "
                             "of the two")
        if vocab and self.comm is not None and not all(self._att.vocab_attached(self._att.vocab_paths[n])
                                                       for n in vocab):
            raise ValueError(f"adapter {name!r}: LoRA on {vocab} is not supported in a distributed fleet")
        if not paths and not self.expert_paths(config):
            raise ValueError(f"adapter {name!r} targets nothing in {self.spec.model_type}")
        if self.bank.free_slot() is None:
            raise ValueError(
                f"slot pool is full ({self.bank.max_adapters} adapters: {sorted(self._slots)}); "
                f"remove one before adding {name!r}"
            )
        if slot is not None:
            if not (isinstance(slot, int) and 0 <= slot < self.bank.max_adapters):
                raise ValueError(f"slot {slot!r} is outside [0, {self.bank.max_adapters})")
            if self.bank.slots[slot] is not None:
                raise ValueError(f"slot {slot} is taken by adapter {self.bank.slots[slot].name!r}")
        # the config is valid: the LM head / embedding banks it needs exist from here on (allocated
        # once; zero LoRA there changes no output, so a later refusal leaves outputs as they were)
        for n in vocab:
            attach_vocab(self._att, self.bank, self._att.vocab_paths[n], dtype=self._lora_dtype)
        return paths

    def add_adapter(self, name: str, config: AdapterConfig | None = None, slot: int | None = None) -> int:
        """Put a fresh adapter (seeded A, zero B) in a free slot (or the given free ``slot``);
        returns the slot. Either it succeeds or nothing changes: the config is checked first, and
        an error while the slot is set up frees the slot again (zeroed) and forgets the name."""
        config = AdapterConfig() if config is None else config
        paths = self._validate(name, config, slot)
        slot = self.bank.free_slot() if slot is None else slot
        try:
            self.bank.slots[slot] = SlotInfo(name, config.slot_rank, config.scale, bool(self.expert_paths(config)),
                                             config.expert_sharing)
            self._slots[name], self._configs[name] = slot, config
            # a reused slot starts with zero moments, step 0; fp16 gets a fresh loss scale
            self._train[name] = AdapterTrainState(scaler=LossScaler() if self.needs_loss_scaling else None)
            self._reset_slot(slot, config, set(paths))
        except BaseException:
            for d in (self._slots, self._configs, self._train):
                d.pop(name, None)
            self.bank.slots[slot] = None
            self._reset_slot(slot, None, set())
            raise
        return slot

    def remove_adapter(self, name: str) -> None:
        slot = self.slot_of(name)
        self._reset_slot(slot, None, set())
        self.bank.slots[slot] = None
        del self._slots[name], self._configs[name], self._train[name]

    @torch.no_grad()
    def _reset_slot(self, slot: int, config: AdapterConfig | None, paths: set[str]):
        """Zero the slot everywhere, then (for a new adapter) draw A from the adapter's seed in a
        fixed module order, so an adapter's init does not depend on its slot or on neighbours.
        A module of a smaller ``rank_pattern`` rank inits only its own rows (the rest stays zero);
        a module whose scale differs from the adapter's (``rank_pattern`` / ``alpha_pattern``)
        gets it as the layer's override for this slot."""
        gen = torch.Generator().manual_seed(config.seed) if config is not None else None
        r = config.slot_rank if config is not None else 0
        exp_paths = set(self.expert_paths(config)) if config is not None else set()
        for m in self._att.lora_modules():
            for k in [k for k in m.scale_override if (k[0] if isinstance(k, tuple) else k) == slot]:
                del m.scale_override[k]

        def module(key):  # (rank, scale) of one module key; the scale recorded where it differs
            return config.module_rank(key), config.module_scale(key)
        for m in self._att.linears.values():
            for p in m.parameters(recurse=False):
                p[slot].zero_()
                if p.grad is not None:
                    p.grad[slot].zero_()
        for m in self._att.experts.values():
            m.release_slot(slot)  # expert factors live in row pools (rows taken in init_slot)
        for path, m in self._att.linears.items():
            m.enabled[slot] = path in paths
            if path in paths:
                rm, sm = module(path)
                m.lora_A[slot, :rm] = kaiming_uniform_A((rm, m.in_features), gen, m.lora_A.dtype, m.lora_A.device)
                if sm != config.scale:
                    m.scale_override[slot] = sm
        for path, m in self._att.experts.items():
            use_experts = path in exp_paths
            m.enabled[slot] = use_experts
            if use_experts:
                m.init_slot(slot, r, config.expert_sharing, gen)
                views = {k: (p, idx) for k, p, idx in m.factor_views(slot, r, config.expert_sharing)}
                for proj, param in PARAM_OF_PROJ.items():
                    rm, sm = module(f"{path}.{param}")
                    if rm < r:  # rows past the module's rank: zero padding, as a loaded file has it
                        p, idx = views[f"{proj}.A"]
                        p[idx][:, rm:] = 0
                    if sm != config.scale:
                        m.scale_override[(slot, proj)] = sm
        for path, m in self._att.embeddings.items():  # PEFT's embedding init: A zeros, B normal
            for p in m.parameters(recurse=False):
                p[slot].zero_()
                if p.grad is not None:
                    p.grad[slot].zero_()
            m.enabled[slot] = path in paths
            if path in paths:
                rm, sm = module(path)
                _, b = peft_embedding_init(rm, m.num_embeddings, m.embedding_dim, gen, m.lora_embedding_B.dtype,
                                           m.lora_embedding_B.device)
                m.lora_embedding_B[slot, :, :rm] = b
                if sm != config.scale:
                    m.scale_override[slot] = sm

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                adapters: list[str | None] | None = None, **kwargs):
        """Run the model on a mixed batch; ``adapters[i]`` names row i's adapter (None = base).
        Returns the model's usual output with rows in the caller's order."""
        self._check_alive()
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, seq] tensor, got {shape}")
        if input_ids.dtype == torch.bool or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
            raise ValueError(f"input_ids must hold integer token ids, got a {input_ids.dtype} tensor")
        batch, seq = input_ids.shape
        if batch == 0 or seq == 0:
            raise ValueError(f"input_ids is empty (shape {(batch, seq)}): forward needs at least one row and position")
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        vocab = self.vocab_sizes()[0]
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids token ids must be in [0, {vocab}), got {lo if lo < 0 else hi}")
        if adapters is None:
            adapters = [None] * batch
        if isinstance(adapters, (str, bytes)):
            raise ValueError(f"adapters must be a list with one adapter name (or None) per row, got the string "
                             f"{adapters!r}")
        if len(adapters) != batch:
            raise ValueError(f"got {len(adapters)} adapter names for a batch of {batch} rows")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(batch, seq)}")
        row_slots = [-1 if a is None else self.slot_of(a) for a in adapters]
        order = sorted(range(batch), key=lambda i: row_slots[i])  # stable: adapter-major
        permuted = order != list(range(batch))
        perm = torch.tensor(order, device=input_ids.device)
        if permuted:
            input_ids = input_ids[perm]
            attention_mask = attention_mask[perm] if attention_mask is not None else None
            kwargs = {k: (v[perm] if _is_row_tensor(v, batch) else v) for k, v in kwargs.items()}
        out = self.run_routed(self.model, [row_slots[i] for i in order], input_ids=input_ids,
                              attention_mask=attention_mask, **kwargs)
        if permuted:
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(batch, device=perm.device)
            _unpermute_output(out, inv, batch)
        return out

    def run_routed(self, module, row_slots: list[int], *, input_ids: torch.Tensor, **kwargs):
        """Call ``module`` (the model or its backbone) on rows already laid out adapter-major;
        ``row_slots[i]`` is row i's slot (-1: base model)."""
        routing = Routing.from_row_slots(row_slots, input_ids.device, self._dropout_plan(row_slots))
        self._last_dropout = routing.dropout
        self._wrap_checkpointing()
        with use_routing(routing):
            return module(input_ids=input_ids, **kwargs)

    __call__ = forward

    def head_lora_runs(self, row_slots: list[int], lens: list[int]) -> list[HeadLoRARun] | None:
        """The LM head's LoRA for the chunked loss (`token_logprobs`), which reads the head's
        weight directly: one run per adapter-major group of rows whose adapter targets
        ``lm_head`` (``row_slots[i]`` / ``lens[i]``: row i's slot and its tokens in the flattened
        hidden states). Dropout follows the plan of the latest `run_routed` forward (the one
        whose hidden states these are), drawn for the head's path. None: no head LoRA here."""
        path = self._att.head_path
        m = self._att.linears.get(path) if path else None
        if m is None:
            return None
        runs, at = [], 0
        for slot, n in zip(row_slots, lens):
            if slot >= 0 and m.enabled[slot]:
                if runs and runs[-1][0] == slot and runs[-1][2] == at:
                    runs[-1][2] = at + n
                else:
                    runs.append([slot, at, at + n])
            at += n
        out = []
        for slot, start, end in runs:
            info = self.bank.info(slot)
            r = info.rank
            noise = None
            if slot in self._last_dropout:
                p, seed, counter = self._last_dropout[slot]
                noise = dropout_noise((end - start, m.in_features), p, seed, counter, path, m.lora_A.dtype,
                                      m.lora_A.device)
            out.append(HeadLoRARun(start, end, m.lora_A[slot, :r], m.lora_B[slot, :, :r],
                                   m.scale_override.get(slot, info.scale), noise))
        return out or None

    def _dropout_plan(self, row_slots: list[int]) -> dict[int, tuple[float, int, int]]:
        """slot -> (p, seed, counter) for this forward's adapters with ``lora_dropout`` > 0 while the
        model is in train mode (as PEFT: ``model.train()`` turns dropout on). Each such adapter's
        counter advances once per forward it takes part in, so its masks depend on its own seed and
        history only; the counter is part of its train state (save_state / load_state)."""
        if not (self.model.training or self._lora_dropout_on):
            return {}
        plan = {}
        for slot in sorted(set(row_slots) - {-1}):
            name = self.bank.slots[slot].name
            config = self._configs[name]
            if config.lora_dropout > 0:
                st = self._train[name]
                plan[slot] = (config.lora_dropout, config.seed, st.dropout_step)
                st.dropout_step += 1
        return plan

    @contextlib.contextmanager
    def lora_dropout_scope(self, on: bool):
        """Within: each adapter's ``lora_dropout`` is active (``on``) whatever the model's mode.
        forward_backward uses it for its training forward; sampling, eval and forward-only
        logprobs never drop (unless the user put the model in train mode themselves)."""
        prev, self._lora_dropout_on = self._lora_dropout_on, bool(on)
        try:
            yield
        finally:
            self._lora_dropout_on = prev

    def _wrap_checkpointing(self):
        for m in self.model.modules():
            fn = getattr(m, "_gradient_checkpointing_func", None)
            if fn is not None and not isinstance(fn, RoutingCheckpoint):
                m._gradient_checkpointing_func = RoutingCheckpoint(fn)

    # ------------------------------------------------------------ weights I/O
    def lora_parameters(self):
        """Every slot tensor (all slots): what an optimizer over the whole pool would see."""
        for m in self._att.lora_modules():
            yield from m.parameters(recurse=False)

    def experts_arch(self) -> dict[str, ExpertsArch]:
        return {
            p: ExpertsArch(m.num_experts, m.hidden_size, m.inter,
                           interleaved_gate_up=not getattr(m.base_layer, "is_concatenated", True))
            for p, m in self._att.experts.items()
        }

    def adapter_views(self, name: str) -> list[tuple[str, torch.nn.Parameter, tuple]]:
        """(key, bank parameter, index) for every factor of an adapter: ``param[index]`` is the
        rank-sliced view of that factor. Keys match `AdapterWeights.tensors()`. The one place that
        knows where an adapter lives in the bank (export, optimizer and checkpoints all use it)."""
        slot, config = self.slot_of(name), self._configs[name]
        r = config.slot_rank
        views = []
        for path, m in self._att.linears.items():
            if m.enabled[slot]:
                views.append((f"{path}.A", m.lora_A, (slot, slice(0, r))))
                views.append((f"{path}.B", m.lora_B, (slot, slice(None), slice(0, r))))
        for path, m in self._att.experts.items():
            if m.enabled[slot]:  # under expert parallelism: this rank's experts (see factor_views)
                views += [(f"{path}.{k}", p, idx) for k, p, idx in m.factor_views(slot, r, config.expert_sharing)]
        for path, m in self._att.embeddings.items():  # A [S, R, V], B [S, D, R]: a linear's layout
            if m.enabled[slot]:
                views.append((f"{path}.A", m.lora_embedding_A, (slot, slice(0, r))))
                views.append((f"{path}.B", m.lora_embedding_B, (slot, slice(None), slice(0, r))))
        return views

    # --------------------------------------------------------------- teardown
    def detach(self):
        """Restore the model's original modules; the fleet is unusable afterwards."""
        self._check_alive()
        self._att.detach()
        self._detached = True

    def _check_alive(self):
        if self._detached:
            raise ValueError("this Fleet was detached from its model")


def _is_row_tensor(v, batch) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch


def _unpermute_output(out, inv, batch):
    for key in ("logits", "loss_per_row"):
        v = getattr(out, key, None)
        if _is_row_tensor(v, batch):
            out[key] = v[inv]
    for key in ("hidden_states", "attentions"):
        v = getattr(out, key, None)
        if isinstance(v, tuple):
            out[key] = tuple(t[inv] if _is_row_tensor(t, batch) else t for t in v)
