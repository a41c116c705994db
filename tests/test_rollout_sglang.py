"""The SGLang sink (rollout/sglang.py) against tests/sglang_fake.py, a stand-in server that checks
SGLang 0.5.23's request format and answers in its response format."""

import dataclasses
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

import lorafleet as lf
from lorafleet.engine.sampling import SamplingParams
from lorafleet.models.debug import build_debug_model
from lorafleet.rollout import RolloutError
from lorafleet.rollout.sglang import SGLangEngine, make_sglang_engine, sglang_cannot_load, with_stack_partners

from sglang_fake import SAMPLING_KEYS, FakeSGLang


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A debug Qwen3 base with an adapter (q/v/down), and its config.json for the fake server."""
    d = tmp_path_factory.mktemp("base")
    model = build_debug_model("qwen3")
    model.config.save_pretrained(d)
    fleet = lf.Fleet(model, max_adapters=2, max_rank=16)
    fleet.add_adapter("a", lf.AdapterConfig(rank=8, target_modules=["q_proj", "v_proj", "down_proj"], seed=0))
    fleet.set_optimizer("a", lf.OptimConfig(lr=5e-2))
    return d, fleet


def _step(fleet):
    fleet.forward_backward([lf.Example("a", input_tokens=[1, 5, 6], target_tokens=[5, 6, 9])], loss_fn="cross_entropy")
    fleet.optim_step(["a"])


def _engine(fake, d, **kw):
    return SGLangEngine(fake.url, base_dir=str(d), max_rank=16, retry_wait_s=0.01, **kw)


def _from_elsewhere(snap):
    """The snapshot as a source other than a fleet export sends it: without the zero q/k/v and
    gate/up partners the export adds (what the sink's own partner step is for)."""
    zero = {k[: -len(".lora_A.weight")] for k, t in snap.tensors.items() if k.endswith(".lora_A.weight")
            and not t.any() and not snap.tensors[k.replace("lora_A", "lora_B")].any()}
    names = {stem.rsplit(".", 1)[-1] for stem in zero}
    tensors = {k: t for k, t in snap.tensors.items() if k.rsplit(".", 2)[0] not in zero}
    config = {**snap.config, "target_modules": sorted(set(snap.config["target_modules"]) - names)}
    return dataclasses.replace(snap, tensors=tensors, config=config)


def _bodies(fake, path):
    return [b for p, b in fake.requests if p == path]


def test_push_generate_and_prompt_logprobs(base):
    d, fleet = base
    with FakeSGLang(d) as fake:
        eng = make_sglang_engine({"engine": "sglang", "url": fake.url + "/"}, base_dir=str(d), max_rank=16)
        snap = fleet.snapshot("a", layout="sglang")
        assert eng.push(snap) == "a"
        (load,) = _bodies(fake, "/load_lora_adapter")
        assert load == {"lora_name": f"a@v{snap.version}", "lora_path": load["lora_path"], "pinned": False}
        assert json.loads(open(load["lora_path"] + "/adapter_config.json").read())["r"] == 8
        prompts = [[1, 5, 6], [3, 4]]
        params = SamplingParams(max_tokens=5, temperature=1.0, top_k=-1, stop=[23, "\n"], seed=7)
        out = eng.generate("a", prompts, params, 3)
        (gen,) = _bodies(fake, "/generate")
        assert gen["input_ids"] == [[1, 5, 6]] * 3 + [[3, 4]] * 3 and gen["lora_path"] == f"a@v{snap.version}"
        assert gen["return_logprob"] is True
        assert [sp["sampling_seed"] for sp in gen["sampling_params"]] == list(range(7, 13))
        assert gen["sampling_params"][0] == {"max_new_tokens": 5, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                             "stop": ["\n"], "stop_token_ids": [23], "sampling_seed": 7}
        assert [len(g) for g in out] == [3, 3]
        assert len({tuple(s.tokens) for s in out[0]}) > 1  # a seed per row: the samples differ
        for prompt, group in zip(prompts, out):
            for s in group:
                assert 1 <= len(s.tokens) == len(s.logprobs) <= 5
                assert s.stop_reason == ("length" if len(s.tokens) == 5 and s.tokens[-1] not in (2, 23) else "stop")
                # the sampled logprobs are the model's at each completion position
                lps = eng.prompt_logprobs("a", prompt + s.tokens)
                assert lps[0] is None and lps[len(prompt):] == s.logprobs
        pl = _bodies(fake, "/generate")[-1]
        assert pl["logprob_start_len"] == 0 and pl["sampling_params"] == {"max_new_tokens": 0, "temperature": 0.0}
        base_out = eng.generate(None, [[1, 5, 6]], SamplingParams(max_tokens=3, temperature=0.0), 1)
        assert "lora_path" not in _bodies(fake, "/generate")[-1] and len(base_out[0][0].tokens) >= 1
        eng.close()
        assert fake.loaded == {} and not eng.adapter_dir.exists()


def test_push_after_a_step_serves_the_new_version_and_unloads_the_old(base):
    d, fleet = base
    with FakeSGLang(d) as fake:
        eng = _engine(fake, d)
        greedy = SamplingParams(max_tokens=6, temperature=0.0, stop_on_eos=False)
        v0 = fleet.adapter_version("a")
        eng.push(fleet.snapshot("a", layout="sglang"))
        before = eng.generate("a", [[1, 5, 6]], greedy, 2)[0]
        assert before[0].tokens == before[1].tokens and len(before[0].tokens) == 6
        assert _bodies(fake, "/generate")[-1]["sampling_params"][0]["ignore_eos"] is True
        _step(fleet)
        eng.push(fleet.snapshot("a", layout="sglang"))
        assert list(fake.loaded) == [f"a@v{v0 + 1}"]
        assert _bodies(fake, "/unload_lora_adapter") == [{"lora_name": f"a@v{v0}"}]
        assert not eng.adapter_path(f"a@v{v0}").exists() and eng.adapter_path(f"a@v{v0 + 1}").is_dir()
        after = eng.generate("a", [[1, 5, 6]], greedy, 1)[0][0]
        assert after.tokens != before[0].tokens  # the engine samples the stepped adapter
        assert fake.violations == []
        eng.close()


def test_a_push_during_an_in_flight_generate_never_unloads_its_version(base):
    """The asynchronous case: a rollout thread samples version v while the trainer pushes v+1.
    The old name stays loaded until that request is done (no unload of a name in use)."""
    d, fleet = base
    with FakeSGLang(d) as fake:
        eng = _engine(fake, d)
        v = fleet.adapter_version("a")
        eng.push(fleet.snapshot("a", layout="sglang"))
        fake.hold = True  # the rollout's request stays in flight until released
        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "out", eng.generate("a", [[1, 2]], SamplingParams(max_tokens=3, seed=1), 2)))
        t.start()
        deadline = time.monotonic() + 30
        while not fake.in_flight.get(f"a@v{v}") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.in_flight.get(f"a@v{v}") == 2  # its two rows
        fake.hold = False
        _step(fleet)
        eng.push(fleet.snapshot("a", layout="sglang"))  # while the request on a@v{v} runs
        assert set(fake.loaded) == {f"a@v{v}", f"a@v{v + 1}"}
        eng.generate("a", [[1, 2]], SamplingParams(max_tokens=2), 1)
        assert _bodies(fake, "/generate")[-1]["lora_path"] == f"a@v{v + 1}"
        fake.release.set()
        t.join()
        assert len(result["out"][0]) == 2
        assert set(fake.loaded) == {f"a@v{v + 1}"}  # unloaded by the last request out
        assert fake.violations == []
        eng.close()


