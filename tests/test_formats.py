"""Adapter directory formats: PEFT / vLLM / SGLang round trips, real PEFT interop, refusals."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

try:
    import lorafleet  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorafleet.adapters.formats import AdapterFormatError, load_adapter_dir, save_adapter_dir
from lorafleet.adapters.weights import AdapterWeights, ExpertsArch
from lorafleet.config import AdapterConfig

E, H, I, R = 4, 16, 12, 3
LAYERS = 2
EXPERT_PATHS = [f"model.layers.{i}.mlp.experts" for i in range(LAYERS)]
DENSE_SHAPES = {"self_attn.q_proj": (H, H), "self_attn.v_proj": (H, 8)}  # (in, out)
PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- helpers
def make_weights(sharing="none", *, interleaved=False, model_type="qwen3_moe", rslora=False, seed=0,
                 dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    ea = {"gate_up": 1 if sharing in ("shared_a", "shared_outer") else E,
          "down": 1 if sharing == "shared_a" else E}
    eb = {"gate_up": E, "down": 1 if sharing == "shared_outer" else E}
    dense = {}
    for i in range(LAYERS):
        for name, (fin, fout) in DENSE_SHAPES.items():
            dense[f"model.layers.{i}.{name}"] = (rnd(R, fin), rnd(fout, R))
    experts = {p: {"gate_up": (rnd(ea["gate_up"], R, H), rnd(eb["gate_up"], 2 * I, R)),
                   "down": (rnd(ea["down"], R, I), rnd(eb["down"], H, R))} for p in EXPERT_PATHS}
    cfg = AdapterConfig(rank=R, alpha=6.0, target_modules=("q_proj", "v_proj"), experts=True,
                        expert_sharing=sharing, use_rslora=rslora)
    arch = {p: ExpertsArch(E, H, I, interleaved) for p in EXPERT_PATHS}
    return AdapterWeights(config=cfg, dense=dense, experts=experts, model_type=model_type,
                          base_model_name_or_path="tiny/base", experts_arch=arch)


def deltas(w: AdapterWeights) -> dict[str, torch.Tensor]:
    """Scaled effective updates: dense B @ A, per expert B_e @ A_e (shared factors broadcast)."""
    s = w.config.scale
    out = {p: s * (b.double() @ a.double()) for p, (a, b) in w.dense.items()}
    for p, projs in w.experts.items():
        for proj, (a, b) in projs.items():
            out[f"{p}.{proj}"] = s * torch.matmul(b.double().expand(E, -1, -1), a.double().expand(E, -1, -1))
    return out


def assert_same_deltas(w1, w2, tol=1e-12):
    d1, d2 = deltas(w1), deltas(w2)
    assert d1.keys() == d2.keys()
    for k in d1:
        err = (d1[k] - d2[k]).abs().max().item()
        assert err <= tol * max(1.0, d1[k].abs().max().item()), (k, err)


def archs_of(model) -> dict[str, ExpertsArch]:
    out = {}
    gpt_oss = model.config.model_type == "gpt_oss"
    for name, mod in model.named_modules():
        if name.endswith("mlp.experts"):
            e, d1, d2 = mod.gate_up_proj.shape
            hid, two_i = (d1, d2) if getattr(mod, "is_transposed", False) else (d2, d1)
            out[name] = ExpertsArch(e, hid, two_i // 2, gpt_oss)
    return out


def read_config(d):
    return json.loads((Path(d) / "adapter_config.json").read_text())


def rewrite(d, *, config=None, tensors=None):
    from safetensors.torch import load_file, save_file
    d = Path(d)
    if config is not None:
        cfg = read_config(d)
        cfg.update(config)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(str(d / "adapter_model.safetensors"))
        t = tensors(t)
        save_file(t, str(d / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", ["peft", "vllm", "sglang"])
@pytest.mark.parametrize("sharing", ["none", "shared_a", "shared_outer"])
def test_round_trip(tmp_path, fmt, sharing):
    w = make_weights(sharing, rslora=(sharing == "shared_a"))
    save_adapter_dir(w, tmp_path / "ad", format=fmt)
    back = load_adapter_dir(tmp_path / "ad", experts_arch=w.experts_arch)
    assert back.config.rank == R and back.config.alpha == 6.0
    assert back.config.use_rslora == w.config.use_rslora
    assert back.config.expert_sharing == sharing
    assert back.config.target_modules == ("q_proj", "v_proj") and back.config.experts
    assert back.model_type == "qwen3_moe" and back.base_model_name_or_path == "tiny/base"
    for p in EXPERT_PATHS:  # the sharing mode's dim-1 factors come back as dim 1
        for proj in ("gate_up", "down"):
            for f, t, t0 in zip("AB", back.experts[p][proj], w.experts[p][proj]):
                assert t.shape == t0.shape, (p, proj, f)
    assert_same_deltas(w, back, tol=0.0)
    meta = json.loads((tmp_path / "ad" / "lorafleet.json").read_text())
    assert meta == {"format": fmt, "expert_sharing": sharing, "model_type": "qwen3_moe", "rank": R,
                    "lorafleet_version": "0.1.0"}


@pytest.mark.parametrize("fmt", ["peft", "vllm"])
def test_round_trip_interleaved(tmp_path, fmt):
    w = make_weights("none", interleaved=True, model_type="gpt_oss")
    save_adapter_dir(w, tmp_path / "ad", format=fmt)
    back = load_adapter_dir(tmp_path / "ad", experts_arch=w.experts_arch)
    assert back.config.rank == R
    assert_same_deltas(w, back, tol=0.0)


def test_sglang_without_lorafleet_json_infers_shared_dims(tmp_path):
    w = make_weights("shared_outer")
    save_adapter_dir(w, tmp_path / "ad", format="sglang")
    (tmp_path / "ad" / "lorafleet.json").unlink()
    back = load_adapter_dir(tmp_path / "ad", experts_arch=w.experts_arch)
    assert back.config.expert_sharing == "shared_outer"
    assert back.experts[EXPERT_PATHS[0]]["gate_up"][0].shape[0] == 1
    assert back.experts[EXPERT_PATHS[0]]["down"][1].shape[0] == 1
    # without lorafleet.json the file is of unknown origin: the zero q/k/v partners the sglang
    # export added stay as (zero) modules; every delta of the original is unchanged
    extra = set(back.dense) - set(w.dense)
    assert all(not a.any() and not b.any() for p in extra for a, b in [back.dense[p]])
    back.dense = {p: ab for p, ab in back.dense.items() if p not in extra}
    assert_same_deltas(w, back, tol=0.0)


def test_sglang_layout(tmp_path):
    from safetensors.torch import load_file
    w = make_weights("shared_outer")
    save_adapter_dir(w, tmp_path / "ad", format="sglang")
    t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    p = PREFIX + EXPERT_PATHS[0]
    a = t[f"{p}.gate_up_proj.lora_A.weight"]
    assert a.shape == (1, R, H)  # SGLang 0.5.23 repeats a stacked gate_up A for gate and up itself
    assert t[f"{p}.gate_up_proj.lora_B.weight"].shape == (E, 2 * I, R)
    assert t[f"{p}.down_proj.lora_A.weight"].shape == (E, R, I)
    assert t[f"{p}.down_proj.lora_B.weight"].shape == (1, H, R)
    assert "target_parameters" not in read_config(tmp_path / "ad")


def test_peft_layout_keys(tmp_path):
    from safetensors.torch import load_file
    w = make_weights("none")
    save_adapter_dir(w, tmp_path / "ad", format="peft")
    t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    p = PREFIX + EXPERT_PATHS[1]
    assert t[f"{p}.base_layer.lora_A.weight"].shape == (R * E, H)
    assert t[f"{p}.base_layer.lora_B.weight"].shape == (2 * I, R * E)
    assert t[f"{p}.lora_A.weight"].shape == (R * E, I)
    assert t[f"{p}.lora_B.weight"].shape == (H, R * E)
    a, b = w.experts[EXPERT_PATHS[1]]["gate_up"]
    assert torch.equal(t[f"{p}.base_layer.lora_A.weight"].reshape(E, R, H), a)  # expert-slowest
    assert torch.equal(t[f"{p}.base_layer.lora_B.weight"].reshape(2 * I, R, E).permute(2, 0, 1), b)
    cfg = read_config(tmp_path / "ad")
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["peft_type"] == "LORA"
    assert cfg["r"] == R and cfg["lora_alpha"] == 6 and cfg["bias"] == "none"


# ----------------------------------------------------------------------------- vLLM per-expert
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_vllm_keys(tmp_path, model_type):
    from safetensors.torch import load_file
    w = make_weights("shared_a", model_type=model_type)
    save_adapter_dir(w, tmp_path / "ad", format="vllm")
    t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    want = {}
    for i in range(LAYERS):
        for name, (fin, fout) in DENSE_SHAPES.items():
            want[f"{PREFIX}model.layers.{i}.{name}.lora_A.weight"] = (R, fin)
            want[f"{PREFIX}model.layers.{i}.{name}.lora_B.weight"] = (fout, R)
        for e in range(E):
            p = f"{PREFIX}model.layers.{i}.{block}.experts.{e}"
            for n, (fin, fout) in zip(names, ((H, I), (H, I), (I, H))):
                want[f"{p}.{n}.lora_A.weight"] = (R, fin)
                want[f"{p}.{n}.lora_B.weight"] = (fout, R)
    assert {k: tuple(v.shape) for k, v in t.items()} == want
    p = f"{PREFIX}model.layers.0.{block}.experts.2"
    a, b = w.experts[EXPERT_PATHS[0]]["gate_up"]
    assert torch.equal(t[f"{p}.{names[0]}.lora_A.weight"], a[0])
    assert torch.equal(t[f"{p}.{names[1]}.lora_A.weight"], a[0])
    assert torch.equal(t[f"{p}.{names[0]}.lora_B.weight"], b[2, :I])
    assert torch.equal(t[f"{p}.{names[1]}.lora_B.weight"], b[2, I:])
    cfg = read_config(tmp_path / "ad")
    assert "target_parameters" not in cfg
    assert cfg["target_modules"] == sorted({"q_proj", "v_proj", *names})
    back = load_adapter_dir(tmp_path / "ad", model_type=model_type)
    assert set(back.experts) == set(EXPERT_PATHS)
    assert_same_deltas(w, back, tol=0.0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_vllm_independent_gate_up_becomes_rank_2r(tmp_path, interleaved):
    from safetensors.torch import load_file, save_file
    w = make_weights("none", interleaved=interleaved, model_type="gpt_oss" if interleaved else "qwen3_moe")
    save_adapter_dir(w, tmp_path / "ad", format="vllm")
    f = tmp_path / "ad" / "adapter_model.safetensors"
    t = load_file(str(f))
    g = torch.Generator().manual_seed(7)
    for i in range(LAYERS):
        for e in range(E):  # give up_proj its own A
            t[f"{PREFIX}model.layers.{i}.mlp.experts.{e}.up_proj.lora_A.weight"] = torch.randn(R, H, generator=g)
    save_file(t, str(f))
    back = load_adapter_dir(tmp_path / "ad", experts_arch=w.experts_arch)
    assert back.config.rank == 2 * R and back.config.alpha == pytest.approx(12.0)
    assert back.config.scale == pytest.approx(w.config.scale)
    gate_rows, up_rows = (slice(0, None, 2), slice(1, None, 2)) if interleaved else (slice(0, I), slice(I, None))
    s = w.config.scale
    for i in range(LAYERS):
        a, b = back.experts[EXPERT_PATHS[i]]["gate_up"]
        assert a.shape == (E, 2 * R, H) and b.shape == (E, 2 * I, 2 * R)
        for e in range(E):
            pre = f"{PREFIX}model.layers.{i}.mlp.experts.{e}"
            want_g = t[f"{pre}.gate_proj.lora_B.weight"] @ t[f"{pre}.gate_proj.lora_A.weight"]
            want_u = t[f"{pre}.up_proj.lora_B.weight"] @ t[f"{pre}.up_proj.lora_A.weight"]
            got = back.config.scale * (b[e] @ a[e])
            torch.testing.assert_close(got[gate_rows], s * want_g, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got[up_rows], s * want_u, rtol=1e-6, atol=1e-6)
        da, db = back.experts[EXPERT_PATHS[i]]["down"]
        assert da.shape == (E, 2 * R, I) and db.shape == (E, H, 2 * R)
    # dense and down updates are unchanged by the zero padding
    d0, d1 = deltas(w), deltas(back)
    for k in d0:
        if not k.endswith("gate_up"):
            torch.testing.assert_close(d1[k], d0[k], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- PEFT 0.18 legacy
def test_peft_018_legacy_layout(tmp_path):
    """PEFT 0.18 had no in/out swap: for gate_up_proj [E, 2I, H], lora_A [r·E, 2I], lora_B [H, r·E],
    delta = einsum("o r e, e r i -> e i o", B, A)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(3)
    gu_a, gu_b = torch.randn(E, R, H, generator=g), torch.randn(E, 2 * I, R, generator=g)
    dn_a, dn_b = torch.randn(E, R, I, generator=g), torch.randn(E, H, R, generator=g)

    def legacy(a, b):  # our per-expert (A_e [r, in], B_e [out, r]) -> 0.18 lora_A, lora_B
        fin, fout = a.shape[2], b.shape[1]
        la = b.transpose(1, 2).reshape(E * R, fout)  # A3[e] = B_e.T
        lb = a.permute(2, 1, 0).reshape(fin, R * E)  # B3[:, :, e] = A_e.T
        return la, lb

    p = PREFIX + EXPERT_PATHS[0]
    la, lb = legacy(gu_a, gu_b)
    # the constructed file obeys PEFT 0.18's own formula for the [E, 2I, H] parameter
    d018 = torch.einsum("o r e, e r i -> e i o", lb.reshape(H, R, E), la.reshape(E, R, 2 * I))
    torch.testing.assert_close(d018, gu_b @ gu_a)
    la2, lb2 = legacy(dn_a, dn_b)
    d018 = torch.einsum("o r e, e r i -> e i o", lb2.reshape(I, R, E), la2.reshape(E, R, H))
    torch.testing.assert_close(d018, dn_b @ dn_a)  # down_proj [E, H, I]
    d = tmp_path / "ad"
    d.mkdir()
    save_file({f"{p}.base_layer.lora_A.weight": la, f"{p}.base_layer.lora_B.weight": lb,
               f"{p}.lora_A.weight": la2, f"{p}.lora_B.weight": lb2}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": [], "peft_version": "0.18.1",
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "bias": "none"}))
    arch = {EXPERT_PATHS[0]: ExpertsArch(E, H, I)}
    back = load_adapter_dir(d, experts_arch=arch)
    a, b = back.experts[EXPERT_PATHS[0]]["gate_up"]
    torch.testing.assert_close(b @ a, gu_b @ gu_a)
    a, b = back.experts[EXPERT_PATHS[0]]["down"]
    torch.testing.assert_close(b @ a, dn_b @ dn_a)
    # the same file claimed by a modern PEFT is refused (shapes do not fit the >= 0.19.1 layout)
    rewrite(d, config={"peft_version": "0.21.2"})
    with pytest.raises(AdapterFormatError, match="0.17/0.18"):
        load_adapter_dir(d, experts_arch=arch)


