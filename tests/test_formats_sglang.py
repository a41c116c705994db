"""The `sglang` adapter layout against what SGLang 0.5.23's LoRA loader reads (srt/lora/lora.py,
mem_pool.py): gate_up A of r rows, expert dim 1 only in the shared-outer layout, files of the
earlier 2r-row layout still read, and the zero partners of incomplete q/k/v and gate/up groups."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.adapters.formats import AdapterFormatError, load_adapter_dir, save_adapter_dir
from lorafleet.adapters.formats_layouts import sglang_dense_partners

from test_formats import E, EXPERT_PATHS, H, I, PREFIX, R, assert_same_deltas, make_weights


def _tensors(d):
    return load_file(str(d / "adapter_model.safetensors"))


@pytest.mark.parametrize("sharing, e_gate_up_a, e_down_b", [("none", E, E), ("shared_a", E, E),
                                                            ("shared_outer", 1, 1)])
def test_expert_dims_follow_sglangs_pools(tmp_path, sharing, e_gate_up_a, e_down_b):
    """SGLang's per-expert pool copies expert e of a 3-D tensor into expert e only (a [1, ...]
    factor would reach expert 0 alone) and its shared-outer pool requires expert dim 1."""
    w = make_weights(sharing)
    save_adapter_dir(w, tmp_path / "ad", format="sglang")
    t = _tensors(tmp_path / "ad")
    p = PREFIX + EXPERT_PATHS[0]
    assert t[f"{p}.gate_up_proj.lora_A.weight"].shape == (e_gate_up_a, R, H)
    assert t[f"{p}.gate_up_proj.lora_B.weight"].shape == (E, 2 * I, R)
    assert t[f"{p}.down_proj.lora_A.weight"].shape == (E, R, I)
    assert t[f"{p}.down_proj.lora_B.weight"].shape == (e_down_b, H, R)
    ga = w.experts[EXPERT_PATHS[0]]["gate_up"][0]
    assert t[f"{p}.gate_up_proj.lora_A.weight"].equal(ga.expand(e_gate_up_a, -1, -1))
    back = load_adapter_dir(tmp_path / "ad", experts_arch=w.experts_arch)
    assert back.config.expert_sharing == sharing
    assert_same_deltas(w, back, tol=0.0)


@pytest.mark.parametrize("sharing", ["none", "shared_outer"])
def test_files_of_the_earlier_2r_row_layout_still_read(tmp_path, sharing):
    """Earlier exports held gate_up A as [1|E, 2r, H] = [A; A]; read exactly as before."""
    w = make_weights(sharing)
    save_adapter_dir(w, tmp_path / "ad", format="sglang")
    t = _tensors(tmp_path / "ad")
    for p in EXPERT_PATHS:
        k = f"{PREFIX}{p}.gate_up_proj.lora_A.weight"
        t[k] = torch.cat([t[k], t[k]], dim=1).contiguous()
    save_file(t, str(tmp_path / "ad" / "adapter_model.safetensors"))
    back = load_adapter_dir(tmp_path / "ad", experts_arch=w.experts_arch)
    assert back.config.rank == R and back.config.expert_sharing == sharing
    assert_same_deltas(w, back, tol=0.0)


def test_earlier_2r_rows_with_different_halves_read_as_separate_gate_and_up(tmp_path):
    """[A_g; A_u]: SGLang's per-expert pool (after its repeat) gives rows [0:r] to gate and [r:2r]
    to up, so that is how it reads: the exact rank-2r fused form."""
    w = make_weights("none")
    save_adapter_dir(w, tmp_path / "ad", format="sglang")
    t = _tensors(tmp_path / "ad")
    k = f"{PREFIX}{EXPERT_PATHS[0]}.gate_up_proj.lora_A.weight"
    kb = k.replace("lora_A", "lora_B")
    a_gate, a_up, b = t[k], torch.randn(E, R, H, dtype=t[k].dtype), t[kb]
    t[k] = torch.cat([a_gate, a_up], dim=1).contiguous()
    save_file(t, str(tmp_path / "ad" / "adapter_model.safetensors"))
    back = load_adapter_dir(tmp_path / "ad", experts_arch=w.experts_arch)
    ba, bb = back.experts[EXPERT_PATHS[0]]["gate_up"]
    delta = bb.double() @ ba.double()
    want = torch.cat([b[:, :I].double() @ a_gate.double(), b[:, I:].double() @ a_up.double()], dim=1)
    assert back.config.rank == 2 * R and torch.allclose(delta, want, rtol=1e-12, atol=1e-12)


def test_a_gate_up_a_of_other_rows_is_refused_naming_both_layouts(tmp_path):
    w = make_weights("none")
    save_adapter_dir(w, tmp_path / "ad", format="sglang")
    t = _tensors(tmp_path / "ad")
    k = f"{PREFIX}{EXPERT_PATHS[0]}.gate_up_proj.lora_A.weight"
    t[k] = t[k][:, :2].contiguous()
    save_file(t, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match=rf"gate_up_proj.lora_A.weight: shape \[{E}, 2, {H}\] .* expected "
                                                 rf"\[1\|{E}, {R}, {H}\] or \[1\|{E}, {2 * R}, {H}\]"):
        load_adapter_dir(tmp_path / "ad", experts_arch=w.experts_arch)


def _dense(*names, r=2, hid=8, outs=None):
    outs = outs or {"q_proj": 8, "k_proj": 4, "v_proj": 4, "gate_proj": 12, "up_proj": 12}
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in names:
        parent = "self_attn" if n in ("q_proj", "k_proj", "v_proj") else "mlp"
        stem = f"{PREFIX}model.layers.0.{parent}.{n}"
        out[f"{stem}.lora_A.weight"] = torch.randn(r, hid, generator=g)
        out[f"{stem}.lora_B.weight"] = torch.randn(outs[n], r, generator=g)
    return out


@pytest.mark.parametrize("names, added, asked", [  # asked: output sizes no present twin (k/v, gate/up) gives
    (("q_proj",), {"k_proj": 4, "v_proj": 4}, {"k_proj", "v_proj"}),
    (("q_proj", "k_proj"), {"v_proj": 4}, set()),
    (("k_proj", "v_proj"), {"q_proj": 8}, {"q_proj"}),
    (("v_proj",), {"q_proj": 8, "k_proj": 4}, {"q_proj"}),
    (("up_proj",), {"gate_proj": 12}, set()),
    (("gate_proj",), {"up_proj": 12}, set()),
    (("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), {}, set()),
])
def test_dense_partners_are_zero_factors_of_the_right_shapes(names, added, asked):
    tensors = _dense(*names)
    calls = []

    def out_features(path):
        calls.append(path.rsplit(".", 1)[-1])
        assert path.startswith("model.layers.0.self_attn.")  # the missing module's own path
        return {"q_proj": 8, "k_proj": 4, "v_proj": 4}[path.rsplit(".", 1)[-1]]

    got = sglang_dense_partners(tensors, out_features)
    want_keys = set()
    for n, fout in added.items():
        parent = "self_attn" if n in ("q_proj", "k_proj", "v_proj") else "mlp"
        stem = f"{PREFIX}model.layers.0.{parent}.{n}"
        want_keys |= {f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"}
        assert got[f"{stem}.lora_A.weight"].shape == (2, 8) and got[f"{stem}.lora_B.weight"].shape == (fout, 2)
    assert set(got) == want_keys and all(not t.any() for t in got.values())
    assert set(calls) == asked


def test_a_partner_of_unknown_output_size_is_refused_naming_it():
    with pytest.raises(AdapterFormatError, match=r"q_proj.lora_A.weight: SGLang stacks q_proj/k_proj/v_proj together "
                                                 r"and needs a zero k_proj LoRA beside q_proj, but the output size of "
                                                 r".*self_attn.k_proj is unknown"):
        sglang_dense_partners(_dense("q_proj"))