def test_an_old_version_already_gone_from_the_server_is_no_error(base):
    """A retried unload whose first answer was lost, or a restarted server: SGLang says the name
    does not exist; the push goes on."""
    d, fleet = base
    with FakeSGLang(d) as fake:
        eng = _engine(fake, d)
        v = fleet.adapter_version("a")
        eng.push(fleet.snapshot("a", layout="sglang"))
        fake.loaded.clear()
        _step(fleet)
        eng.push(fleet.snapshot("a", layout="sglang"))
        assert list(fake.loaded) == [f"a@v{v + 1}"] and eng.versions.loaded("a") == [f"a@v{v + 1}"]
        eng.close()


def test_an_adapter_left_loaded_by_an_earlier_run_is_replaced(base):
    d, fleet = base
    with FakeSGLang(d) as fake:
        v = fleet.adapter_version("a")
        fake.loaded[f"a@v{v}"] = 123.0  # a resumed job meets its own old upload
        eng = _engine(fake, d)
        eng.push(fleet.snapshot("a", layout="sglang"))
        assert [p for p, _ in fake.requests if p != "/server_info"] == [
            "/load_lora_adapter", "/unload_lora_adapter", "/load_lora_adapter"]
        assert fake.loaded[f"a@v{v}"] != 123.0
        eng.close()


