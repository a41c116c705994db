"""Reading and writing one adapter's factors (`Fleet` mixin): `AdapterWeights` in and out of the
slot bank, checked before anything is written, and the PEFT / vLLM / SGLang directories."""

from __future__ import annotations

import os

import torch

from ..adapters.weights import AdapterWeights
from ..lora.experts import SHARED_FACTORS
from ..models.attach import vocab_modules
from .optim import low_precision


class WeightsIOMixin:
    """Mixed into `Fleet`; relies on its registry (`slot_of`, `adapter_views`, `target_paths`)."""
    @torch.no_grad()
    def get_adapter_weights(self, name: str, dtype: torch.dtype | None = None) -> AdapterWeights:
        """A copy of the adapter's factors (rank-sliced, shared factors with expert dim 1).

        Low-precision (bf16/fp16) banks export fp32: each factor's fp32 master where the adapter
        has one that still rounds to the bank, else the bank value upcast (exact). fp32 banks
        export their values. ``dtype`` casts every factor (e.g. ``torch.bfloat16``: the bank's
        rounded values, half the bytes)."""
        slot = self.slot_of(name)  # unknown name -> ValueError before anything else
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"export dtype must be a floating torch.dtype, got {dtype!r}")
        masters = self._train[name].adam.master
        w = AdapterWeights(self._configs[name], model_type=self.spec.model_type,
                           base_model_name_or_path=str(getattr(self.model.config, "_name_or_path", "") or ""),
                           experts_arch=self.experts_arch(), layers_path=self.spec.layers_path,
                           linear_out_features={p: m.out_features for p, m in self._att.linears.items()})
        pairs: dict[tuple[str, str | None], list] = {}
        for key, p, idx in self.adapter_views(name):
            path, which = key.rsplit(".", 1)  # which: "A" | "B"
            head, _, proj = path.rpartition(".")
            group = (head, proj) if head in self._att.experts else (path, None)
            v = p[idx]
            if low_precision(v.dtype):
                m = masters.get(key)
                v = m if m is not None and m.shape == v.shape and torch.equal(m.to(v.dtype), v) else v.float()
            if self.comm is not None:  # distributed: the whole factor, gathered from its shards
                v = self.comm.full_tensor(name, key, p, v)
            v = v.clone() if dtype is None or v.dtype == dtype else v.to(dtype)
            pairs.setdefault(group, [None, None])["AB".index(which)] = v
        for (path, proj), (a, b) in pairs.items():
            if path in self._att.embeddings:
                w.embeddings[path] = (a, b)
            elif proj is None:
                w.dense[path] = (a, b)
            else:
                w.experts.setdefault(path, {})[proj] = (a, b)
        assert slot == self._slots[name]
        return w

    def _check_weights(self, name: str, w: AdapterWeights):
        """Every shape is checked, and every value is finite, before anything is written (a bad
        file changes nothing)."""
        config = w.config
        paths = set(self.target_paths(config))
        vocab = vocab_modules(self.model)
        emb = self._att.embedding_path
        emb_paths = {emb} if emb is not None and emb in paths else set()
        got = set(w.dense) | set(w.embeddings)
        if got != paths or set(w.embeddings) != emb_paths:
            missing, extra = sorted(paths - got), sorted(got - paths)
            raise ValueError(f"adapter {name!r}: weights do not match its targets (missing {missing[:4]}, "
                             f"unexpected {extra[:4]})")
        r = config.slot_rank
        shapes = {path: (mod.in_features, mod.out_features) if isinstance(mod, torch.nn.Linear)
                  else (mod.num_embeddings, mod.embedding_dim) for path, mod in vocab.values()}
        shapes.update({p: (m.in_features, m.out_features) for p, m in self._att.linears.items()})
        for path, (a, b) in list(w.dense.items()) + list(w.embeddings.items()):
            fin, fout = shapes[path]
            if tuple(a.shape) != (r, fin) or tuple(b.shape) != (fout, r):
                raise ValueError(f"adapter {name!r}: {path} has A {tuple(a.shape)} / B {tuple(b.shape)}, "
                                 f"expected ({r}, {fin}) / ({fout}, {r})")
        base_weights = {path: mod.weight for path, mod in vocab.values()}
        for path, t in w.base_layers.items():
            mine = base_weights.get(path)
            if mine is None or tuple(t.shape) != tuple(mine.shape) or not torch.equal(t.to(mine), mine):
                raise ValueError(
                    f"adapter {name!r}: the file's own copy of the base weight {path}.base_layer.weight "
                    f"({tuple(t.shape)}) differs from this base model's ({None if mine is None else tuple(mine.shape)}): "
                    "PEFT would replace the base weight with it (e.g. a resized or retrained vocabulary), but every "
                    "adapter of a fleet shares one frozen base; load the adapter on a base holding those weights")
        exp_paths = set(self.expert_paths(config))
        if set(w.experts) != exp_paths:
            raise ValueError(f"adapter {name!r}: expert weights for {sorted(w.experts)[:3]}..., "
                             f"expected {sorted(exp_paths)[:3]}...")
        for path, projs in w.experts.items():
            m = self._att.experts[path]
            g_a, g_b, d_a, d_b = SHARED_FACTORS[config.expert_sharing]
            E = m.num_experts
            want = {
                "gate_up": ((1 if g_a else E, r, m.hidden_size), (1 if g_b else E, m.up_out, r)),
                "down": ((1 if d_a else E, r, m.inter), (1 if d_b else E, m.hidden_size, r)),
            }
            for proj, (sa, sb) in want.items():
                if proj not in projs:
                    raise ValueError(f"adapter {name!r}: {path} lacks the {proj} factors")
                a, b = projs[proj]
                if tuple(a.shape) != sa or tuple(b.shape) != sb:
                    raise ValueError(f"adapter {name!r}: {path}.{proj} has A {tuple(a.shape)} / B "
                                     f"{tuple(b.shape)}, expected {sa} / {sb}")
        for key, t in w.tensors():
            if not torch.isfinite(t).all():
                raise ValueError(f"adapter {name!r}: tensor {key} has non-finite values (NaN or inf)")

    @torch.no_grad()
    def set_adapter_weights(self, name: str, w: AdapterWeights) -> None:
        """Overwrite an existing adapter's factors (its config must match the stored one's shapes)."""
        self.slot_of(name)
        mine = self._configs[name]
        if (w.config.slot_rank, w.config.expert_sharing) != (mine.slot_rank, mine.expert_sharing):
            raise ValueError(f"adapter {name!r}: weights have rank {w.config.slot_rank} / {w.config.expert_sharing}, "
                             f"the slot holds rank {mine.slot_rank} / {mine.expert_sharing}")
        self._check_weights(name, w)
        values = dict(w.tensors())
        masters = self._train[name].adam.master
        for key, p, idx in self.adapter_views(name):
            v = values[key] if self.comm is None else self.comm.local_tensor(name, key, p, values[key])
            p[idx] = v.to(p)
            if low_precision(p.dtype):  # keep the source's precision
                masters[key] = v.to(device=p.device, dtype=torch.float32, copy=True)

    def add_adapter_from_weights(self, name: str, w: AdapterWeights) -> int:
        """Validate everything first, then take a slot and write the weights."""
        self._validate(name, w.config)
        self._check_weights(name, w)
        slot = self.add_adapter(name, w.config)
        try:
            self.set_adapter_weights(name, w)
        except BaseException:  # nothing half-loaded stays
            self.remove_adapter(name)
            raise
        return slot

    def load_adapter(self, name: str, path: str | os.PathLike) -> int:
        """Load a PEFT (or vLLM / SGLang) adapter directory into a free slot."""
        from ..adapters.formats import load_adapter_dir

        self._check_alive()
        if name in self._slots:  # fail before reading files
            raise ValueError(f"adapter {name!r} already exists (slot {self._slots[name]})")
        vocab = vocab_modules(self.model)
        shapes = {p: (m.in_features, m.out_features) for p, m in self._att.linears.items()}
        shapes.update({p: (m.in_features, m.out_features) for p, m in vocab.values() if isinstance(m, torch.nn.Linear)})
        w = load_adapter_dir(path, experts_arch=self.experts_arch(), model_type=self.spec.model_type,
                             linear_shapes=shapes, embedding_shapes={
                                 p: (m.num_embeddings, m.embedding_dim) for p, m in vocab.values()
                                 if isinstance(m, torch.nn.Embedding)})
        return self.add_adapter_from_weights(name, w)

    def save_adapter(self, name: str, path: str | os.PathLike, format: str = "peft",
                     dtype: torch.dtype | None = None) -> None:
        """Write the adapter as a PEFT / vLLM / SGLang directory. Tensors are `get_adapter_weights`'s:
        fp32 (the masters) for a low-precision bank unless ``dtype`` says otherwise."""
        from ..adapters.formats import save_adapter_dir

        w = self.get_adapter_weights(name, dtype=dtype)  # every rank: it gathers shards
        if self.comm is None or self.comm.is_writer:
            save_adapter_dir(w, path, format=format)
        if self.comm is not None:
            self.comm.barrier()  # the files exist for every rank on return
