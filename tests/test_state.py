"""save_state / load_state: exact resume, atomic writes, corrupt checkpoints change nothing."""

import json

import pytest
import torch

import lorafleet as lf
from lorafleet.engine import state as state_mod
from lorafleet.models.debug import build_debug_model
from test_engine import rand_examples

OPT = lf.OptimConfig(lr=2e-2, weight_decay=0.01, grad_clip_norm=1.0, schedule="linear", warmup_steps=1,
                     total_steps=6)


def fleet_with(name="a", cfg=None):
    f = lf.Fleet(build_debug_model("qwen3_moe", seed=0), max_adapters=2, max_rank=8)
    f.add_adapter(name, cfg or lf.AdapterConfig(rank=4, seed=3, expert_sharing="shared_outer"))
    f.set_optimizer(name, OPT)
    return f


def steps(f, name, seeds):
    for s in seeds:
        f.forward_backward(rand_examples(name, 2, s))
        f.optim_step([name])


def weights(f, name):
    return {k: t.clone() for k, t in f.get_adapter_weights(name).tensors()}


def test_resume_is_bitwise_identical(tmp_path):
    straight = fleet_with()
    steps(straight, "a", range(5))
    interrupted = fleet_with()
    steps(interrupted, "a", range(3))
    interrupted.forward_backward(rand_examples("a", 2, 99))  # a pending accumulation is saved too
    interrupted.save_state("a", tmp_path / "ck", extra={"cursor": 3})
    resumed = lf.Fleet(build_debug_model("qwen3_moe", seed=0), max_adapters=2, max_rank=8)
    resumed.add_adapter("other", lf.AdapterConfig(rank=2))  # a different slot than before
    assert resumed.load_state("a", tmp_path / "ck") == {"cursor": 3}
    assert resumed.train_state("a").adam.step == 3 and resumed.train_state("a").optim == OPT
    for f in (interrupted, resumed):
        f.optim_step(["a"])
        steps(f, "a", range(4, 5))
    straight2 = fleet_with()
    steps(straight2, "a", range(3))
    straight2.forward_backward(rand_examples("a", 2, 99))
    straight2.optim_step(["a"])
    steps(straight2, "a", range(4, 5))
    a, b = weights(straight2, "a"), weights(resumed, "a")
    assert all(torch.equal(a[k], b[k]) for k in a)
    st_a, st_b = straight2.train_state("a").adam, resumed.train_state("a").adam
    assert st_a.step == st_b.step and all(torch.equal(st_a.exp_avg[k], st_b.exp_avg[k]) for k in st_a.exp_avg)


def test_load_state_into_existing_adapter_and_mismatch(tmp_path):
    f = fleet_with()
    steps(f, "a", range(2))
    f.save_state("a", tmp_path / "ck")
    saved = weights(f, "a")
    steps(f, "a", range(2, 4))
    f.load_state("a", tmp_path / "ck")
    assert all(torch.equal(saved[k], t) for k, t in weights(f, "a").items())
    f2 = fleet_with("a", lf.AdapterConfig(rank=2))
    before = weights(f2, "a")
    with pytest.raises(ValueError, match="does not match adapter 'a'"):
        f2.load_state("a", tmp_path / "ck")
    assert all(torch.equal(before[k], t) for k, t in weights(f2, "a").items())


def test_corrupt_checkpoints_change_nothing(tmp_path):
    f = fleet_with()
    steps(f, "a", range(1))
    f.save_state("a", tmp_path / "good")
    target = fleet_with()
    before = weights(target, "a")

    def corrupt(name, mutate):
        d = tmp_path / name
        d.mkdir()
        for fn in ("state.json", "tensors.safetensors"):
            (d / fn).write_bytes((tmp_path / "good" / fn).read_bytes())
        mutate(d)
        return d

    cases = {
        "garbage_tensors": (lambda d: (d / "tensors.safetensors").write_bytes(b"\x00" * 64), "corrupt checkpoint tensors"),
        "truncated": (lambda d: (d / "tensors.safetensors").write_bytes((d / "tensors.safetensors").read_bytes()[:200]), "corrupt"),
        "bad_json": (lambda d: (d / "state.json").write_text("{not json"), "corrupt checkpoint metadata"),
        "wrong_format": (lambda d: (d / "state.json").write_text(json.dumps({"format": "x"})), "not a lorafleet checkpoint"),
        "no_tensors": (lambda d: (d / "tensors.safetensors").unlink(), "not a lorafleet checkpoint"),
    }
    for name, (mutate, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            target.load_state("a", corrupt(name, mutate))
        with pytest.raises(ValueError, match=msg):
            target.load_state("new", tmp_path / name)
        assert list(target.adapters) == ["a"], name
        assert all(torch.equal(before[k], t) for k, t in weights(target, "a").items()), name
        assert target.train_state("a").adam.step == 0


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    f = fleet_with()
    steps(f, "a", range(1))
    f.save_state("a", tmp_path / "ck")
    good = {fn: (tmp_path / "ck" / fn).read_bytes() for fn in ("state.json", "tensors.safetensors")}
    steps(f, "a", range(1, 2))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(state_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        f.save_state("a", tmp_path / "ck")
    assert {fn: (tmp_path / "ck" / fn).read_bytes() for fn in good} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp leftovers
    monkeypatch.undo()
    fresh = fleet_with()
    fresh.load_state("a", tmp_path / "ck")
    assert fresh.train_state("a").adam.step == 1