def test_engine_errors_are_one_line_naming_the_answer(base, tmp_path):
    d, fleet = base
    with FakeSGLang(d, enable_lora=False) as fake:
        with pytest.raises(RolloutError, match=r"started without --enable-lora"):
            _engine(fake, d)
    with FakeSGLang(d, max_lora_rank=4) as fake:
        with pytest.raises(RolloutError, match=r"the server's --max-lora-rank is 4, below the job's max_rank 16"):
            _engine(fake, d)
    with FakeSGLang(d, max_lora_rank=4, server_info=False) as fake:  # no /server_info: the load says it
        eng = _engine(fake, d)
        with pytest.raises(RolloutError, match=r"POST /load_lora_adapter: HTTP 400: LoRA adapter a@v\d+ with rank 8 "
                                               r"is incompatible with the current LoRA memory pool") as e:
            eng.push(fleet.snapshot("a", layout="sglang"))
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="adapter 'a' was never pushed"):
            eng.generate("a", [[1]], SamplingParams(), 1)
        with pytest.raises(RolloutError,
                           match=r"HTTP 400: unknown field `max_tokens`, expected one of `max_new_tokens`"):
            eng._post("/generate", {"input_ids": [1, 2], "sampling_params": {"max_tokens": 2}})
        with pytest.raises(RolloutError,
                           match=r"HTTP 400: return_logprobs: GenerateReqInput has no field 'return_logprobs'$"):
            eng._post("/generate", {"input_ids": [1, 2], "return_logprobs": True})
        with pytest.raises(RolloutError, match=r"HTTP 400: The following requested LoRA adapters are not loaded: b@v0 "
                                               r"Loaded adapters"):
            eng._post("/generate", {"input_ids": [1, 2], "lora_path": "b@v0"})
        with pytest.raises(ValueError, match="in the 'sglang' layout, got 'peft'"):
            eng.push(fleet.snapshot("a", layout="peft"))
        eng.close()
    with FakeSGLang(d) as fake:
        gone = fake.url  # a server that was there and is not any more
    with pytest.raises(RolloutError, match=rf"rollout engine sglang at {gone}: GET /server_info: .*refused"):
        SGLangEngine(gone, base_dir=str(d), max_rank=16, request_retries=1, retry_wait_s=0.01)


@pytest.mark.parametrize("targets, zeros", [
    (["q_proj"], {"k_proj", "v_proj"}),
    (["k_proj", "v_proj"], {"q_proj"}),
    (["q_proj", "v_proj", "up_proj"], {"k_proj", "gate_proj"}),
])
def test_incomplete_qkv_and_gate_up_groups_are_pushed_with_zero_partners(base, targets, zeros):
    """SGLang stacks q/k/v and gate/up and fails on (q without v) or skips (k/v without q, up
    without gate) an incomplete group; the push fills it with zero LoRAs, which change nothing."""
    from safetensors.torch import load_file

    d, _ = base
    fleet, _ = _trained("qwen3", targets)
    snap = _from_elsewhere(fleet.snapshot("a", layout="sglang"))
    with FakeSGLang(d) as fake:  # the fake refuses incomplete groups as SGLang's loader does
        eng = _engine(fake, d, adapter_dir=str(d / "pushed"))
        eng.push(snap)
        (path,) = [Path(b["lora_path"]) for b in _bodies(fake, "/load_lora_adapter")]
        written = load_file(str(path / "adapter_model.safetensors"))
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["target_modules"] == sorted(set(targets) | zeros)
        for key, t in snap.tensors.items():  # what was trained is written unchanged
            assert written[key].equal(t)
        added = {k: t for k, t in written.items() if k not in snap.tensors}
        assert {k.split(".")[-3] for k in added} == zeros and all(not t.any() for t in added.values())
        other = lf.Fleet(build_debug_model("qwen3"), max_adapters=1, max_rank=8)  # same seed: the same base
        other.load_adapter("a", path)  # lorafleet reads the pushed directory back: the same outputs
        tokens = [1, 5, 6, 7, 9, 2]
        got, want = other.compute_logprobs("a", tokens)[1:], fleet.compute_logprobs("a", tokens)[1:]
        assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-6)
        eng.close()


