"""Tensor layouts of MoE expert LoRA factors in the three adapter formats.

Internal helpers of :mod:`lorafleet.adapters.formats` (which re-exports :class:`AdapterFormatError`).
Everything here is a pure reshuffle of tensors (reshape / permute / slice / concatenate), so
every conversion is exact.

Our convention (see ``weights.py``): per experts path, ``"gate_up"`` has ``A [E_A, r, H]``,
``B [E_B, 2I, r]`` and ``"down"`` has ``A [E_A, r, I]``, ``B [E_B, H, r]``; ``E_A`` / ``E_B`` is 1
for a factor shared by all experts. Inside this module factors are mostly handled "full"
(expert dim always ``E``), see :func:`full`.

Layouts (verified against PEFT 0.21.2 ``peft/tuners/lora/layer.py`` class ``ParamWrapper``):

- PEFT ``target_parameters`` (PEFT >= 0.19.1). ``_get_in_out_features`` reads
  ``num_experts, in, out = param.shape`` and ``update_layer`` swaps in/out unless the experts
  module is ``is_transposed`` (GPT-OSS), so ``in``/``out`` are always the *real* input/output
  features: ``lora_A = nn.Linear(in, r * E)`` -> weight ``[r·E, in]``, ``lora_B = nn.Linear(r * E,
  out)`` -> weight ``[out, r·E]``. ``get_delta_weight`` reads ``A.reshape(E, r, in)``
  (expert-slowest) and ``B.reshape(out, r, E)`` (expert-fastest). Two targeted parameters of one
  module nest two wrappers; PEFT walks ``module.named_parameters(recurse=False)`` (registration
  order: ``gate_up_proj`` before ``down_proj`` in every HF 5.x experts class), so ``gate_up_proj`` is
  wrapped first and ends up inner: its keys carry ``.base_layer``.
- PEFT 0.17 / 0.18 ``target_parameters``: no in/out swap, ``in, out = param.shape[1:]`` and
  ``delta = einsum("o r e, e r i -> e i o", B.reshape(out, r, E), A.reshape(E, r, in))``. For the
  HF-v5 non-transposed ``gate_up_proj [E, 2I, H]`` that gives ``lora_A [r·E, 2I]``,
  ``lora_B [H, r·E]`` and per expert ``ΔW_e = A3[e].T @ B3[:, :, e].T``, i.e. our
  ``A_e = B3[:, :, e].T`` and ``B_e = A3[e].T`` (:func:`peft_read`). For transposed bases (GPT-OSS)
  0.17/0.18 already produced the modern layout.
- vLLM per-expert 2D names: ``P.{e}.gate_proj / up_proj / down_proj`` (Mixtral:
  ``block_sparse_moe.experts.{e}.w1 / w3 / w2``).
- SGLang native 3D names (checked against SGLang 0.5.23 ``srt/lora/lora.py`` and ``mem_pool.py``):
  ``P.gate_up_proj.lora_A.weight (1|E, r, H)``: ``normalize_gate_up_proj`` repeats a stacked
  gate_up A twice along rank (gate output rows read the first ``r`` shrink outputs, up rows the
  second ``r``); ``P.gate_up_proj.lora_B.weight (E, 2I, r)``, ``P.down_proj.lora_A.weight (E, r, I)``,
  ``P.down_proj.lora_B.weight (1|E, H, r)``. Expert dim 1 only in the shared-outer layout (gate_up
  A and down B both 1: SGLang's ``--experts-shared-outer-loras`` pool, which it also auto-detects
  from a gate_up A of expert dim 1); its per-expert pool copies expert ``e`` of a 3D tensor into
  expert ``e`` only, so every factor there has expert dim E. Earlier lorafleet exports hold
  gate_up A as ``(1|E, 2r, H)`` = ``[A; A]``; :func:`sglang_read` takes both.
- SGLang stacks dense q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``, only from a
  ``q_proj`` key with a ``v_proj`` key beside it (``normalize_qkv_proj``) and from a ``gate_proj``
  key; an orphan ``k_proj`` / ``v_proj`` / ``up_proj`` matches no target and is skipped.
  :func:`sglang_dense_partners` writes zero factors for the missing members (a zero LoRA changes
  nothing), so every targeted projection is stacked.
"""

