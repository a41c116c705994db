"""World-size independence under data parallelism, FSDP2 and expert parallelism (gloo, 2 processes): a mixed-adapter
run equals the single-process run, step by step, skew cases included."""

import pytest
import torch

from distributed_helpers import assert_close_records, init, make_fleet, spawn, train_steps

ARCHS = ("qwen3", "qwen3_moe")  # dense and MoE (expert LoRA in all three modes, EP off)


def _worker(rank, world, layouts):
    from lorafleet.distributed import parallelize

    out = {}
    mesh_cache = {}
    for arch, parallelism in layouts:
        fleet = make_fleet(arch)
        key = tuple(sorted(parallelism.items()))
        if key not in mesh_cache:
            mesh_cache[key] = init(parallelism, fleet).mesh
        else:
            parallelize(fleet, mesh_cache[key])
        out[(arch, key)] = train_steps(fleet)
    return out


@pytest.fixture(scope="module")
def reference():
    return {arch: train_steps(make_fleet(arch)) for arch in ARCHS}


def test_dp2_and_fsdp2_equal_one_process(tmp_path, reference):
    layouts = [(arch, {"data_parallel_replicate_degree": 2}) for arch in ARCHS]
    layouts += [(arch, {"data_parallel_shard_degree": 2, "data_parallel_replicate_degree": 1}) for arch in ARCHS]
    layouts += [("qwen3_moe", {"expert_parallel_degree": 2, "data_parallel_replicate_degree": 1})]
    results = spawn(_worker, 2, tmp_path, layouts)
    for r in results:
        for (arch, key), rec in r.items():
            assert_close_records(rec, reference[arch])
    # SPMD: every rank returns the same numbers
    for (arch, key), rec in results[0].items():
        other = results[1][(arch, key)]
        assert rec["fb"] == other["fb"]
        assert all(torch.equal(rec["weights"][n][k], other["weights"][n][k]) for n in rec["weights"]
                   for k in rec["weights"][n])
