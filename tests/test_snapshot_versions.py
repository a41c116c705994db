"""An adapter's version also moves when its weights are replaced without an optimizer step
(set_adapter_weights / load_adapter), so a rollout engine is pushed the new weights."""

import lorafleet as lf
from lorafleet.models.debug import build_debug_model


def test_replaced_weights_are_a_new_version(tmp_path):
    fleet = lf.Fleet(build_debug_model("qwen3"), max_adapters=2, max_rank=8)
    fleet.add_adapter("a", lf.AdapterConfig(rank=4, target_modules=["q_proj"], seed=0))
    fleet.add_adapter("b", lf.AdapterConfig(rank=4, target_modules=["q_proj"], seed=1))
    assert fleet.adapter_version("a") == 0 and fleet.changed_since({"a": 0, "b": 0}) == set()
    fleet.set_adapter_weights("a", fleet.get_adapter_weights("b"))  # no optimizer step
    assert fleet.adapter_version("a") == 1 and fleet.changed_since({"a": 0, "b": 0}) == {"a"}
    assert fleet.snapshot("a").version == 1
    fleet.set_optimizer("a", lf.OptimConfig(lr=1e-2))
    fleet.forward_backward([lf.Example("a", [1, 5, 6], [5, 6, 2])], loss_fn="cross_entropy")
    fleet.optim_step(["a"])
    assert fleet.adapter_version("a") == 2  # one step + one replacement
    fleet.save_adapter("b", tmp_path / "b")
    fleet.remove_adapter("b")
    fleet.load_adapter("b", tmp_path / "b")
    assert fleet.adapter_version("b") == 1 and fleet.changed_since({"a": 2, "b": 0}) == {"b"}


def test_restored_state_is_a_new_version(tmp_path):
    """load_state puts a checkpoint's weights in place: even at the step count the adapter already
    had, a rollout engine must see it as changed (else it keeps sampling the weights before)."""
    fleet = lf.Fleet(build_debug_model("qwen3"), max_adapters=2, max_rank=8)
    fleet.add_adapter("a", lf.AdapterConfig(rank=4, target_modules=["q_proj"], seed=0))
    fleet.save_state("a", tmp_path / "a0")
    before = fleet.adapter_version("a")
    fleet.load_state("a", tmp_path / "a0")
    assert fleet.adapter_version("a") == before + 1
    assert fleet.changed_since({"a": before}) == {"a"}
    assert fleet.snapshot("a").rank == 4


def test_snapshot_rank_is_the_slot_rank_under_rank_pattern():
    fleet = lf.Fleet(build_debug_model("qwen3"), max_adapters=2, max_rank=16)
    fleet.add_adapter("a", lf.AdapterConfig(rank=4, rank_pattern={"v_proj": 8},
                                            target_modules=["q_proj", "v_proj"], seed=0))
    snap = fleet.snapshot("a")
    assert snap.rank == 8  # the largest module rank: what --max-lora-rank must allow
