"""`torchrun --nproc-per-node 2 -m lorafleet serve` (EP=2, gloo, CPU) driven by the real tinker SDK
and `lorafleet submit` gives what a single-process server gives for the same calls; SIGTERM stops
both ranks. Then the command channel alone (distributed/serve.py) on 2 spawned ranks: a bad
input fails alike on both, an idle follower outlives the timeout, and a dead or diverging
follower fails rank 0's calls with a clear error instead of a hang."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

# the spawned ranks below import this module: tinker and the service load only where used

ROOT = Path(__file__).resolve().parents[1]
BASE, KEY, T, TOL = "debug:qwen3_moe", "tml-local-0123456789", 60, 1e-5


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(single-process url, 2-rank url, the torchrun process, its log)."""
    from lorafleet.service.core import ServiceConfig
    from lorafleet.service.server import ServerThread, build_service, make_app

    tmp = tmp_path_factory.mktemp("dist_serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LORAFLEET_API_KEYS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    common = ["--max-adapters", "4", "--max-rank", "8", "--dataset-root", str(ROOT / "examples" / "data")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "lorafleet", "serve", "--base", BASE, "--port", str(port), "--data-dir", str(tmp / "two"),
           "--threads", "1", "--parallelism.expert_parallel_degree", "2", "--parallelism.timeout_s", "60", *common]
    log = tmp / "torchrun.log"
    with open(log, "w") as f:
        # its own process group: teardown ends torchrun AND its ranks (a SIGKILLed agent orphans them)
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the reference, built while the ranks start: the same base and slots in this process
        svc = build_service(BASE, ServiceConfig(data_dir=str(tmp / "one"), max_adapters=4, max_rank=8,
                                                dataset_roots=[str(ROOT / "examples" / "data")]), log_fn=lambda *a: None)
        app, _ = make_app(svc, keys={})
        srv = ServerThread(app)
        one, two = srv.start(), f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _healthy(two):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield one, two, proc, log
        srv.stop()
        svc.close()
    finally:
        _end_group(proc)


def _end_group(proc) -> None:
    """SIGTERM torchrun's process group (its ranks shut down gracefully), SIGKILL what is left."""
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.5)  # the ranks exit just after the agent
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(a, b) -> float:
    """Relative error of numbers, or of lists of them or tensors (as vectors)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _healthy(url) -> bool:
    import httpx

    try:
        return httpx.get(url + "/api/v1/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def datum(tok, text):
    from tinker import types

    ids = tok.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


def sdk_scenario(url) -> dict:
    """Training, a checkpoint round trip, a user error every rank's fleet raises, sampling."""
    import tinker
    from tinker import types

    sc = tinker.ServiceClient(base_url=url, api_key=KEY)
    # train_unembed=False: a distributed server does not adapt the LM head (the SDK's default asks for it)
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=1, train_unembed=False).result(timeout=T)
    tok = tc.get_tokenizer()
    data = [datum(tok, s) for s in ("the cat sat", "on the mat", "a dog ran far", "up the hill")]
    out = {"loss": [], "grad_norm": []}
    for _ in range(3):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=5e-3, grad_clip_norm=50.0))
        out["loss"].append(fb.result(timeout=T).metrics["loss:sum"])
        out["grad_norm"].append(opt.result(timeout=T).metrics["grad_norm:mean"])
    fwd = tc.forward(data, "cross_entropy").result(timeout=T)
    out["logprobs"] = [x for o in fwd.loss_fn_outputs for x in o["logprobs"].tolist()]
    path = tc.save_state("ckpt").result(timeout=T).path
    resumed = sc.create_training_client_from_state_with_optimizer(path).result(timeout=T)
    resumed.forward_backward(data[:2], "cross_entropy")  # accumulated over two calls
    resumed.forward_backward(data[2:], "cross_entropy")
    resumed.optim_step(types.AdamParams(learning_rate=5e-3)).result(timeout=T)
    out["resumed"] = resumed.forward(data, "cross_entropy").result(timeout=T).metrics["loss:sum"]
    other = sc.create_lora_training_client(base_model=BASE, rank=8, seed=2).result(timeout=T)  # the SDK's default
    out["train_unembed"] = head_reported(url, other.model_id)  # fresh: its head LoRA (if any) changes nothing
    with pytest.raises(tinker.TinkerError, match="does not match"):  # raised by every rank's fleet
        other.load_state(path).result(timeout=T)
    out["after_error"] = other.forward(data, "cross_entropy").result(timeout=T).metrics["loss:sum"]
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(tok.encode("the cat"))
    greedy = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=8, temperature=0.0),
                            include_prompt_logprobs=True).result(timeout=T)
    seeded = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=8, temperature=1.0, seed=7)).result(timeout=T)
    out["greedy"] = [s.tokens for s in greedy.sequences]
    out["seeded"] = [s.tokens for s in seeded.sequences]
    out["prompt_logprobs"] = [x for x in greedy.prompt_logprobs if x is not None]
    return out