from __future__ import annotations

import torch

from .weights import ExpertsArch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "lorafleet.json"
PREFIX = "base_model.model."
PROJS = ("gate_up", "down")  # also the HF registration order of the packed parameters
PARAM_OF_PROJ = {"gate_up": "gate_up_proj", "down": "down_proj"}
PROJ_OF_PARAM = {v: k for k, v in PARAM_OF_PROJ.items()}
VLLM_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ("w1", "w3", "w2")  # gate, up, down
SHARED_FACTORS = {
    "none": frozenset(),
    "shared_a": frozenset({("gate_up", "A"), ("down", "A")}),
    "shared_outer": frozenset({("gate_up", "A"), ("down", "B")}),
}

Factors = tuple[torch.Tensor, torch.Tensor]


class AdapterFormatError(ValueError):
    """An adapter directory or an `AdapterWeights` cannot be converted; the message names the
    file, key or field at fault."""


def proj_dims(proj: str, arch: ExpertsArch) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    if proj == "gate_up":
        return arch.hidden_size, 2 * arch.intermediate_size
    return arch.intermediate_size, arch.hidden_size


def full(t: torch.Tensor, num_experts: int, what: str = "factor") -> torch.Tensor:
    """[1|E, ...] -> [E, ...] (a shared factor is replicated, which is exact)."""
    if t.shape[0] == num_experts:
        return t
    if t.shape[0] == 1:
        return t.expand(num_experts, *t.shape[1:])
    raise AdapterFormatError(f"{what}: expert dimension {t.shape[0]} is neither 1 nor {num_experts}")