def test_peft_018_transposed_base_is_modern_layout(tmp_path):
    """PEFT 0.17/0.18 never swapped in/out, so for transposed (GPT-OSS) experts it already wrote
    lora_A [r·E, in], lora_B [out, r·E]: read as is."""
    w = make_weights("none", interleaved=True, model_type="gpt_oss")
    save_adapter_dir(w, tmp_path / "ad", format="peft")
    rewrite(tmp_path / "ad", config={"peft_version": "0.18.0"})
    assert_same_deltas(w, load_adapter_dir(tmp_path / "ad", experts_arch=w.experts_arch), tol=0.0)


def test_refuse_unsupported_target_parameter(saved):
    d, w = saved
    rewrite(d, config={"target_parameters": ["mlp.experts.w1"]})
    with pytest.raises(AdapterFormatError, match="target_parameters"):
        _load(d, w)


# ----------------------------------------------------------------------------- real PEFT interop
def _tiny_models():
    import transformers
    qwen = transformers.Qwen3MoeConfig(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=12, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=64)
    gpt = transformers.GptOssConfig(
        hidden_size=32, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64)
    return {"qwen3_moe": qwen, "gpt_oss": gpt}


@pytest.mark.parametrize("model_type,rslora", [("qwen3_moe", False), ("gpt_oss", True)])
def test_peft_interop(tmp_path, model_type, rslora):
    import peft
    import transformers
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(_tiny_models()[model_type]).eval()
    fresh = copy.deepcopy(base)
    lc = peft.LoraConfig(r=3, lora_alpha=5, use_rslora=rslora, target_modules=["q_proj", "v_proj", "o_proj"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(base, lc)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)
    pm.eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "orig")
    archs = archs_of(fresh)
    w = load_adapter_dir(tmp_path / "orig", experts_arch=archs, model_type=model_type)
    assert w.config.rank == 3 and w.config.use_rslora == rslora
    assert w.config.target_modules == ("o_proj", "q_proj", "v_proj")
    assert set(w.experts) == set(archs) and w.config.expert_sharing == "none"
    save_adapter_dir(w, tmp_path / "ours", format="peft")
    assert (tmp_path / "ours" / "lorafleet.json").exists()
    pm2 = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    with torch.no_grad():
        out = pm2(input_ids=ids).logits
    base_out = None
    with torch.no_grad(), pm2.disable_adapter():
        base_out = pm2(input_ids=ids).logits
    assert (ref - base_out).abs().max() > 1e-3  # the adapter does something
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= 1e-5, rel


