"""Same files under any parallelism, resume on another world size, clean failure of a dead rank,
and the degree checks (gloo, 2 processes)."""

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_helpers import assert_close_weights, examples, free_port, init, make_fleet, rel, spawn
from lorafleet.distributed import ParallelismConfig

LAYOUT = {"expert_parallel_degree": 2, "data_parallel_replicate_degree": 1}  # shards gathered + DP


def _first_steps(fleet):
    names = list(fleet.adapters)
    fleet.forward_backward(examples(names, 1, 2))
    fleet.optim_step()
    fleet.forward_backward(examples(names, 2, 1))  # pending: saved as the sum over ranks


def _save_worker(rank, world, out):
    fleet = make_fleet("qwen3_moe")
    init(LAYOUT, fleet)
    for n in fleet.adapters:  # the same weights as one process holds: the export is the same bytes
        fleet.save_adapter(n, Path(out) / "two-init" / n, format="vllm")
    _first_steps(fleet)
    for n in fleet.adapters:
        fleet.save_state(n, Path(out) / "two" / n)
        fleet.save_adapter(n, Path(out) / "two-peft" / n)
    return True


def test_save_on_two_ranks_load_on_one_continues_identically(tmp_path):
    spawn(_save_worker, 2, tmp_path, str(tmp_path))
    ref = make_fleet("qwen3_moe")
    for n in ref.adapters:
        ref.save_adapter(n, tmp_path / "one-init" / n, format="vllm")
        two = (tmp_path / "two-init" / n / "adapter_model.safetensors").read_bytes()
        one = (tmp_path / "one-init" / n / "adapter_model.safetensors").read_bytes()
        assert two == one, f"{n}: the 2-rank export is not byte-identical to one process's"
    _first_steps(ref)
    for n in ref.adapters:
        ref.save_state(n, tmp_path / "one" / n)
        ref.save_adapter(n, tmp_path / "one-peft" / n)
        a = load_file(str(tmp_path / "two" / n / "tensors.safetensors"))
        b = load_file(str(tmp_path / "one" / n / "tensors.safetensors"))
        assert a.keys() == b.keys()  # the same files: weights, moments, pending gradients
        assert all(a[k].shape == b[k].shape and rel(a[k], b[k]) <= 1e-5 for k in b)
        pa = load_file(str(tmp_path / "two-peft" / n / "adapter_model.safetensors"))
        pb = load_file(str(tmp_path / "one-peft" / n / "adapter_model.safetensors"))
        assert pa.keys() == pb.keys() and all(rel(pa[k], pb[k]) <= 1e-5 for k in pb)
    resumed = make_fleet("qwen3_moe")  # then emptied: the checkpoint brings every adapter back
    for n in list(resumed.adapters):
        resumed.remove_adapter(n)
    for n in ref.adapters:
        resumed.load_state(n, tmp_path / "two" / n, slot=ref.slot_of(n))
    for f in (ref, resumed):
        f.optim_step()
        f.forward_backward(examples(list(f.adapters), 3, 2))
        f.optim_step()
    assert_close_weights({n: dict(resumed.get_adapter_weights(n).tensors()) for n in resumed.adapters},
                         {n: dict(ref.get_adapter_weights(n).tensors()) for n in ref.adapters})


def _dying_worker(rank, world, port, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from lorafleet.distributed import DistributedFailure

    fleet = make_fleet("qwen3")
    init({"timeout_s": 20}, fleet)
    fleet.forward_backward(examples(["a"], 1, 2))
    if rank == 1:
        os._exit(0)  # dies between steps, without a word
    t0 = time.time()
    try:
        fleet.forward_backward(examples(["a"], 2, 2))
        fleet.optim_step()
        msg = "no error"
    except DistributedFailure as e:
        msg = str(e)
    (Path(out) / "rank0.txt").write_text(f"{time.time() - t0:.1f}\n{msg}")
    os._exit(0)


def test_killed_rank_ends_the_other_with_a_message_naming_it(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_dying_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(90)
    assert all(p.exitcode is not None for p in ctx.processes), "a rank hung"
    seconds, msg = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert float(seconds) < 20, seconds
    assert "rank 0 of 2" in msg and "rank 1 died" in msg, msg


def test_degrees_are_checked_with_one_clear_message():
    assert ParallelismConfig().resolve(4) == {"dp_replicate": 4, "dp_shard": 1, "ep": 1}
    assert ParallelismConfig(data_parallel_shard_degree=2, expert_parallel_degree=2).resolve(8, 8) == \
        {"dp_replicate": 2, "dp_shard": 2, "ep": 2}
    cases = [
        (dict(data_parallel_replicate_degree=2), 4, None, "needs 2 ranks, the world has 4"),
        (dict(expert_parallel_degree=3), 6, 8, "8 experts are not divisible by expert_parallel_degree 3"),
        (dict(expert_parallel_degree=2), 2, None, "needs a Mixture-of-Experts base"),
        (dict(data_parallel_shard_degree=3), 4, None, "not divisible by the fixed degrees' product 3"),
    ]
    for kw, world, experts, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ParallelismConfig(**kw).resolve(world, experts)
    for bad, msg in [({"data_parallel_shard_degree": 0}, "integer >= 1 or -1"),
                     ({"expert_parallel_degree": True},
                      r"^parallelism.expert_parallel_degree: expected an integer, got True$"),
                     ({"timeout_s": "soon"}, r"^parallelism.timeout_s: expected a number, got 'soon'$"),
                     ({"data_parallel_shard_degree": -1}, "at most one degree may be -1"),
                     ({"tensor_parallel_degree": 2}, r"unknown parallelism field\(s\): \['tensor_parallel_degree'\]"),
                     ({"timeout_s": 0}, "timeout_s")]:
        with pytest.raises(ValueError, match=msg) as e:
            ParallelismConfig.from_dict(bad)
        assert "\n" not in str(e.value)
    # numbers as a YAML or a CLI gives them: ``1e3`` (a string in YAML 1.1), an integral float
    assert ParallelismConfig.from_dict({"timeout_s": "1e3", "expert_parallel_degree": 2.0}) == \
        ParallelismConfig(expert_parallel_degree=2, timeout_s=1000.0)
    assert ParallelismConfig.from_dict({"timeout_s": 1e3}).timeout_s == 1000.0
