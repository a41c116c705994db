"""Fleet.snapshot / adapter_version / changed_since: what rollout engines are pushed."""

import json

import lorafleet as lf
from lorafleet.models.debug import build_debug_model


def _fleet():
    fleet = lf.Fleet(build_debug_model("qwen3"), max_adapters=4, max_rank=16)
    fleet.add_adapter("a", lf.AdapterConfig(rank=4, target_modules=["q_proj", "v_proj"], seed=0))
    fleet.add_adapter("b", lf.AdapterConfig(rank=8, target_modules=["q_proj"], seed=1))
    for n in ("a", "b"):
        fleet.set_optimizer(n, lf.OptimConfig(lr=1e-2))
    return fleet


def _step(fleet, name):
    fleet.forward_backward([lf.Example(name, input_tokens=[1, 5, 6], target_tokens=[5, 6, 2])],
                           loss_fn="cross_entropy")
    fleet.optim_step([name])


def test_snapshot_trims_rank_copies_and_versions(tmp_path):
    fleet = _fleet()
    snap = fleet.snapshot("a", layout="peft")
    assert snap.rank == 4 and snap.version == 0 and snap.config["r"] <= 4
    a_keys = [k for k in snap.tensors if k.endswith("lora_A.weight")]
    assert a_keys and all(snap.tensors[k].shape[0] <= 4 for k in a_keys)
    before = {k: v.clone() for k, v in snap.tensors.items()}
    assert fleet.changed_since({"a": 0, "b": 0}) == set()
    assert fleet.changed_since({"a": 0}) == {"b"}
    _step(fleet, "a")
    assert fleet.adapter_version("a") == 1 and fleet.changed_since({"a": 0, "b": 0}) == {"a"}
    for k, v in snap.tensors.items():  # a copy: the step did not reach into the snapshot
        assert v.equal(before[k])
    assert any(not fleet.snapshot("a").tensors[k].equal(before[k]) for k in before)
    path = snap.write(tmp_path / "a")
    assert json.loads((path / "adapter_config.json").read_text())["r"] == snap.config["r"]
    snap2 = fleet.snapshot("a")
    snap2.write(tmp_path / "a")  # replaced in place, no temporaries left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    fleet.remove_adapter("c") if "c" in fleet.adapters else None
    loaded = lf.Fleet(build_debug_model("qwen3"), max_adapters=2, max_rank=16)
    loaded.load_adapter("a", path)
    assert loaded.snapshot("a").tensors.keys() == snap2.tensors.keys()