def test_a_zero_partner_of_unknown_size_is_refused_at_the_push_in_one_line(base, tmp_path):
    d, _ = base
    fleet, _ = _trained("qwen3", ["q_proj"])
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))  # no attention geometry
    with FakeSGLang(d) as fake:
        eng = _engine(fake, tmp_path)
        with pytest.raises(RolloutError, match=r"^rollout engine sglang at .*: adapter 'a': .*q_proj.lora_A.weight: "
                                               r"SGLang stacks q_proj/k_proj/v_proj together and needs a zero k_proj "
                                               r"LoRA beside q_proj, but the output size of .*k_proj is unknown here$"):
            eng.push(_from_elsewhere(fleet.snapshot("a", layout="sglang")))
        assert _bodies(fake, "/load_lora_adapter") == []
        eng.close()


def test_a_push_needs_the_servers_moe_pool_to_match_the_experts_layout(base):
    """SGLang's MoE LoRA pool is per-expert or shared-outer for the whole server; the per-expert
    one would give a shared-outer adapter's shared factors to expert 0 only."""
    d, _ = base
    shared, _ = _trained("qwen3_moe", ["q_proj", "v_proj"], experts=True, expert_sharing="shared_outer")
    per_expert, _ = _trained("qwen3_moe", ["q_proj", "v_proj"], experts=True, expert_sharing="shared_a")
    for mode in (None, False):
        with FakeSGLang(d, experts_shared_outer_loras=mode) as fake:
            eng = _engine(fake, d)
            with pytest.raises(RolloutError, match=rf"adapter 'a': expert_sharing shared_outer: .* is {mode}.*"
                                                   r"start it with --experts-shared-outer-loras"):
                eng.push(shared.snapshot("a", layout="sglang"))
            assert _bodies(fake, "/load_lora_adapter") == []
    with FakeSGLang(d, experts_shared_outer_loras=True) as fake:
        eng = _engine(fake, d)
        with pytest.raises(RolloutError, match=r"adapter 'a': its experts LoRA is per expert, but the server runs "
                                               r"the shared-outer pool"):
            eng.push(per_expert.snapshot("a", layout="sglang"))
        assert sglang_cannot_load(shared.snapshot("a", layout="sglang"), fake.server_info()) is None
        assert _bodies(fake, "/load_lora_adapter") == []


def test_transient_failures_are_retried_a_bounded_number_of_times(base):
    d, fleet = base
    with FakeSGLang(d) as fake:
        eng = _engine(fake, d, request_retries=2)
        eng.push(fleet.snapshot("a", layout="sglang"))
        fake.fail_next = [(503, {"error": {"message": "busy"}}), (502, None)]
        assert len(eng.generate("a", [[1, 2]], SamplingParams(max_tokens=2), 1)[0]) == 1
        fake.fail_next = [(503, {"error": {"message": "busy"}})] * 3
        with pytest.raises(RolloutError, match=r"POST /generate: HTTP 503: busy$"):
            eng.generate("a", [[1, 2]], SamplingParams(max_tokens=2), 1)
        assert fake.fail_next == []  # 1 try + 2 retries
        n = len(fake.requests)
        fake.fail_next = [(500, {"error": {"message": "CUDA error: device-side assert"}})]
        with pytest.raises(RolloutError, match=r"HTTP 500: CUDA error: device-side assert"):
            eng.generate("a", [[1, 2]], SamplingParams(max_tokens=2), 1)
        assert len(fake.requests) == n  # not retried (and the refused request never reached a handler)
        assert eng.versions.in_use(eng.versions.current("a")) == 0  # a failed request released its version
        eng.close()