def gate_up_rows(intermediate: int, interleaved: bool) -> tuple[slice, slice]:
    if interleaved:
        return slice(0, None, 2), slice(1, None, 2)
    return slice(0, intermediate), slice(intermediate, None)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor owning its memory (safetensors refuses shared storage)."""
    return t.detach().to("cpu").contiguous().clone()


# ----------------------------------------------------------------------------- PEFT target_parameters
def peft_write(stem: str, a: torch.Tensor, b: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """Our full-or-shared factors -> PEFT >= 0.19.1 ``lora_A [r·E, in]``, ``lora_B [out, r·E]``."""
    a, b = full(a, num_experts, stem), full(b, num_experts, stem)
    e, r, fin = a.shape
    fout = b.shape[1]
    return {
        f"{stem}.lora_A.weight": _own(a.reshape(e * r, fin)),
        f"{stem}.lora_B.weight": _own(b.permute(1, 2, 0).reshape(fout, r * e)),
    }


def peft_read(key: str, a: torch.Tensor, b: torch.Tensor, proj: str, arch: ExpertsArch, r: int,
              legacy: bool, version: str) -> Factors:
    """PEFT ``lora_A`` / ``lora_B`` of one targeted experts parameter -> full ``A [E, r, in]``,
    ``B [E, out, r]``. ``legacy``: the file was written by PEFT 0.17/0.18 (no in/out swap)."""
    num_e = arch.num_experts
    fin, fout = proj_dims(proj, arch)
    re_ = r * num_e
    modern_ok = tuple(a.shape) == (re_, fin) and tuple(b.shape) == (fout, re_)
    swapped_ok = tuple(a.shape) == (re_, fout) and tuple(b.shape) == (fin, re_)
    if legacy:
        # 0.17/0.18 swapped A/B roles only for non-transposed (HF-v5) weights; GPT-OSS (the one
        # transposed, interleaved family) was already in the modern layout. Shapes win when they
        # are unambiguous.
        swapped = not arch.interleaved_gate_up
        if swapped and not swapped_ok and modern_ok:
            swapped = False
        elif not swapped and not modern_ok and swapped_ok:
            swapped = True
    else:
        swapped = False
    ok = swapped_ok if swapped else modern_ok
    if not ok:
        want = (f"lora_A [{re_}, {fout}] and lora_B [{fin}, {re_}]" if swapped
                else f"lora_A [{re_}, {fin}] and lora_B [{fout}, {re_}]")
        hint = ""
        if not legacy and swapped_ok:
            hint = (" (these shapes match the PEFT 0.17/0.18 layout with swapped A/B roles, but "
                    f"peft_version is {version!r})")
        raise AdapterFormatError(
            f"{key}: {PARAM_OF_PROJ[proj]} LoRA shapes lora_A {list(a.shape)}, lora_B {list(b.shape)} "
            f"disagree with r={r}, num_experts={num_e}, hidden={arch.hidden_size}, "
            f"intermediate={arch.intermediate_size}: expected {want}{hint}"
        )
    if swapped:
        big_a = b.reshape(fin, r, num_e).permute(2, 1, 0)  # our A_e = B3[:, :, e].T
        big_b = a.reshape(num_e, r, fout).transpose(1, 2)  # our B_e = A3[e].T
    else:
        big_a = a.reshape(num_e, r, fin)
        big_b = b.reshape(fout, r, num_e).permute(2, 0, 1)
    return big_a.contiguous(), big_b.contiguous()


# ----------------------------------------------------------------------------- vLLM per-expert 2D
def vllm_write(prefix: str, projs: dict[str, Factors], arch: ExpertsArch, r: int,
               names: tuple[str, str, str], interleaved: bool) -> dict[str, torch.Tensor]:
    """Per-expert 2D keys ``prefix.{e}.<name>.lora_A/B.weight``; a missing projection is written
    as zeros (every expert needs all three)."""
    num_e, hid, inter = arch.num_experts, arch.hidden_size, arch.intermediate_size
    ref = next(iter(projs.values()))[0]
    dtype = ref.dtype
    if "gate_up" in projs:
        gu_a = full(projs["gate_up"][0], num_e)
        gu_b = full(projs["gate_up"][1], num_e)
    else:
        gu_a = torch.zeros(num_e, r, hid, dtype=dtype)
        gu_b = torch.zeros(num_e, 2 * inter, r, dtype=dtype)
    if "down" in projs:
        dn_a, dn_b = full(projs["down"][0], num_e), full(projs["down"][1], num_e)
    else:
        dn_a = torch.zeros(num_e, r, inter, dtype=dtype)
        dn_b = torch.zeros(num_e, hid, r, dtype=dtype)
    g_rows, u_rows = gate_up_rows(inter, interleaved)
    gate, up, down = names
    out: dict[str, torch.Tensor] = {}
    for e in range(num_e):
        for name, a, b in ((gate, gu_a[e], gu_b[e][g_rows]), (up, gu_a[e], gu_b[e][u_rows]),
                           (down, dn_a[e], dn_b[e])):
            out[f"{prefix}.{e}.{name}.lora_A.weight"] = _own(a)
            out[f"{prefix}.{e}.{name}.lora_B.weight"] = _own(b)
    return out


def fuse_gate_up(ga: torch.Tensor, gb: torch.Tensor, ua: torch.Tensor, ub: torch.Tensor,
                 interleaved: bool) -> Factors:
    """Separate gate / up LoRAs ``[E, r, H]``, ``[E, I, r]`` -> one fused gate_up LoRA.

    Shared A (``gate.A == up.A`` for every expert): rank r, ``B = [B_g; B_u]``. Otherwise the exact
    block equivalent of rank 2r: ``A = [A_g; A_u]``, ``B = [[B_g, 0], [0, B_u]]``.
    """
    num_e, inter, r = gb.shape
    g_rows, u_rows = gate_up_rows(inter, interleaved)
    if torch.equal(ga, ua):
        b = gb.new_zeros(num_e, 2 * inter, r)
        b[:, g_rows] = gb
        b[:, u_rows] = ub
        return ga.contiguous(), b
    a = torch.cat([ga, ua], dim=1)
    b = gb.new_zeros(num_e, 2 * inter, 2 * r)
    b[:, g_rows, :r] = gb
    b[:, u_rows, r:] = ub
    return a, b


# ----------------------------------------------------------------------------- SGLang native 3D
def sglang_shared_outer(projs: dict[str, Factors], num_experts: int) -> bool:
    """Whether these factors take SGLang's shared-outer layout: down B shared (expert dim 1), down
    A per expert, and gate_up A (if there) shared. A shared gate_up A without a down LoRA is left
    per expert: it may be ``shared_a``, and SGLang's per-expert pool would give a ``[1, ...]`` A to
    expert 0 only (while a shared-outer server refuses an E-expert A loudly)."""
    if num_experts == 1 or "down" not in projs:
        return False
    dn_a, dn_b = projs["down"]
    return dn_b.shape[0] == 1 and dn_a.shape[0] != 1 and (
        "gate_up" not in projs or projs["gate_up"][0].shape[0] == 1)


def sglang_write(stem: str, projs: dict[str, Factors], arch: ExpertsArch, r: int) -> dict[str, torch.Tensor]:
    """SGLang 3D keys: gate_up A ``[1|E, r, H]`` (SGLang repeats it for gate and up), gate_up B
    ``[E, 2I, r]``, down A ``[E, r, I]``, down B ``[1|E, H, r]``; expert dim 1 only in the
    shared-outer layout (:func:`sglang_shared_outer`), every other factor replicated to E. A
    missing projection is written as zeros of the same layout."""
    num_e, hid, inter = arch.num_experts, arch.hidden_size, arch.intermediate_size
    dtype = next(iter(projs.values()))[0].dtype
    outer = sglang_shared_outer(projs, num_e)
    e_out = 1 if outer else num_e  # expert dim of gate_up A and down B
    if "gate_up" in projs:
        gu_a, gu_b = projs["gate_up"]
    else:
        gu_a, gu_b = torch.zeros(e_out, r, hid, dtype=dtype), torch.zeros(num_e, 2 * inter, r, dtype=dtype)
    if "down" in projs:
        dn_a, dn_b = projs["down"]
    else:
        dn_a, dn_b = torch.zeros(num_e, r, inter, dtype=dtype), torch.zeros(e_out, hid, r, dtype=dtype)
    if not outer:
        gu_a, dn_b = full(gu_a, num_e, stem), full(dn_b, num_e, stem)
    return {
        f"{stem}.gate_up_proj.lora_A.weight": _own(gu_a),
        f"{stem}.gate_up_proj.lora_B.weight": _own(full(gu_b, num_e)),
        f"{stem}.down_proj.lora_A.weight": _own(full(dn_a, num_e)),
        f"{stem}.down_proj.lora_B.weight": _own(dn_b),
    }


def sglang_read(stem: str, tensors: dict[str, torch.Tensor], arch: ExpertsArch, r: int
                ) -> tuple[dict[str, Factors], set[tuple[str, str]]]:
    """SGLang 3D tensors of one experts module -> full factors per projection, plus the set of
    (proj, "A"|"B") factors stored with expert dim 1. gate_up A may hold ``r`` rows (SGLang's
    layout, the same shrink for gate and up) or ``2r`` (earlier lorafleet exports: gate rows then up rows,
    as SGLang's per-expert pool reads them after its repeat)."""
    num_e, hid, inter = arch.num_experts, arch.hidden_size, arch.intermediate_size
    out: dict[str, Factors] = {}
    shared: set[tuple[str, str]] = set()
    for proj, param in PARAM_OF_PROJ.items():
        ka, kb = f"{stem}.{param}.lora_A.weight", f"{stem}.{param}.lora_B.weight"
        if ka not in tensors:
            continue
        a, b = tensors[ka], tensors[kb]
        fin, fout = proj_dims(proj, arch)
        a_rows = (r, 2 * r) if proj == "gate_up" else (r,)
        for key, t, rows, cols in ((ka, a, a_rows, fin), (kb, b, (fout,), r)):
            if t.dim() != 3 or t.shape[1] not in rows or t.shape[2] != cols or t.shape[0] not in (1, num_e):
                want = " or ".join(f"[1|{num_e}, {n}, {cols}]" for n in rows)
                raise AdapterFormatError(
                    f"{key}: shape {list(t.shape)} disagrees with r={r} and experts_arch[{stem!r}] "
                    f"(E={num_e}, H={hid}, I={inter}): expected {want}"
                )
        if a.shape[0] == 1 and num_e > 1:
            shared.add((proj, "A"))
        if b.shape[0] == 1 and num_e > 1:
            shared.add((proj, "B"))
        a, b = full(a, num_e), full(b, num_e)
        if proj == "gate_up" and a.shape[1] == 2 * r:
            first, second = a[:, :r], a[:, r:]
            if torch.equal(first, second):
                a = first
            else:  # independent gate / up shrinks: exact fused form of rank 2r
                bb = b.new_zeros(num_e, 2 * inter, 2 * r)
                bb[:, :inter, :r] = b[:, :inter]
                bb[:, inter:, r:] = b[:, inter:]
                b = bb
        out[proj] = (a.contiguous(), b.contiguous())
    return out, shared


# ----------------------------------------------------------------------------- SGLang dense stacks
# SGLang 0.5.23 (srt/lora/lora.py): normalize_qkv_proj stacks q, k, v into qkv_proj from the q_proj
# key and looks v_proj up beside it (KeyError when absent; k is zero-filled); normalize_gate_up_proj
# stacks from the gate_proj key (a missing up is zero-filled). k / v without q and up without gate
# stay unstacked, match no target module and are skipped. So every member of a group is written.
SGLANG_STACKS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_SAME_OUT = {"k_proj": "v_proj", "v_proj": "k_proj", "gate_proj": "up_proj", "up_proj": "gate_proj"}


def sglang_dense_partners(tensors: dict[str, torch.Tensor], out_features=None) -> dict[str, torch.Tensor]:
    """Zero ``lora_A [r, in]`` / ``lora_B [out, r]`` for the members of a q/k/v or gate/up group
    that ``tensors`` (dense PEFT names) lacks where it has another member. ``in`` is the present
    member's (all members read the same input); ``out`` is that of the member with equal output
    (k/v, gate/up) when present, else ``out_features(path)`` (``path`` the missing module's, e.g.
    ``"model.layers.0.self_attn.v_proj"``; None, or an answer that is not a positive int:
    AdapterFormatError naming the module)."""
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    out: dict[str, torch.Tensor] = {}
    for key in tensors:
        if not key.endswith(suffix_a) or tensors[key].dim() != 2:
            continue
        parent, _, leaf = key[: -len(suffix_a)].rpartition(".")
        group = next((g for g in SGLANG_STACKS if leaf in g), None)
        if group is None:
            continue
        a = tensors[key]
        for name in group:
            ka, kb = f"{parent}.{name}{suffix_a}", f"{parent}.{name}{suffix_b}"
            if ka in tensors or ka in out:
                continue
            twin = f"{parent}.{_SAME_OUT.get(name, '')}{suffix_b}"
            if twin in tensors:
                n_out = tensors[twin].shape[0]
            else:
                path = f"{parent}.{name}"
                n_out = out_features(path[len(PREFIX):] if path.startswith(PREFIX) else path) if out_features else None
                if not isinstance(n_out, int) or n_out < 1:
                    raise AdapterFormatError(
                        f"{key}: SGLang stacks {'/'.join(group)} together and needs a zero {name} LoRA beside "
                        f"{leaf}, but the output size of {parent}.{name} is unknown here")
            out[ka] = a.new_zeros(a.shape)
            out[kb] = a.new_zeros(n_out, a.shape[0])
    return out