# ----------------------------------------------------------------------------- refusals
@pytest.fixture
def saved(tmp_path):
    w = make_weights("none")
    save_adapter_dir(w, tmp_path / "ad", format="peft")
    return tmp_path / "ad", w


def _load(d, w):
    return load_adapter_dir(d, experts_arch=w.experts_arch)


def test_refuse_missing_config(saved):
    d, w = saved
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        _load(d, w)


def test_refuse_missing_weights(saved):
    d, w = saved
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors"):
        _load(d, w)


def test_refuse_missing_dir(tmp_path):
    with pytest.raises(AdapterFormatError, match="not an adapter directory"):
        load_adapter_dir(tmp_path / "nope")


def test_refuse_corrupt_safetensors(saved):
    d, w = saved
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFormatError, match="corrupt safetensors"):
        _load(d, w)


def test_refuse_corrupt_json(saved):
    d, w = saved
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="invalid JSON"):
        _load(d, w)


def test_refuse_corrupt_lorafleet_json(saved):
    d, w = saved
    (d / "lorafleet.json").write_text("[1, 2")
    with pytest.raises(AdapterFormatError, match="lorafleet.json"):
        _load(d, w)


@pytest.mark.parametrize("field,value,match", [
    ("peft_type", "IA3", "peft_type"),
    ("use_dora", True, "use_dora"),
    ("bias", "all", "bias"),
    ("lora_bias", True, "lora_bias"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("rank_pattern", {"q_proj": 4}, "rank_pattern"),  # the file's q_proj has rank 3: tensors disagree
    ("rank_pattern", {"q_proj": 0}, "rank_pattern"),
    ("alpha_pattern", {"(": 4}, "alpha_pattern"),  # not a regex (a valid alpha_pattern loads)
    ("r", 0, "'r'"),
    ("lora_alpha", "x", "lora_alpha"),
])
def test_refuse_config_field(saved, field, value, match):
    d, w = saved
    rewrite(d, config={field: value})
    with pytest.raises(AdapterFormatError, match=match):
        _load(d, w)


def test_refuse_peft_0190_target_parameters(saved):
    d, w = saved
    rewrite(d, config={"peft_version": "0.19.0"})
    with pytest.raises(AdapterFormatError, match=r"0\.19\.0"):
        _load(d, w)


def test_refuse_dense_rank_mismatch(saved):
    d, w = saved
    k = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite(d, tensors=lambda t: {**t, k: torch.zeros(R + 1, H)})
    with pytest.raises(AdapterFormatError, match="q_proj"):
        _load(d, w)


def test_refuse_experts_rank_mismatch(saved):
    d, w = saved
    rewrite(d, config={"r": R + 1})
    with pytest.raises(AdapterFormatError, match="disagree"):
        _load(d, w)


def test_refuse_missing_partner(saved):
    d, w = saved
    k = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
    rewrite(d, tensors=lambda t: {n: v for n, v in t.items() if n != k})
    with pytest.raises(AdapterFormatError, match="v_proj.lora_B.weight missing"):
        _load(d, w)


def test_refuse_missing_experts_arch(saved):
    d, _ = saved
    with pytest.raises(AdapterFormatError, match="experts_arch .*model.layers.0.mlp.experts"):
        load_adapter_dir(d)


def test_refuse_arch_shape_mismatch(saved):
    d, w = saved
    arch = {p: ExpertsArch(E, H, I + 1) for p in EXPERT_PATHS}
    with pytest.raises(AdapterFormatError, match="mlp.experts"):
        load_adapter_dir(d, experts_arch=arch)


def test_refuse_unknown_key(saved):
    d, w = saved
    rewrite(d, tensors=lambda t: {**t, f"{PREFIX}model.embed_tokens.lora_embedding_A": torch.zeros(R, 8)})
    with pytest.raises(AdapterFormatError, match="lora_embedding_A"):
        _load(d, w)


def test_refuse_vllm_missing_projection(tmp_path):
    w = make_weights("none")
    save_adapter_dir(w, tmp_path / "ad", format="vllm")
    k = f"{PREFIX}model.layers.0.mlp.experts.3.up_proj"
    rewrite(tmp_path / "ad", tensors=lambda t: {n: v for n, v in t.items() if not n.startswith(k)})
    with pytest.raises(AdapterFormatError, match=r"experts\.3\.up_proj"):
        load_adapter_dir(tmp_path / "ad")


def test_refuse_sglang_interleaved(tmp_path):
    w = make_weights("none", interleaved=True, model_type="gpt_oss")
    with pytest.raises(AdapterFormatError, match="interleaved"):
        save_adapter_dir(w, tmp_path / "ad", format="sglang")
    assert not (tmp_path / "ad").exists()


def test_refuse_bad_format(tmp_path):
    with pytest.raises(AdapterFormatError, match="peft, vllm, sglang"):
        save_adapter_dir(make_weights(), tmp_path / "ad", format="onnx")


def test_refuse_overwrite_file(tmp_path):
    f = tmp_path / "ad"
    f.write_text("keep me")
    with pytest.raises(AdapterFormatError, match="not a directory"):
        save_adapter_dir(make_weights(), f)
    assert f.read_text() == "keep me"


def test_refuse_replace_foreign_dir(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    with pytest.raises(AdapterFormatError, match="refusing to replace"):
        save_adapter_dir(make_weights(), d)
    assert (d / "notes.txt").exists()


def test_refuse_inconsistent_sharing_claim(tmp_path):
    w = make_weights("none")
    save_adapter_dir(w, tmp_path / "ad", format="peft")
    meta = tmp_path / "ad" / "lorafleet.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "expert_sharing": "shared_a"}))
    with pytest.raises(AdapterFormatError, match="differs between experts"):
        load_adapter_dir(tmp_path / "ad", experts_arch=w.experts_arch)


def test_save_weights_rank_mismatch_refused(tmp_path):
    w = make_weights()
    w.dense["model.layers.0.self_attn.q_proj"] = (torch.zeros(R + 1, H), torch.zeros(H, R + 1))
    with pytest.raises(AdapterFormatError, match="q_proj"):
        save_adapter_dir(w, tmp_path / "ad")


# ----------------------------------------------------------------------------- atomic writes
def test_overwrite_and_atomic_failure(tmp_path, monkeypatch):
    d = tmp_path / "ad"
    w1, w2 = make_weights(seed=1), make_weights(seed=2)
    save_adapter_dir(w1, d, format="peft")
    save_adapter_dir(w2, d, format="vllm")  # replaces an existing adapter dir
    assert json.loads((d / "lorafleet.json").read_text())["format"] == "vllm"
    assert_same_deltas(w2, load_adapter_dir(d), tol=0.0)

    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter_dir(w1, d, format="peft")
    assert_same_deltas(w2, load_adapter_dir(d), tol=0.0)  # old adapter intact
    with pytest.raises(OSError):
        save_adapter_dir(w1, tmp_path / "new", format="peft")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp dirs left behind


def test_scale_matches_peft_convention():
    w = make_weights(rslora=True)
    assert w.config.scale == pytest.approx(6.0 / math.sqrt(R))