@pytest.mark.parametrize("spec,message", [
    ({"url": "http://x:1", "max_version": 2}, r"^max_version: unknown option for engine sglang \(its options: url, "),
    ({"url": "localhost:30000"}, r"^url: engine sglang needs the server's url"),
    ({"url": "http://:30000"}, r"^url: engine sglang needs"),
    ({"url": "http://x:99999"}, r"^url: engine sglang needs"),
    ({}, r"^url: engine sglang needs the server's url \(http://host:port\), got None"),
    ({"url": "http://x:1", "max_versions": 0}, r"^max_versions must be an integer >= 1"),
    ({"url": "http://x:1", "max_versions": "2"}, r"^max_versions must be an integer >= 1 .*got '2'"),
    ({"url": "http://x:1", "pinned": "yes"}, r"^pinned: must be true or false"),
    ({"url": "http://x:1", "timeout_s": 0}, r"^timeout_s: must be a number > 0"),
    ({"url": "http://x:1", "request_retries": -1}, r"^request_retries: must be an integer >= 0"),
])
def test_make_sglang_engine_refuses_a_bad_spec_naming_the_field(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        make_sglang_engine({"engine": "sglang", **spec}, base_dir="/nonexistent", max_rank=8)
    assert "\n" not in str(e.value)


def test_max_versions_needs_room_in_the_servers_batch(base):
    d, _ = base
    with FakeSGLang(d, max_loras_per_batch=2) as fake:
        with pytest.raises(ValueError, match=r"max_versions=2 .* needs --max-loras-per-batch >= 3, it was started "
                                             r"with --max-loras-per-batch 2"):
            make_sglang_engine({"engine": "sglang", "url": fake.url, "max_versions": 2}, base_dir=str(d), max_rank=16)
        eng = make_sglang_engine({"engine": "sglang", "url": fake.url, "max_versions": 1, "pinned": True,
                                  "adapter_dir": str(d / "pushed"), "timeout_s": 30, "request_retries": 0,
                                  "wait_s": 5}, base_dir=str(d), max_rank=16)
        assert eng.versions.max_versions == 1 and eng.adapter_dir == d / "pushed" and eng.pinned
        eng.close()
        assert (d / "pushed").is_dir()  # the user's own directory is kept


def test_the_fake_refuses_what_sglangs_contract_refuses():
    """The fake's sampling keys are the contract's, and everything the sink sends is among them."""
    from lorafleet.rollout.sglang import sampling_params

    sent = sampling_params(SamplingParams(max_tokens=3, stop=["x", 7], seed=1, stop_on_eos=False), 0)
    assert set(sent) <= set(SAMPLING_KEYS)
    assert set(sent) == {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
                         "ignore_eos", "sampling_seed"}


# ---- SGLang's own code, on CPU: `pip install sglang==0.5.23` into a separate environment (about
# 11 GB; it pins its own torch) and point LORAFLEET_SGLANG_PYTHON at its python.
NO_SGLANG = "set LORAFLEET_SGLANG_PYTHON to a python with sglang==0.5.23 installed (see docs/rollout_sglang.md)"
SGLANG_PYTHON = os.environ.get("LORAFLEET_SGLANG_PYTHON")


def _trained(kind, targets, **cfg):
    model = build_debug_model(kind)
    fleet = lf.Fleet(model, max_adapters=2, max_rank=8)
    fleet.add_adapter("a", lf.AdapterConfig(rank=4, target_modules=targets, seed=0, **cfg))
    fleet.set_optimizer("a", lf.OptimConfig(lr=5e-2))
    fleet.forward_backward([lf.Example("a", input_tokens=[1, 5, 6, 7], target_tokens=[5, 6, 7, 9])],
                           loss_fn="cross_entropy")
    fleet.optim_step(["a"])  # B no longer zero: the values compared below mean something
    return fleet, model.config


def _sglang_check(job_path):
    run = subprocess.run([SGLANG_PYTHON, str(Path(__file__).parent / "sglang_loader_check.py"), str(job_path)],
                         capture_output=True, text=True, timeout=600)
    line = next((x for x in run.stdout.splitlines() if x.startswith("SGLANG_CHECK ")), None)
    assert line, run.stderr[-3000:]
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.slow
def test_sglangs_loader_reads_the_exports_and_its_contract_admits_the_bodies(base, tmp_path):
    if not SGLANG_PYTHON:
        pytest.skip(NO_SGLANG)
    from safetensors.torch import load_file

    cases = {"dense": ("qwen3", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}),
             "dense_qv": ("qwen3", ["q_proj", "v_proj", "down_proj"], {}),
             "moe": ("qwen3_moe", ["q_proj", "v_proj"], {"experts": True})}
    fleets, adapters = {}, []
    for case, (kind, targets, cfg) in cases.items():
        fleet, config = _trained(kind, targets, **cfg)
        fleets[case] = fleet
        config.save_pretrained(tmp_path / case / "base")
        fleet.snapshot("a", layout="sglang").write(tmp_path / case / "adapter")
        adapters.append({"base": str(tmp_path / case / "base"), "adapter": str(tmp_path / case / "adapter"),
                         "out": str(tmp_path / case / "sglang.safetensors")})
    d, fleet = base
    with FakeSGLang(d) as fake:  # the bodies the sink really sends
        eng = _engine(fake, d)
        eng.push(fleet.snapshot("a", layout="sglang"))
        eng.generate("a", [[1, 2], [3]], SamplingParams(max_tokens=3, top_k=5, stop=[7, "x"], seed=3,
                                                        stop_on_eos=False), 2)
        eng.generate(None, [[1, 2]], SamplingParams(max_tokens=2, temperature=0.0), 1)
        eng.prompt_logprobs("a", [1, 2, 3])
        bodies = _bodies(fake, "/generate")
        eng.close()
    bodies.append({"input_ids": [1], "sampling_params": {"max_tokens": 1}})  # the contract must refuse this one
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"adapters": adapters, "bodies": bodies}))
    result = _sglang_check(job)
    assert result["bodies"][:-1] == [None] * (len(bodies) - 1)
    assert "unknown field `max_tokens`" in result["bodies"][-1]
    for case, got in zip(cases, result["adapters"]):
        assert "error" not in got and got["problems"] == [], (case, got)
        w = fleets[case].get_adapter_weights("a")
        sg = load_file(str(tmp_path / case / "sglang.safetensors"))
        stem = "base_model.model.model.layers.0."
        (qa, qb), (va, vb) = w.dense["model.layers.0.self_attn.q_proj"], w.dense["model.layers.0.self_attn.v_proj"]
        ka, kb = w.dense.get("model.layers.0.self_attn.k_proj", (torch.zeros_like(va), torch.zeros_like(vb)))
        assert sg[stem + "self_attn.qkv_proj.lora_A.weight"].equal(torch.cat([qa, ka, va]))
        assert sg[stem + "self_attn.qkv_proj.lora_B.weight"].equal(torch.cat([qb, kb, vb]))
        if case == "dense":
            (ga, gb), (ua, ub) = w.dense["model.layers.0.mlp.gate_proj"], w.dense["model.layers.0.mlp.up_proj"]
            assert sg[stem + "mlp.gate_up_proj.lora_A.weight"].equal(torch.cat([ga, ua]))
            assert sg[stem + "mlp.gate_up_proj.lora_B.weight"].equal(torch.cat([gb, ub]))
        if case == "moe":  # SGLang's per-expert load takes rows [0:r] (gate) and [r:2r] (up) of A
            a, b = w.experts["model.layers.0.mlp.experts"]["gate_up"]
            sa = sg[stem + "mlp.experts.gate_up_proj.lora_A.weight"]
            assert sa[:, :4].equal(a) and sa[:, 4:8].equal(a)
            assert sg[stem + "mlp.experts.gate_up_proj.lora_B.weight"].equal(b)
            da, db = w.experts["model.layers.0.mlp.experts"]["down"]
            assert sg[stem + "mlp.experts.down_proj.lora_A.weight"].equal(da)
            assert sg[stem + "mlp.experts.down_proj.lora_B.weight"].equal(db)