def test_sdk_calls_equal_one_process(servers):
    one, two, proc, log = servers
    a, b = sdk_scenario(one), sdk_scenario(two)
    for k in ("loss", "grad_norm"):  # step by step
        assert len(a[k]) == len(b[k]) and max(rel_err(x, y) for x, y in zip(a[k], b[k])) <= TOL, (k, a[k], b[k])
    for k in ("logprobs", "prompt_logprobs", "resumed", "after_error"):
        assert rel_err(a[k], b[k]) <= TOL, (k, a[k], b[k])
    assert a["greedy"] == b["greedy"] and a["seeded"] == b["seeded"]
    assert proc.poll() is None  # the followers did not die on the user's error
    assert (a["train_unembed"], b["train_unembed"]) == (True, False)  # one process adapts the head, EP=2 not


def head_reported(url, model_id) -> bool:
    """get_info's train_unembed (the SDK's GetInfoResponse drops it)."""
    import httpx

    r = httpx.post(url + "/api/v1/get_info", json={"model_id": model_id}, headers={"X-API-Key": KEY}, timeout=T)
    return r.json()["train_unembed"]


def small_job(tmp_path: Path) -> Path:
    spec = {"name": "rev", "data": str(ROOT / "examples/data/rev_train.jsonl"),
            "eval_data": str(ROOT / "examples/data/rev_eval.jsonl"), "rank": 4, "alpha": 8,
            "target_modules": ["q_proj", "v_proj"], "experts": True, "optimizer": {"lr": 1e-2},
            "batch_size": 4, "max_steps": 4, "max_length": 32, "checkpoint_every": 2}
    p = tmp_path / "rev.yaml"
    p.write_text(json.dumps(spec))
    return p


