"""Swap every targetable linear for a `MultiLoRALinear` and every packed experts module for a
`MultiLoRAExperts`, in place; `Attachment.detach()` puts the originals back.

What is targetable comes from the model's structure (`structure.discover`, carried by the
`ArchSpec`): every ``nn.Linear`` of the decoder layers except routers and gates, and every packed
experts module with transformers' experts interface. Everything is checked before the model is
touched, so a refusal leaves it as it was.

The LM head and the input embedding (PEFT's ``"lm_head"`` / ``"embed_tokens"`` targets) are
attached later and only on demand (`attach_vocab`, at the first adapter that targets them): their
banks are ``max_adapters × max_rank × vocab`` and would cost memory for nothing otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..lora import MultiLoRAEmbedding, MultiLoRAExperts, MultiLoRALinear, SlotBank
from .registry import ArchSpec
from .structure import Structure, discover


@dataclass
class Attachment:
    model: nn.Module
    linears: dict[str, MultiLoRALinear] = field(default_factory=dict)
    experts: dict[str, MultiLoRAExperts] = field(default_factory=dict)
    # input embeddings with LoRA (attached on demand); the LM head, once attached, is in `linears`
    embeddings: dict[str, MultiLoRAEmbedding] = field(default_factory=dict)
    # the input embedding / LM head by their target name (the module's own short name: PEFT's
    # "embed_tokens" / "lm_head" on most models) -> module path, attached or not
    vocab_paths: dict[str, str] = field(default_factory=dict)
    embedding_path: str | None = None
    head_path: str | None = None
    # linears of MoE blocks left alone because they are routers / gates: path -> why
    routers: dict[str, str] = field(default_factory=dict)
    # linears left out by a per-architecture exception (read through `.weight`): path -> why
    excluded: dict[str, str] = field(default_factory=dict)
    _originals: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    _requires_grad: dict[str, bool] = field(default_factory=dict)

    @property
    def linear_names(self) -> set[str]:
        """Short names of the decoder linears ("all-linear"; the LM head is not one, as in PEFT)."""
        heads = set(self.vocab_paths.values())
        return {m.short_name for p, m in self.linears.items() if p not in heads}

    def lora_modules(self):
        yield from self.linears.values()
        yield from self.experts.values()
        yield from self.embeddings.values()

    def vocab_attached(self, path: str) -> bool:
        return path in self.linears or path in self.embeddings

    def detach(self):
        for parent, child_name, original in reversed(self._originals):
            setattr(parent, child_name, original)
        self._originals.clear()
        for name, p in self.model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])


def _structure(model: nn.Module, spec: ArchSpec) -> Structure:
    st = spec.structure if spec.structure is not None else discover(model)
    if st is None:
        raise ValueError(f"{spec.model_type} ({type(model).__name__}): found no decoder layers")
    return st


def attach(model: nn.Module, spec: ArchSpec, bank: SlotBank, experts: bool = True, dtype=None) -> Attachment:
    st = _structure(model, spec)
    todo = [(path, module, "linear") for path, module in st.linears.items()]
    if experts:
        bad = {p: e.problem for p, e in st.packed_experts.items() if e.problem}
        if bad:
            path, problem = next(iter(bad.items()))
            raise ValueError(
                f"{spec.model_type}: expert LoRA cannot attach to {path} ({len(bad)} such module(s)): {problem}. "
                "lorafleet needs transformers' experts interface (`use_experts_implementation`: 3D "
                "gate_up_proj/down_proj, has_gate/is_transposed/is_concatenated/has_bias, _apply_gate). "
                "Build the Fleet with expert_lora=False (and adapters with experts=False) to train the "
                f"dense linears {list(st.linear_names)} only"
            )
        todo += [(path, e.module, "experts") for path, e in st.packed_experts.items()]
    vocab = vocab_modules(model)
    att = Attachment(model, routers=dict(st.routers), excluded=dict(st.excluded),
                     vocab_paths={path.rsplit(".", 1)[-1]: path for path, _ in vocab.values()},
                     embedding_path=vocab.get("embed_tokens", (None,))[0], head_path=vocab.get("lm_head", (None,))[0])
    att._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():  # the base stays frozen: only slot tensors train
        p.requires_grad_(False)
    for path, module, kind in todo:
        parent_path, child_name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        if kind == "linear":
            wrapped = MultiLoRALinear(module, bank, path, dtype=dtype)
            att.linears[path] = wrapped
        else:
            wrapped = MultiLoRAExperts(module, bank, path, dtype=dtype)
            att.experts[path] = wrapped
        _swap_in(att, parent, child_name, module, wrapped)
    return att


def _swap_in(att: Attachment, parent: nn.Module, child_name: str, module: nn.Module, wrapped: nn.Module) -> None:
    """Put ``wrapped`` where ``module`` was, remembering the original for `detach`."""
    setattr(parent, child_name, wrapped)
    att._originals.append((parent, child_name, module))


def vocab_modules(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{"embed_tokens": (path, nn.Embedding), "lm_head": (path, nn.Linear)}`` for the model's
    input embedding and LM head (``get_input_embeddings`` / ``get_output_embeddings``), keyed by
    role (the paths' own names may differ, e.g. GPT-NeoX's ``embed_in`` / ``embed_out``); a
    module of another type is left out."""
    out = {}
    for getter, kind in (("get_input_embeddings", nn.Embedding), ("get_output_embeddings", nn.Linear)):
        try:
            mod = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            mod = None
        mod = getattr(mod, "base_layer", mod)  # already wrapped by us
        if not isinstance(mod, kind):
            continue
        path = next((n for n, m in model.named_modules() if m is mod or getattr(m, "base_layer", None) is mod), None)
        if path:
            out["embed_tokens" if kind is nn.Embedding else "lm_head"] = (path, mod)
    return out


def attach_vocab(att: Attachment, bank: SlotBank, path: str, dtype=None):
    """Wrap the LM head / input embedding at ``path`` (once); its bank is allocated here."""
    if att.vocab_attached(path):
        return att.linears.get(path) or att.embeddings[path]
    model = att.model
    module = model.get_submodule(path)
    parent_path, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(module, nn.Embedding):
        wrapped = MultiLoRAEmbedding(module, bank, path, dtype=dtype)
        att.embeddings[path] = wrapped
    else:
        wrapped = MultiLoRALinear(module, bank, path, dtype=dtype)
        att.linears[path] = wrapped
    _swap_in(att, parent, child_name, module, wrapped)
    return wrapped