def test_the_rl_jobs_rollouts_push_and_sample_through_the_sink(base):
    """jobs/rollout_step.EngineRollouts (what `lorafleet rl` uses) on the SGLang sink: the name a
    push returns is the adapter's own, every step's push moves the engine to the new version."""
    from lorafleet.jobs.rollout_step import EngineRollouts

    class Tok:
        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(map(str, tokens))

    d, fleet = base
    with FakeSGLang(d) as fake:
        eng = make_sglang_engine({"engine": "sglang", "url": fake.url}, base_dir=str(d), max_rank=16)
        ro = EngineRollouts(fleet, eng, {"engine": "sglang", "url": fake.url, "retries": 0, "retry_wait_s": 0.0},
                            Tok(), log=lambda *a: None)
        assert ro.layout == "sglang" and ro.sync(["a"]) == ["a"] and ro.sync(["a"]) == []
        out, version = ro.generate("a", [[1, 2]], SamplingParams(max_tokens=3, seed=0), 2)
        assert version == fleet.adapter_version("a") and out[0][0].text == " ".join(map(str, out[0][0].tokens))
        _step(fleet)
        assert ro.sync(["a"]) == ["a"] and list(fake.loaded) == [f"a@v{fleet.adapter_version('a')}"]
        ro.close()
        assert fake.loaded == {}


