"""`save_state` / `load_state`: an adapter's weights, AdamW moments, step, optimizer config and
schedule (plus any pending gradients and caller extras such as a data cursor), written atomically.

Directory layout::

    state.json          {"format": "lorafleet-state", "version": 1, "adapter": {...},
                         "optim": {...}, "step": n, "pending": bool, "extra": {...},
                         "loss_scale": {...} (fp16: the adapter's LossScaler, if any),
                         "dropout_step": n (lora_dropout: train-mode forwards so far, if any)}
    tensors.safetensors weight/<key>, exp_avg/<key>, exp_avg_sq/<key>, grad/<key> (if pending),
                        master/<key> (fp32 master copies of bf16/fp16 weights, if any)

Weights keep the bank's dtype; moments and masters are fp32; gradients are what
`adapter_grads` returns (the bank's dtype for fp32 banks, the unscaled fp32 accumulator for
low-precision ones). Loading into a low-precision bank seeds each master from ``master/<key>``
(else ``weight/<key>``) and puts pending gradients in the fp32 accumulator; loading a
low-precision checkpoint into an fp32 bank takes the weights from the masters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import AdapterConfig
from ..utils.atomic import atomic_dir
from .optim import AdamState, LossScaler, OptimConfig, low_precision

STATE_FILE, TENSORS_FILE, FORMAT, VERSION = "state.json", "tensors.safetensors", "lorafleet-state", 1


class StateMixin:
    def save_state(self, name: str, path, extra: dict | None = None) -> None:
        """Write the adapter's full training state to directory ``path`` (replaced atomically)."""
        st = self.train_state(name)
        views = self.adapter_views(name)
        entries = {}  # file key -> (view key, bank parameter, this process's tensor)
        for (key, p, idx), g in zip(views, self.adapter_grads(name, views)):
            entries[f"weight/{key}"] = (key, p, p[idx].detach())
            if key in st.adam.exp_avg:
                entries[f"exp_avg/{key}"] = (key, p, st.adam.exp_avg[key])
                entries[f"exp_avg_sq/{key}"] = (key, p, st.adam.exp_avg_sq[key])
            if st.pending:
                entries[f"grad/{key}"] = (key, p, g.detach())
            master = st.adam.master.get(key)
            if master is not None and torch.equal(master.to(p.dtype), p[idx]):  # stale masters are dropped
                entries[f"master/{key}"] = (key, p, master)
        if self.comm is not None:  # distributed: shards gathered, pending gradients summed over ranks
            tensors = self.comm.full_state_tensors(name, entries)
        else:
            tensors = {k: t.cpu().contiguous().clone() for k, (_, _, t) in entries.items()}
        meta = {"format": FORMAT, "version": VERSION, "adapter": self._configs[name].to_dict(),
                "optim": st.optim.to_dict(), "step": st.adam.step, "pending": st.pending, "extra": extra or {}}
        if st.scaler is not None:
            meta["loss_scale"] = st.scaler.to_dict()
        if st.dropout_step:
            meta["dropout_step"] = st.dropout_step
        if self.comm is None or self.comm.is_writer:
            with atomic_dir(path) as tmp:
                save_file(tensors, str(tmp / TENSORS_FILE))
                (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if self.comm is not None:
            self.comm.barrier()  # the checkpoint exists for every rank on return

    def load_state(self, name: str, path, slot: int | None = None) -> dict:
        """Restore an adapter from `save_state`'s directory (adding it to a free slot if it does not
        exist). Everything is read and checked first: a bad checkpoint raises ValueError and
        changes nothing. Returns the checkpoint's ``extra`` dict."""
        meta, tensors = read_state(path)
        config = AdapterConfig.from_dict(meta["adapter"])
        optim = OptimConfig.from_dict(meta["optim"])
        scaler = LossScaler.from_dict(meta["loss_scale"]) if meta.get("loss_scale") is not None else None
        dropout_step = meta.get("dropout_step", 0)
        if not isinstance(dropout_step, int) or isinstance(dropout_step, bool) or dropout_step < 0:
            raise ValueError(f"{path}: checkpoint field 'dropout_step' is {dropout_step!r}, not a count")
        exists = name in self.adapters
        if exists and self._configs[name].to_dict() != config.to_dict():
            raise ValueError(f"{path}: checkpoint of adapter config {config.to_dict()} does not match "
                             f"adapter {name!r} ({self._configs[name].to_dict()})")
        if not exists:
            self._validate(name, config, slot)
            paths = set(self.target_paths(config))
        else:
            paths = None
        # check keys and shapes against where the adapter lives (or would live)
        expected = self._expected_shapes(config, paths) if not exists else {
            k: self._full_shape(name, k, p, p[idx]) for k, p, idx in self.adapter_views(name)}
        for k, shape in expected.items():
            t = tensors.get(f"weight/{k}")
            if t is None or tuple(t.shape) != shape:
                raise ValueError(f"{path}: checkpoint tensor weight/{k} is missing or has the wrong shape "
                                 f"({None if t is None else tuple(t.shape)} vs {shape})")
            for kind in ("exp_avg", "exp_avg_sq", "master") + (("grad",) if meta["pending"] else ()):
                u = tensors.get(f"{kind}/{k}")
                required = kind == "grad" or (kind != "master" and meta["step"] > 0)
                if (u is None and required) or (u is not None and tuple(u.shape) != shape):
                    raise ValueError(f"{path}: checkpoint tensor {kind}/{k} is missing or has the wrong shape")
        if not exists:
            self.add_adapter(name, config, slot=slot)
        dev = self.lora_device
        st = self._train[name]
        if self.needs_loss_scaling:  # fp16: the checkpoint's scale, else a fresh one
            st.scaler = scaler or LossScaler()
        else:
            st.scaler = None
        fp32_grads = self._fp32_grads(name)
        masters, grad_acc = {}, {}
        views = self.adapter_views(name)
        if self.comm is not None:  # distributed: this rank's shards; a pending gradient on one rank
            tensors = self.comm.local_state_tensors(name, views, tensors)
        with torch.no_grad():
            for k, p, idx in views:
                best = tensors.get(f"master/{k}", tensors[f"weight/{k}"])  # the most precise copy
                p[idx] = best.to(p)
                if low_precision(p.dtype):
                    masters[k] = best.to(device=dev, dtype=torch.float32, copy=True)
                if p.grad is not None:
                    p.grad[idx].zero_()
                if meta["pending"]:
                    g = tensors[f"grad/{k}"]
                    if fp32_grads:
                        grad_acc[k] = g.to(device=dev, dtype=torch.float32, copy=True)
                    else:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        p.grad[idx] = g.to(p.grad)
        adam = AdamState(step=int(meta["step"]), master=masters)
        for k in expected:
            if f"exp_avg/{k}" in tensors:
                adam.exp_avg[k] = tensors[f"exp_avg/{k}"].to(dev)
                adam.exp_avg_sq[k] = tensors[f"exp_avg_sq/{k}"].to(dev)
        st.optim, st.adam, st.pending, st.grad_acc = optim, adam, bool(meta["pending"]), grad_acc
        st.dropout_step = dropout_step
        return meta.get("extra", {})

    def _full_shape(self, name: str, key: str, param, view) -> tuple:
        """The shape of a factor in files: its view's, or the whole factor's when sharded."""
        return tuple(view.shape) if self.comm is None else self.comm.full_shape(name, key, param, view)

    def _expected_shapes(self, config: AdapterConfig, paths: set[str]) -> dict[str, tuple]:
        """Factor shapes of an adapter with ``config`` that is not in the fleet yet."""
        from ..lora.experts import SHARED_FACTORS

        r, out = config.slot_rank, {}
        for path, m in self._att.linears.items():
            if path in paths:
                out[f"{path}.A"], out[f"{path}.B"] = (r, m.in_features), (m.out_features, r)
        exp_paths = set(self.expert_paths(config))
        if exp_paths:
            n = [1 if sh else None for sh in SHARED_FACTORS[config.expert_sharing]]
            for path, m in self._att.experts.items():
                if path not in exp_paths:
                    continue
                E = m.num_experts
                out[f"{path}.gate_up.A"] = (n[0] or E, r, m.hidden_size)
                out[f"{path}.gate_up.B"] = (n[1] or E, m.up_out, r)
                out[f"{path}.down.A"] = (n[2] or E, r, m.inter)
                out[f"{path}.down.B"] = (n[3] or E, m.hidden_size, r)
        for path, m in self._att.embeddings.items():  # attached by _validate when the config names them
            if path in paths:
                out[f"{path}.A"], out[f"{path}.B"] = (r, m.num_embeddings), (m.embedding_dim, r)
        return out


def read_state(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and sanity-check a state directory; ValueError naming the file on any problem."""
    path = Path(path)
    state_file, tensors_file = path / STATE_FILE, path / TENSORS_FILE
    if not state_file.is_file() or not tensors_file.is_file():
        raise ValueError(f"{path}: not a lorafleet checkpoint (needs {STATE_FILE} and {TENSORS_FILE})")
    try:
        meta = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{state_file}: corrupt checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{state_file}: not a lorafleet checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{state_file}: checkpoint version {meta.get('version')!r}, this lorafleet reads {VERSION}")
    for k in ("adapter", "optim", "step", "pending"):
        if k not in meta:
            raise ValueError(f"{state_file}: checkpoint metadata lacks {k!r}")
    try:
        tensors = load_file(str(tensors_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{tensors_file}: corrupt checkpoint tensors ({e})") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{tensors_file}: non-finite values in {bad[:3]}")
    return meta, tensors
