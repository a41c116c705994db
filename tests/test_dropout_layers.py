"""PEFT's ``lora_dropout`` and ``layers_to_transform`` (issue 13, "PEFT parity").

Dropout: per adapter, train mode only (``model.train()``), masks from the adapter's seed and its
forward counter (so an activation-checkpoint recompute draws the same masks, a resumed job
continues bitwise, and neighbours in a batch do not change an adapter's masks); eval mode equals
PEFT exactly, train mode matches PEFT in distribution. layers_to_transform: a native restriction
of the adapter's dense and experts LoRA, exported so that PeftModel loads it identically.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

import lorafleet as lf
from lorafleet.lora import Routing, use_routing
from lorafleet.lora.linear import dropout_noise
from lorafleet.models.debug import build_debug_model
from peft_ref import fleet_grads, quiet_peft_warnings, randomize, rel  # noqa: F401 (autouse fixture)

TOL = 1e-5
_BASES: dict[str, torch.nn.Module] = {}


def base_model(arch="llama"):
    if arch not in _BASES:
        _BASES[arch] = build_debug_model(arch, seed=0)
    return copy.deepcopy(_BASES[arch])


def ids(b=3, t=8, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def peft_dir(tmp_path, lc, arch="llama", name="peft"):
    base = base_model(arch)
    pm = get_peft_model(copy.deepcopy(base), lc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    pm.save_pretrained(tmp_path / name)
    return base, pm, tmp_path / name


def fleet_with(base, *adapters, max_rank=8):
    fleet = lf.Fleet(copy.deepcopy(base), max_adapters=4, max_rank=max_rank)
    for i, (name, cfg) in enumerate(adapters):
        fleet.add_adapter(name, cfg)
        randomize(fleet, name, seed=10 + i)
    return fleet


def examples(names, t=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in names:
        toks = torch.randint(0, 256, (t + 1,), generator=g).tolist()
        out.append(lf.Example(n, toks[:-1], toks[1:], [1.0] * t))
    return out


# ----------------------------------------------------------------------------- dropout
def test_eval_mode_equals_peft_and_export_keeps_dropout(tmp_path):
    base, pm, d = peft_dir(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=0.1))
    fleet = fleet_with(base, ("other", lf.AdapterConfig(rank=2, seed=5, lora_dropout=0.5)))
    fleet.load_adapter("x", d)  # no "not applied" warning: the value is loaded
    assert fleet.adapters["x"].lora_dropout == 0.1
    x = ids()
    with torch.no_grad():
        ref = pm(input_ids=x).logits
        got = fleet.forward(x, adapters=["x", "other", "x"]).logits
    assert rel(got[[0, 2]], ref[[0, 2]]) <= TOL
    out = tmp_path / "export"
    fleet.save_adapter("x", out)
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    pm2 = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert pm2.peft_config["default"].lora_dropout == 0.1
    with torch.no_grad():
        assert rel(pm2(input_ids=x).logits, ref) <= TOL


def test_noise_is_nn_dropout_and_bernoulli():
    p = 0.3
    n = dropout_noise((400, 250), p, seed=7, counter=0, path="l", dtype=torch.float32, device="cpu")
    kept_value = F.dropout(torch.ones(8), p, training=True).max()  # nn.Dropout's 1 / (1 - p)
    assert set(n.unique().tolist()) == {0.0, kept_value.item()}
    rate = (n == 0).float().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / n.numel()) ** 0.5
    again = dropout_noise((400, 250), p, seed=7, counter=0, path="l", dtype=torch.float32, device="cpu")
    assert torch.equal(n, again)
    for other in ({"seed": 8, "counter": 0, "path": "l"}, {"seed": 7, "counter": 1, "path": "l"},
                  {"seed": 7, "counter": 0, "path": "m"}):
        assert not torch.equal(n, dropout_noise((400, 250), p, dtype=torch.float32, device="cpu", **other))


def test_train_mode_layer_is_lora_of_dropped_input_and_matches_peft_in_distribution(tmp_path):
    p = 0.4
    base, pm, d = peft_dir(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=p))
    fleet = fleet_with(base)
    fleet.load_adapter("x", d)
    layer = fleet._att.linears["model.layers.0.self_attn.q_proj"]
    slot, scale = fleet.slot_of("x"), fleet.bank.info(fleet.slot_of("x")).scale
    A, B = layer.lora_A[slot, :4].detach(), layer.lora_B[slot, :, :4].detach()
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    layer.train()
    outs = []
    with torch.no_grad():
        for c in range(300):
            with use_routing(Routing.from_row_slots([slot, slot], "cpu", {slot: (p, 0, c)})):
                y = layer(x)
            if c == 0:  # exactly base(x) + scale * B A (x * noise)
                noise = dropout_noise((10, layer.in_features), p, 0, 0, layer.path, x.dtype, x.device)
                want = layer.base_layer(x) + (scale * (x.reshape(10, -1) * noise) @ A.T @ B.T).view(2, 5, -1)
                assert torch.allclose(y, want, atol=1e-6, rtol=1e-6)
            outs.append(y)
    ref_layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    ref_layer.train()
    torch.manual_seed(0)
    with torch.no_grad():
        refs = [ref_layer(x) for _ in range(300)]
    ours, theirs = torch.stack(outs), torch.stack(refs)
    # same mean (the eval output) and the same spread, to sampling error
    with torch.no_grad():
        ev = ref_layer.eval()(x)
    spread = theirs.std(0)
    assert ((ours.mean(0) - ev).abs() / (spread / 300 ** 0.5 + 1e-6)).mean() < 2.0
    assert ((theirs.mean(0) - ev).abs() / (spread / 300 ** 0.5 + 1e-6)).mean() < 2.0
    assert abs(ours.std(0).mean() / spread.mean() - 1) < 0.05


def _grads(fleet, checkpointing):
    if checkpointing:
        fleet.model.gradient_checkpointing_enable()
    fleet.model.train()
    fleet.forward_backward(examples(["a", "b", "a"]))
    return {n: fleet_grads(fleet, n) for n in ("a", "b")}


def test_checkpointing_recompute_draws_the_same_masks():
    base = base_model()
    cfgs = (("a", lf.AdapterConfig(rank=4, seed=1, lora_dropout=0.3)), ("b", lf.AdapterConfig(rank=4, seed=2)))
    plain, ckpt = _grads(fleet_with(base, *cfgs), False), _grads(fleet_with(base, *cfgs), True)
    for n in plain:
        for k in plain[n]:
            assert torch.allclose(plain[n][k], ckpt[n][k], rtol=1e-5, atol=1e-7), (n, k)
    # dropout is really on: the same adapter without dropout gets other gradients
    f = fleet_with(base, ("a", cfgs[0][1].with_(lora_dropout=0.0)), cfgs[1])
    f.forward_backward(examples(["a", "b", "a"]))
    evals = fleet_grads(f, "a")
    assert max(rel(plain["a"][k], evals[k]) for k in evals) > 1e-2
    assert all(rel(plain["b"][k], fleet_grads(f, "b")[k]) <= TOL for k in evals)  # b has no dropout


def test_neighbours_do_not_change_an_adapters_masks():
    base = base_model()
    a = ("a", lf.AdapterConfig(rank=4, seed=1, lora_dropout=0.3))
    mixed = fleet_with(base, a, ("b", lf.AdapterConfig(rank=4, seed=2, lora_dropout=0.5)))
    alone = fleet_with(base, a)
    x = ids(4)
    for f in (mixed, alone):
        f.model.train()
    with torch.no_grad():
        for _ in range(2):  # counters advance alike
            got = mixed.forward(x, adapters=["b", "a", "a", "b"]).logits[[1, 2]]
            want = alone.forward(x[[1, 2]], adapters=["a", "a"]).logits
            assert rel(got, want) <= TOL
    assert mixed.train_state("a").dropout_step == alone.train_state("a").dropout_step == 2


def test_resume_with_dropout_continues_bitwise(tmp_path):
    base = base_model()
    cfg = ("a", lf.AdapterConfig(rank=4, seed=1, lora_dropout=0.3))

    def steps(f, k, seed):
        f.model.train()
        for i in range(k):
            f.forward_backward(examples(["a", "a"], seed=seed + i))
            f.optim_step(["a"])

    f1 = fleet_with(base, cfg)
    f1.set_optimizer("a", lf.OptimConfig(lr=1e-2))
    steps(f1, 2, 0)
    f1.save_state("a", tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["dropout_step"] == 2
    steps(f1, 2, 2)
    f2 = lf.Fleet(copy.deepcopy(base), max_adapters=4, max_rank=8)
    f2.load_state("a", tmp_path / "ckpt")
    steps(f2, 2, 2)
    w1, w2 = dict(f1.get_adapter_weights("a").tensors()), dict(f2.get_adapter_weights("a").tensors())
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_config_checks():
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="lora_dropout"):
            lf.AdapterConfig(lora_dropout=bad)
    for bad in ([], [-1], ["0"], "0", [True]):
        with pytest.raises(ValueError, match="layers_to_transform"):
            lf.AdapterConfig(layers_to_transform=bad)
    c = lf.AdapterConfig(lora_dropout=0.25, layers_to_transform=[2, 0])
    assert c.layers_to_transform == (0, 2) and lf.AdapterConfig.from_dict(c.to_dict()) == c
    fleet = lf.Fleet(base_model(), max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match="outside the model's"):
        fleet.add_adapter("a", lf.AdapterConfig(layers_to_transform=[0, 99]))
    assert not fleet.adapters


# ----------------------------------------------------------------------------- layers_to_transform
def test_peft_layers_to_transform_loads_natively(tmp_path):
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                    layers_pattern="layers")
    base, pm, d = peft_dir(tmp_path, lc)
    fleet = fleet_with(base, ("other", lf.AdapterConfig(rank=2, seed=5)))
    fleet.load_adapter("x", d)
    cfg = fleet.adapters["x"]
    assert cfg.layers_to_transform == (1,)
    assert all(".layers.1." in k for k, _, _ in fleet.adapter_views("x"))  # no zero-filled layer 0
    x = ids()
    with torch.no_grad():
        assert rel(fleet.forward(x, adapters=["x", "other", "x"]).logits[[0, 2]], pm(input_ids=x).logits[[0, 2]]) <= TOL
    fleet.save_adapter("x", tmp_path / "export")
    pm2 = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    with torch.no_grad():
        assert rel(pm2(input_ids=x).logits, pm(input_ids=x).logits) <= TOL


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_native_layers_to_transform_exports_to_peft(arch, tmp_path):
    base = base_model(arch)
    fleet = fleet_with(base, ("x", lf.AdapterConfig(rank=4, seed=1, layers_to_transform=[0])),
                       ("y", lf.AdapterConfig(rank=4, seed=2)))
    views = fleet.adapter_views("x")
    assert views and all(".layers.0." in k for k, _, _ in views)
    assert any(".experts." in k for k, _, _ in views) == (arch == "qwen3_moe")
    x = ids()
    with torch.no_grad():
        got = fleet.forward(x, adapters=["x", "y", "x"]).logits
    out = tmp_path / "export"
    fleet.save_adapter("x", out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [0] and cfg["layers_pattern"] == "layers"
    pm = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    with torch.no_grad():
        ref = pm(input_ids=x).logits
    assert rel(got[[0, 2]], ref[[0, 2]]) <= TOL
    with torch.no_grad():  # the restriction matters: the other layers are untouched in PEFT too
        assert rel(base(input_ids=x).logits, ref) > 1e-3
    back = lf.Fleet(copy.deepcopy(base), max_adapters=2, max_rank=8)
    back.load_adapter("x", out)
    assert back.adapters["x"].layers_to_transform == (0,)
    with torch.no_grad():
        assert rel(back.forward(x, adapters=["x"] * 3).logits, ref) <= TOL


def test_forward_backward_trains_with_dropout_but_forward_only_and_sampling_never_drop():
    """Jobs and the service keep the model in eval mode: forward_backward itself turns each
    adapter's lora_dropout on for its training forward (so the logprobs it returns differ from the
    dropout-free ones), forward_only and plain forwards stay exact, and the model's mode is untouched."""
    base = base_model()
    fleet = fleet_with(base, ("d", lf.AdapterConfig(rank=4, lora_dropout=0.5, seed=1)))
    fleet.model.eval()
    ex = examples(["d"])
    def lp(res):
        return torch.as_tensor(res.logprobs[0], dtype=torch.float64)

    exact = lp(fleet.forward_backward(ex, forward_only=True))
    trained = lp(fleet.forward_backward(ex))
    assert not fleet.model.training
    assert rel(trained, exact) > 1e-3  # dropout was active in the training forward
    assert rel(lp(fleet.forward_backward(ex, forward_only=True)), exact) == 0.0
    with torch.no_grad():
        a = fleet.forward(ids(1), adapters=["d"]).logits
        b = fleet.forward(ids(1), adapters=["d"]).logits
    assert torch.equal(a, b)