@pytest.mark.slow
def test_sglangs_loader_takes_q_only_and_shared_outer_exports(tmp_path):
    """SGLang's loader on what the sink pushes for incomplete q/k/v and gate/up groups (zero
    partners, with_stack_partners) and on the MoE layouts of every expert_sharing mode."""
    if not SGLANG_PYTHON:
        pytest.skip(NO_SGLANG)
    from safetensors.torch import load_file

    cases = {"q_only": ("qwen3", ["q_proj"], {}),
             "kv_only": ("qwen3", ["k_proj", "v_proj"], {}),
             "up_only": ("qwen3", ["q_proj", "v_proj", "up_proj"], {}),
             "shared_outer": ("qwen3_moe", ["q_proj", "v_proj"], {"experts": True, "expert_sharing": "shared_outer"}),
             "shared_a": ("qwen3_moe", ["q_proj", "v_proj"], {"experts": True, "expert_sharing": "shared_a"})}
    adapters, fleets = [], {}
    for case, (kind, targets, cfg) in cases.items():
        fleet, config = _trained(kind, targets, **cfg)
        fleets[case] = fleet
        config.save_pretrained(tmp_path / case / "base")
        base_cfg = json.loads((tmp_path / case / "base" / "config.json").read_text())
        with_stack_partners(fleet.snapshot("a", layout="sglang"), base_cfg).write(tmp_path / case / "adapter")
        adapters.append({"base": str(tmp_path / case / "base"), "adapter": str(tmp_path / case / "adapter"),
                         "out": str(tmp_path / case / "sglang.safetensors")})
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"adapters": adapters}))
    results = dict(zip(cases, _sglang_check(job)["adapters"]))
    stem = "base_model.model.model.layers.0."
    for case, got in results.items():
        assert "error" not in got and got["problems"] == [], (case, got)
        w = fleets[case].get_adapter_weights("a")
        sg = load_file(str(tmp_path / case / "sglang.safetensors"))
        assert not any(".q_proj." in k or ".k_proj." in k or ".v_proj." in k or ".up_proj." in k for k in sg), case
        c = json.loads((tmp_path / case / "base" / "config.json").read_text())
        outs = {"q_proj": c["num_attention_heads"] * c["head_dim"], "k_proj": c["num_key_value_heads"] * c["head_dim"],
                "v_proj": c["num_key_value_heads"] * c["head_dim"]}
        for f, sizes in ((0, [4, 4, 4]), (1, list(outs.values()))):  # SGLang's stacked q, k, v: trained or zero
            stacked = sg[stem + f"self_attn.qkv_proj.lora_{'AB'[f]}.weight"]
            for name, chunk in zip(outs, stacked.split(sizes)):
                m = w.dense.get(f"model.layers.0.self_attn.{name}")
                assert chunk.equal(m[f]) if m else not chunk.any(), (case, name, f)
        if case == "up_only":
            ua, ub = w.dense["model.layers.0.mlp.up_proj"]
            a, b = sg[stem + "mlp.gate_up_proj.lora_A.weight"], sg[stem + "mlp.gate_up_proj.lora_B.weight"]
            assert not a[:4].any() and a[4:].equal(ua) and not b[: ub.shape[0]].any() and b[ub.shape[0]:].equal(ub)
    for case in ("shared_outer", "shared_a"):
        a = results[case]["shapes"][stem + "mlp.experts.gate_up_proj.lora_A.weight"]
        assert a[1] == 2 * 4, case  # SGLang repeats gate_up A once: its buffers take lora_rank * 2 rows
        sg = load_file(str(tmp_path / case / "sglang.safetensors"))
        ga, _ = fleets[case].get_adapter_weights("a").experts["model.layers.0.mlp.experts"]["gate_up"]
        sa = sg[stem + "mlp.experts.gate_up_proj.lora_A.weight"]
        # shared_outer: expert dim 1 (the shared-outer pool requires it); shared_a: one copy per expert
        # (the per-expert pool fills expert e from index e only)
        assert sa.shape[0] == (1 if case == "shared_outer" else 8), case
        assert sa[:, :4].equal(ga.expand(sa.shape[0], -1, -1)) and sa[:, 4:].equal(ga.expand(sa.shape[0], -1, -1))