def run_job(url, job: Path, out: Path, capsys) -> tuple[list, dict]:
    from safetensors.torch import load_file

    from lorafleet.cli import main as cli
    from lorafleet.client import JobClient

    assert cli(["submit", str(job), "--url", url, "--api-key", KEY]) == 0
    job_id = capsys.readouterr().out.split()[1]
    c, deadline = JobClient(url, KEY), time.monotonic() + 120
    while (st := c.status(job_id))["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    assert st["status"] == "succeeded", st
    with tarfile.open(c.download(job_id, out / f"{job_id}.tar.gz")) as tar:
        tar.extractall(out / job_id, filter="data")
    return st["metrics"], load_file(str(out / job_id / "rev" / "adapter_model.safetensors"))


def test_submitted_job_equals_one_process(servers, tmp_path, capsys):
    one, two, _, _ = servers
    job = small_job(tmp_path)
    (ma, wa), (mb, wb) = run_job(one, job, tmp_path, capsys), run_job(two, job, tmp_path, capsys)
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        assert rel_err(x["loss"], y["loss"]) <= TOL and rel_err(x["grad_norm"], y["grad_norm"]) <= TOL, (x, y)
    assert rel_err(ma[-1]["eval_loss"], mb[-1]["eval_loss"]) <= TOL
    assert wa.keys() == wb.keys() and any("experts" in k for k in wb)  # expert shards gathered on export
    for k in wa:
        assert rel_err(wa[k], wb[k]) <= TOL, k


def test_sigterm_stops_both_ranks(servers):
    *_, proc, log = servers
    proc.send_signal(signal.SIGTERM)  # to torchrun: it signals both ranks, rank 0 releases rank 1
    rc = proc.wait(timeout=40)
    text = log.read_text()
    assert "stopped (rank 0 of 2" in text and "stopped (rank 1 of 2)" in text, text[-3000:]
    assert "lorafleet serve: error" not in text and "lorafleet/" not in text, text[-3000:]  # no traceback of ours
    # torchrun itself ends by re-raising the signal it got (a SignalException, exit code 1)
    print(f"torchrun exit code after SIGTERM: {rc}; both ranks stopped cleanly")


# ----------------------------------------------------------------------- the channel alone
class FakeFleet:
    """Stands in for a Fleet: the channel only sees method names, arguments and outcomes."""

    lora_device = "cpu"

    def __init__(self, rank):
        self.rank, self.names = rank, []

    def add_adapter(self, name, config=None, slot=None):
        if name == "bad":
            raise ValueError("bad adapter name")  # every rank, before any change
        if name == "die" and self.rank == 1:
            os._exit(1)
        if name == "differ" and self.rank == 1:
            raise RuntimeError("only on rank 1")
        self.names.append(name)
        return len(self.names)

    def set_optimizer(self, names, config=None):  # every rank must hold the same adapters
        if self.names != names:
            raise ValueError(f"rank {self.rank} holds {self.names}")

    def forward(self, ids):
        return ids * 2

    def detach(self):
        pass


def _rank(rank, port, out):
    """One of 2 spawned ranks (this module is imported there: its top stays light)."""
    import torch.distributed as dist

    from lorafleet.distributed.failure import start_heartbeat
    from lorafleet.distributed.serve import BroadcastFleet, CommandChannel, EngineLost, follow

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    start_heartbeat(0.5)
    channel, fleet = CommandChannel(3.0), FakeFleet(rank)
    if rank:
        follow(fleet, channel)
        return
    proxy, res = BroadcastFleet(fleet, channel, keepalive_s=1.0), {}
    assert proxy.add_adapter("a") == 1
    try:
        proxy.add_adapter("bad")
    except ValueError as e:
        res["bad"] = str(e)
    time.sleep(4)  # idle past the channel's 3 s timeout: the keep-alive holds the follower
    assert proxy.add_adapter("b") == 2
    proxy.set_optimizer(["a", "b"])  # the follower holds the same adapters
    res["forward"] = proxy.forward(torch.arange(3)).tolist()
    try:
        proxy.detach()
    except AttributeError as e:
        res["unclassified"] = str(e)
    t0 = time.monotonic()
    for attempt in ("first", "later"):
        try:
            proxy.add_adapter("die")
        except EngineLost as e:
            res[attempt] = str(e)
    res["seconds"] = time.monotonic() - t0
    Path(out, "rank0.json").write_text(json.dumps(res))
    os._exit(0)  # the group is broken: skip its teardown


def test_follower_survives_bad_input_and_its_death_fails_calls_clearly(tmp_path):
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        assert p.exitcode is not None, "a rank hangs"
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert res["bad"] == "bad adapter name" and res["forward"] == [0, 2, 4] and "not classified" in res["unclassified"]
    assert "rank 1 died" in res["first"] and "restart the service" in res["first"], res
    assert res["later"] == res["first"] and res["seconds"] < 15, res


class ScriptedChannel:
    """A channel without processes: rank 0 gets scripted follower outcomes, a follower scripted commands."""

    timeout_s, world = 5.0, 2

    def __init__(self, rank, commands=(), outcomes=()):
        self.rank, self.commands, self.outcomes, self.sent, self.reported = rank, list(commands), list(outcomes), [], []

    def broadcast(self, command=None):
        if self.rank == 0:
            self.sent.append(command)
            return command
        return self.commands.pop(0)

    def gather(self, outcome):
        if self.rank == 0:
            return [outcome, self.outcomes.pop(0)]
        self.reported.append(outcome)


def test_ranks_that_end_a_call_differently_lose_the_engine():
    from lorafleet.distributed.serve import BroadcastFleet, EngineLost

    ch = ScriptedChannel(0, outcomes=[None, ("RuntimeError", "only on rank 1")])
    proxy = BroadcastFleet(FakeFleet(0), ch, keepalive_s=60)
    assert proxy.add_adapter("a") == 1 and ch.sent[-1] == ("call", "add_adapter", ("a",), {})
    with pytest.raises(EngineLost, match="rank 0: ok; rank 1: RuntimeError: only on rank 1"):
        proxy.add_adapter("differ")
    assert ch.sent[-1][0] == "leave"  # the live follower is told to go
    n = len(ch.sent)
    with pytest.raises(EngineLost):
        proxy.add_adapter("c")
    assert len(ch.sent) == n  # nothing more is sent


def test_follower_runs_commands_until_told_to_leave():
    from lorafleet.distributed.serve import follow

    fleet = FakeFleet(1)
    ch = ScriptedChannel(1, commands=[("call", "add_adapter", ("bad",), {}), ("ping", None, (), {}),
                                      ("call", "add_adapter", ("a",), {}), ("call", "add_adapter", ("differ",), {}),
                                      ("call", "set_optimizer", (["a"],), {}), ("leave", "why", (), {})])
    assert follow(fleet, ch) == 1
    assert ch.reported == [("ValueError", "bad adapter name"), None, ("RuntimeError", "only on rank 1"), None]
    assert fleet.names == ["a"]
    assert follow(FakeFleet(1), ScriptedChannel(1, commands=[("shutdown", None, (), {})])) == 0
