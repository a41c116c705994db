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


# ----------------------------------------------------------------------------- plain exports of partial groups
_PARTIAL = {"q_only": (["q_proj"], {"k_proj", "v_proj"}),
            "kv_only": (["k_proj", "v_proj"], {"q_proj"}),
            "up_only": (["up_proj"], {"gate_proj"})}


@pytest.fixture(scope="module")
def partial_fleet():
    """A debug Qwen3 fleet (q/k/v outputs differ: GQA) with one random adapter per partial group."""
    import lorafleet as lf
    from lorafleet.models.debug import build_debug_model
    from peft_ref import randomize

    model = build_debug_model("qwen3", seed=0)
    fleet = lf.Fleet(model, max_adapters=2 * len(_PARTIAL), max_rank=8)
    for i, (case, (targets, _)) in enumerate(_PARTIAL.items()):
        fleet.add_adapter(case, lf.AdapterConfig(rank=4, alpha=6, target_modules=targets, seed=i))
        randomize(fleet, case, seed=10 + i)
    return fleet


@pytest.mark.parametrize("case", list(_PARTIAL))
def test_plain_export_of_a_partial_group_has_zero_partners_and_reloads_exactly(partial_fleet, case, tmp_path):
    """SGLang stacks q/k/v from the q_proj key (v_proj beside it) and gate/up from gate_proj: a
    plain `save_adapter(format="sglang")` writes zero LoRA for the missing members, lists them in
    target_modules, and loads back with the same logits and the adapter's own targets."""
    import json

    from peft_ref import rel

    fleet = partial_fleet
    targets, partners = _PARTIAL[case]
    fleet.save_adapter(case, tmp_path / case, format="sglang")
    t = _tensors(tmp_path / case)
    cfg = json.loads((tmp_path / case / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(set(targets) | partners)
    linears = fleet._att.linears
    layers = fleet.model.config.num_hidden_layers
    for layer in range(layers):
        for name in partners:
            parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj") else "mlp"
            path = f"model.layers.{layer}.{parent}.{name}"
            a, b = t[f"{PREFIX}{path}.lora_A.weight"], t[f"{PREFIX}{path}.lora_B.weight"]
            assert a.shape == (4, linears[path].in_features) and b.shape == (linears[path].out_features, 4)
            assert not a.any() and not b.any()
        for name in targets:  # the trained factors, unchanged
            parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj") else "mlp"
            path = f"model.layers.{layer}.{parent}.{name}"
            assert t[f"{PREFIX}{path}.lora_A.weight"].any() and t[f"{PREFIX}{path}.lora_B.weight"].any()
    fleet.load_adapter(case + "_back", tmp_path / case)
    try:
        assert set(fleet.adapters[case + "_back"].target_modules) == set(targets)  # stable on a round trip
        ids = torch.randint(0, fleet.model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = fleet.forward(torch.cat([ids, ids, ids]), adapters=[case, case, case + "_back", case + "_back",
                                                                      None, None]).logits
        assert rel(out[2:4], out[:2]) < 1e-5 and rel(out[:2], out[4:]) > 1e-3  # the adapter does change them
    finally:
        fleet.remove_adapter(case + "_back")


def test_the_sinks_partner_step_adds_nothing_to_a_fleet_snapshot(partial_fleet):
    """The export already holds every partner: the sink's step (kept for snapshots from other
    sources) returns the snapshot as it is, nothing added twice."""
    from lorafleet.rollout.sglang import with_stack_partners

    cfg = partial_fleet.model.config.to_dict()
    for case, (targets, partners) in _PARTIAL.items():
        snap = partial_fleet.snapshot(case, layout="sglang")
        assert snap.config["target_modules"] == sorted(set(targets) | partners)
        assert with_stack_partners(snap, cfg) is snap


def test_a_nonzero_or_lone_partner_is_kept_on_load(tmp_path):
    """Only all-zero partners beside a kept group member go: a zero q_proj beside a trained k/v
    does, a zero q_proj alone (nothing of its group kept) and a trained one stay."""
    w = make_weights("none")
    hid = H  # any input size: no base model here
    w.dense = {"model.layers.0.self_attn.k_proj": (torch.randn(R, hid), torch.randn(4, R)),
               "model.layers.0.self_attn.v_proj": (torch.randn(R, hid), torch.randn(4, R))}
    w.experts, w.experts_arch = {}, {}
    w.linear_out_features = {"model.layers.0.self_attn.q_proj": 8}
    w.config = type(w.config)(rank=R, alpha=6.0, target_modules=("k_proj", "v_proj"))
    save_adapter_dir(w, tmp_path / "kv", format="sglang")
    assert set(_tensors(tmp_path / "kv")) >= {f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"}
    assert set(load_adapter_dir(tmp_path / "kv").dense) == set(w.dense)
    w.dense["model.layers.0.self_attn.q_proj"] = (torch.randn(R, hid), torch.zeros(8, R))  # fresh: B zero, A not
    save_adapter_dir(w, tmp_path / "qkv", format="sglang")
    assert set(load_adapter_dir(tmp_path / "qkv").dense) == set(w.dense)
    lone = {f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(R, hid),
            f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, R)}
    save_file(lone, str(tmp_path / "qkv" / "adapter_model.safetensors"))
    assert set(load_adapter_dir(tmp_path / "qkv").dense) == {"model.layers.0.self_attn.q_proj"}


def test_plain_export_without_partner_sizes_is_refused_naming_the_module(tmp_path):
    """AdapterWeights not made by a fleet (no linear_out_features) and no twin to size k/v from."""
    w = make_weights("none")
    w.dense = {"model.layers.0.self_attn.q_proj": (torch.randn(R, H), torch.randn(8, R))}
    w.experts, w.experts_arch = {}, {}
    w.config = type(w.config)(rank=R, alpha=6.0, target_modules=("q_proj",))
    with pytest.raises(AdapterFormatError, match=r"needs a zero k_proj LoRA beside q_proj, but the output size of "
                                                 r"base_model\.model\.model\.layers\.0\.self_attn\.k_proj is unknown"):
        save_adapter_dir(w, tmp_path / "q", format="sglang")
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_sglangs_loader_stacks_a_plain_export_of_partial_groups(partial_fleet, tmp_path):
    """SGLang 0.5.23's own loader (tests/sglang_loader_check.py) on `save_adapter(format="sglang")`
    directories, no sink in between: every targeted projection lands in its stacked module."""
    import json

    from test_rollout_sglang import NO_SGLANG, SGLANG_PYTHON, _sglang_check

    if not SGLANG_PYTHON:
        pytest.skip(NO_SGLANG)
    fleet = partial_fleet
    fleet.model.config.save_pretrained(tmp_path / "base")
    adapters = []
    for case in _PARTIAL:
        fleet.save_adapter(case, tmp_path / case, format="sglang")
        adapters.append({"base": str(tmp_path / "base"), "adapter": str(tmp_path / case),
                         "out": str(tmp_path / f"{case}.safetensors")})
    (tmp_path / "job.json").write_text(json.dumps({"adapters": adapters}))
    results = _sglang_check(tmp_path / "job.json")["adapters"]
    stem = f"{PREFIX}model.layers.0."
    for case, got in zip(_PARTIAL, results):
        assert "error" not in got and got["problems"] == [], (case, got)
        sg = load_file(str(tmp_path / f"{case}.safetensors"))
        assert not any(f".{n}." in k for k in sg for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
        w = fleet.get_adapter_weights(case)
        for group, stacked in ((("q_proj", "k_proj", "v_proj"), "self_attn.qkv_proj"),
                               (("gate_proj", "up_proj"), "mlp.gate_up_proj")):
            paths = [f"model.layers.0.{stacked.split('.')[0]}.{n}" for n in group]
            if not any(p in w.dense for p in paths):
                continue
            a, b = sg[f"{stem}{stacked}.lora_A.weight"], sg[f"{stem}{stacked}.lora_B.weight"]
            outs = [fleet._att.linears[p].out_features for p in paths]
            for p, a_part, b_part in zip(paths, a.split(4), b.split(outs)):
                if p in w.dense:  # trained: SGLang holds it unchanged; partner: zero
                    assert a_part.equal(w.dense[p][0]) and b_part.equal(w.dense[p][1]), (case, p)
                else:
                    assert not a_part.any() and not b_part.any(), (case, p)


def test_a_partner_the_base_lacks_is_refused_naming_it(tmp_path):
    """A base with q_proj but no k_proj / v_proj (e.g. DeepSeek-V2-Lite's MLA): SGLang's q/k/v
    stacking cannot take its q_proj LoRA."""
    w = make_weights("none")
    w.dense = {"model.layers.0.self_attn.q_proj": (torch.randn(R, H), torch.randn(8, R))}
    w.experts, w.experts_arch = {}, {}
    w.linear_out_features = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.kv_b_proj": 16}
    w.config = type(w.config)(rank=R, alpha=6.0, target_modules=("q_proj",))
    want = r"^format 'sglang': SGLang 0.5.23 stacks q_proj with k_proj / v_proj .* this base model has no "
    with pytest.raises(AdapterFormatError, match=want + r"model\.layers\.0\.self_attn\.k_proj; export"):
        save_adapter_dir(w, tmp_path / "q", format="sglang")
