"""Expert parallelism end to end through the engine (`parallelize` -> ``fleet.comm``): K=2 steps
of mixed-adapter training (all expert modes, grad accumulation, clipping, skew, base-only
steps) under EP=2 x expert-DP=2 on 4 gloo processes, with activation checkpointing, equal the
single-process run step by step; the PEFT export written from the sharded run holds the same
tensors as the single-process one."""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import assert_close_records, init, make_fleet, spawn, train_steps

LAYOUT = {"expert_parallel_degree": 2, "data_parallel_replicate_degree": 2}


def _run(rank, world, checkpointing, out_dir):
    fleet = make_fleet("qwen3_moe")
    if checkpointing:
        fleet.model.gradient_checkpointing_enable()
        fleet.model.train()
    if world > 1:
        init(LAYOUT, fleet)
        m = next(iter(fleet._att.experts.values()))
        assert m.num_local_experts == m.num_experts // 2 and m.token_dispatcher is not None
    rec = train_steps(fleet)
    fleet.save_adapter("c", f"{out_dir}/c-{world}", format="peft")  # shared-outer: replicas and shards
    return rec


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    return _run(0, 1, False, d), d


def test_ep2_x_dp2_training_equals_one_process(tmp_path, reference):
    from safetensors.torch import load_file

    ref, ref_dir = reference
    results = spawn(_run, 4, tmp_path, True, str(tmp_path), timeout=240)
    for rec in results:
        assert_close_records(rec, ref)
    want = load_file(f"{ref_dir}/c-1/adapter_model.safetensors")
    got = load_file(f"{tmp_path}/c-4/adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert ((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30)) <= 1e-5, k
