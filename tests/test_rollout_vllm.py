"""The vLLM sinks against the real vLLM CPU engine (one server per session: rollout_helpers).

A dense adapter trained by lorafleet, exported as peft and as vllm and pushed as a snapshot, is
loaded by vLLM: greedy tokens identical to `Fleet.sample`, prompt logprobs equal to
`Fleet.compute_logprobs` (fp32, rel <= 1e-5). An in-place push after optimizer steps changes
vLLM's output to the new adapter's. Errors name the engine's answer.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rollout_helpers import load_base_model

import lorafleet as lf
from lorafleet.rollout import RolloutError, make_engine

pytestmark = pytest.mark.vllm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[1, 10, 11], [1, 12], [1, 30, 31, 32]]
GREEDY = lf.SamplingParams(max_tokens=6, temperature=0)


def _rel(a, b) -> float:
    a, b = torch.tensor(a[1:], dtype=torch.float64), torch.tensor(b[1:], dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def _train(fleet, name, target, steps):
    """``steps`` optimizer steps teaching ``name`` to answer every prompt with ``target``."""
    for _ in range(steps):
        fleet.forward_backward([lf.Example(name, p + target[:-1], p[1:] + target) for p in PROMPTS],
                               loss_fn="cross_entropy")
        fleet.optim_step([name])


@pytest.fixture(scope="module")
def fleet(vllm_server):
    fleet = lf.Fleet(load_base_model(vllm_server.base_dir), max_adapters=4, max_rank=32)
    fleet.add_adapter("a", lf.AdapterConfig(rank=8, alpha=16, target_modules=TARGETS, seed=0))
    fleet.set_optimizer("a", lf.OptimConfig(lr=5e-2))
    _train(fleet, "a", [40, 41, 42, 43, 2], 8)
    return fleet


@pytest.fixture
def engine(vllm_server, tmp_path):
    eng = make_engine({"engine": "vllm", "url": vllm_server.url, "max_lora_rank": vllm_server.max_lora_rank,
                       "adapter_dir": str(tmp_path / "adapters")}, base_dir=str(vllm_server.base_dir), max_rank=32)
    yield eng
    eng.close()


def _greedy(fleet, name):
    return [g[0].tokens for g in fleet.sample([lf.SampleRequest(name, p, 1) for p in PROMPTS], GREEDY)]


def test_exports_and_snapshots_give_lorafleets_greedy_tokens_and_prompt_logprobs(fleet, engine, tmp_path):
    ours = _greedy(fleet, "a")
    base = [g[0].tokens for g in engine.generate(None, PROMPTS, GREEDY, 1)]
    assert ours != base, "the adapter must change the output, or the comparison proves nothing"
    names = []
    for fmt in ("peft", "vllm"):  # the exported directories, loaded by vLLM as they are
        fleet.save_adapter("a", tmp_path / fmt, format=fmt)
        engine.http.post("/v1/load_lora_adapter", {"lora_name": f"a-{fmt}", "lora_path": str(tmp_path / fmt)})
        names.append(f"a-{fmt}")
    names.append(engine.push(dataclasses.replace(fleet.snapshot("a", layout="peft"), name="a-snap")))
    worst = 0.0
    try:
        for name in names:
            assert [g[0].tokens for g in engine.generate(name, PROMPTS, GREEDY, 2)] == ours, name
            for p, completion in zip(PROMPTS, ours, strict=True):
                tokens = p + completion
                worst = max(worst, _rel(engine.prompt_logprobs(name, tokens), fleet.compute_logprobs("a", tokens)))
    finally:  # the shared server's slots stay free for other tests
        for name in names[:2]:
            engine.unload(name)
    print(f"vLLM vs lorafleet prompt logprobs, fp32: worst rel error {worst:.2e}")
    assert worst <= 1e-5


def test_in_place_push_after_an_optimizer_step_serves_the_new_adapter(vllm_server, tmp_path):
    fleet = lf.Fleet(load_base_model(vllm_server.base_dir), max_adapters=2, max_rank=16)
    fleet.add_adapter("b", lf.AdapterConfig(rank=4, alpha=8, target_modules=TARGETS, seed=1))
    fleet.set_optimizer("b", lf.OptimConfig(lr=5e-2))
    _train(fleet, "b", [50, 51, 52, 2], 6)
    eng = make_engine({"engine": "vllm", "url": vllm_server.url, "adapter_dir": str(tmp_path)},
                      base_dir="", max_rank=16)
    try:
        assert eng.push(fleet.snapshot("b")) == "b"
        first = [g[0].tokens for g in eng.generate("b", PROMPTS, GREEDY, 1)]
        assert first == _greedy(fleet, "b")
        _train(fleet, "b", [60, 61, 62, 2], 6)
        now = _greedy(fleet, "b")
        assert now != first
        eng.push(fleet.snapshot("b"))  # same name, load_inplace, a new directory
        assert [g[0].tokens for g in eng.generate("b", PROMPTS, GREEDY, 1)] == now
        assert list((tmp_path / "b").iterdir()) == [eng.paths["b"]]  # the older version's directory is gone
        assert eng.paths["b"].name.startswith(f"v{fleet.adapter_version('b')}-")
        # sampled at temperature 1: vLLM's per-token logprobs are the policy's own (the behaviour policy)
        seqs = eng.generate("b", PROMPTS[:1], lf.SamplingParams(max_tokens=5, temperature=1.0, seed=7), 3)[0]
        for s in seqs:
            assert len(s.logprobs) == len(s.tokens) and s.stop_reason in ("stop", "length")
            ours = fleet.compute_logprobs("b", PROMPTS[0] + s.tokens)[len(PROMPTS[0]):]
            assert _rel([None] + s.logprobs, [None] + ours) <= 1e-5
    finally:
        eng.close()


def test_a_rank_above_max_lora_rank_is_refused_before_any_push(vllm_server, fleet, engine):
    fleet.add_adapter("big", lf.AdapterConfig(rank=32, target_modules=["q_proj"], seed=2))
    try:
        snap = fleet.snapshot("big")
        with pytest.raises(RolloutError, match=r"rank 32, above the engine's --max-lora-rank 16; not pushed"):
            engine.push(snap)
        assert not any(engine.adapter_dir.iterdir())  # nothing written, nothing sent
        # a server whose limit the sink was not told: vLLM's own refusal, in one line
        blind = make_engine({"engine": "vllm", "url": vllm_server.url}, base_dir="", max_rank=32)
        with pytest.raises(RolloutError, match=r"HTTP 500: .*LoRA rank 32 is greater than max_lora_rank 16") as e:
            blind.push(snap)
        assert "\n" not in str(e.value)
        blind.close()
    finally:
        fleet.remove_adapter("big")


def test_a_wrong_url_is_one_line_naming_it(vllm_server):
    from lorafleet.rollout.vllm_local import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RolloutError, match=rf"vllm at {url}: GET /v1/models: unreachable \(.*refused"):
        make_engine({"engine": "vllm", "url": url}, base_dir="", max_rank=8)
    with pytest.raises(ValueError, match="url must be the engine's http://host:port"):
        make_engine({"engine": "vllm", "url": "127.0.0.1:8000"}, base_dir="", max_rank=8)
    with pytest.raises(ValueError, match="engine vllm has no option 'max_lora'"):
        make_engine({"engine": "vllm", "url": vllm_server.url, "max_lora": 8}, base_dir="", max_rank=8)


def test_an_unknown_adapter_name_is_the_engines_answer(engine):
    with pytest.raises(RolloutError, match=r"HTTP 404: The model `nope` does not exist"):
        engine.generate("nope", PROMPTS[:1], GREEDY, 1)


def test_versioned_names_keep_the_newest_k_and_unload_older_ones(vllm_server, tmp_path):
    """max_versions 2 (for asynchronous rollouts): each push loads name@vN, the newest two stay
    in vLLM, older ones are unloaded with their directories; the plain name samples the newest."""
    fleet = lf.Fleet(load_base_model(vllm_server.base_dir), max_adapters=1, max_rank=8)
    fleet.add_adapter("c", lf.AdapterConfig(rank=4, alpha=8, target_modules=TARGETS, seed=3))
    fleet.set_optimizer("c", lf.OptimConfig(lr=5e-2))
    eng = make_engine({"engine": "vllm", "url": vllm_server.url, "adapter_dir": str(tmp_path), "max_versions": 2,
                       "max_loras": vllm_server.max_loras}, base_dir="", max_rank=8)
    try:
        names = []
        for target in ([50, 51, 2], [60, 61, 2], [70, 71, 2]):
            _train(fleet, "c", target, 4)
            names.append(eng.push(fleet.snapshot("c")))
        assert names == ["c@v4", "c@v8", "c@v12"]
        served = {m["id"] for m in eng.http.get("/v1/models")["data"]}
        assert {"c@v8", "c@v12"} <= served and "c@v4" not in served
        assert sorted(eng.paths) == ["c@v12", "c@v8"] and len(list((tmp_path / "c").iterdir())) == 2
        assert [g[0].tokens for g in eng.generate("c", PROMPTS, GREEDY, 1)] == _greedy(fleet, "c")
        assert eng.versions.in_use("c@v12") == 0  # the request's hold was released
    finally:
        eng.close()
    served = {m["id"] for m in make_engine({"engine": "vllm", "url": vllm_server.url}, base_dir="", max_rank=8
                                           ).http.get("/v1/models")["data"]}
    assert not {"c@v8", "c@v12"} & served  # close unloads what this engine loaded
