"""The service honours the tinker SDK's ``LoraConfig.train_unembed`` (default True): LoRA on the
LM head where the server supports it, reported truthfully everywhere (service/unembed.py).

One server on the tiny qwen3 debug base (uvicorn in a thread), driven by the unmodified SDK.
"""

from __future__ import annotations

import types as pytypes

import pytest
import tinker
import torch
from safetensors.torch import load_file
from tinker import types

from lorafleet.service.core import ServiceConfig
from lorafleet.service.server import ServerThread, build_service, make_app
from lorafleet.service.store import Invalid
from lorafleet.service.unembed import head_bank_bytes, head_target

KEY = "tml-alice-0123456789"
T = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServiceConfig(data_dir=str(tmp_path_factory.mktemp("svc")), max_adapters=12, max_rank=8, long_poll_s=5.0)
    svc = build_service("debug:qwen3", cfg, log_fn=lambda *a: None)
    app, _ = make_app(svc, keys={KEY: "alice"})
    srv = ServerThread(app)
    url = srv.start()
    yield svc, tinker.ServiceClient(base_url=url, api_key=KEY)
    srv.stop()
    svc.close()


def datum(tok, text):
    ids = tok.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


def train(tc, data, steps=2):
    for _ in range(steps):
        fb = tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-2)).result(timeout=T)
        fb.result(timeout=T)


def logprobs(tc, data):
    return torch.tensor(tc.forward(data, "cross_entropy").result(timeout=T).loss_fn_outputs[0]["logprobs"].tolist())


def peft_export(svc, tc, name):
    path = tc.save_weights_for_sampler(name).result(timeout=T).path
    _, d = svc.checkpoints.resolve("alice", path)
    return load_file(str(d / "adapter_model.safetensors"))


def head_keys(tensors):
    return sorted(k for k in tensors if ".lm_head." in f".{k}")


def info(svc, tc):
    return svc.get_info("alice", {"model_id": tc.model_id})


def test_sdk_default_trains_the_head_and_reports_it(server):
    svc, sc = server
    # head only: with attn and mlp off, any change of the logits is the head LoRA's
    tc = sc.create_lora_training_client(base_model=svc.base_name, rank=4, seed=3, train_attn=False,
                                        train_mlp=False).result(timeout=T)
    assert info(svc, tc)["train_unembed"] is True
    tok = tc.get_tokenizer()
    data = [datum(tok, "the cat sat on the mat")]
    before = logprobs(tc, data)  # B = 0: the base's
    train(tc, data)
    after = logprobs(tc, data)
    assert (after - before).norm() / before.norm() > 1e-3
    peft = peft_export(svc, tc, "head-only")
    keys = head_keys(peft)
    assert any(k.endswith("lora_A.weight") for k in keys) and any(k.endswith("lora_B.weight") for k in keys), keys
    assert all("lm_head" in k for k in peft), sorted(peft)  # nothing but the head was targeted
    assert peft[next(k for k in keys if k.endswith("lora_B.weight"))].abs().sum() > 0
    # sampling with it: the sampler's prompt logprobs are the training forward's (head LoRA included)
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = data[0].model_input
    sampled = torch.tensor(sampler.compute_logprobs(prompt).result(timeout=T)[1:])
    assert (sampled - after[:-1]).norm() / after[:-1].norm() <= 1e-4  # the prompt is ids[:-1]


def test_train_unembed_false_has_no_head_lora(server):
    svc, sc = server
    tc = sc.create_lora_training_client(base_model=svc.base_name, rank=4, seed=3,
                                        train_unembed=False).result(timeout=T)
    assert info(svc, tc)["train_unembed"] is False
    train(tc, [datum(tc.get_tokenizer(), "a b c d")], steps=1)
    peft = peft_export(svc, tc, "no-head")
    assert peft and head_keys(peft) == []
    saved = tc.save_state("no-head").result(timeout=T).path
    assert svc.weights_info("alice", {"tinker_path": saved})["train_unembed"] is False
    # the same through the SDK's own REST client (POST /api/v1/weights_info)
    wi = sc.create_rest_client().get_weights_info_by_tinker_path(saved).result(timeout=T)
    assert wi.train_unembed is False and wi.lora_rank == 4


def test_save_load_round_trip_keeps_the_head(server):
    svc, sc = server
    tc = sc.create_lora_training_client(base_model=svc.base_name, rank=4, seed=5).result(timeout=T)
    data = [datum(tc.get_tokenizer(), "one two three four five")]
    train(tc, data)
    saved = tc.save_state("with-head").result(timeout=T).path
    wi = svc.weights_info("alice", {"tinker_path": saved})
    assert (wi["train_unembed"], wi["train_attn"], wi["train_mlp"], wi["lora_rank"]) == (True, True, True, 4)
    sampler_path = tc.save_weights_for_sampler("wi").result(timeout=T).path  # its PEFT adapter_config.json
    assert svc.weights_info("alice", {"tinker_path": sampler_path})["train_unembed"] is True
    with pytest.raises(Invalid, match="tinker_path"):
        svc.weights_info("alice", {})
    resumed = sc.create_training_client_from_state_with_optimizer(saved).result(timeout=T)
    assert info(svc, resumed)["train_unembed"] is True
    a, b = peft_export(svc, tc, "orig"), peft_export(svc, resumed, "resumed")
    assert head_keys(a) and sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # load_state into a live model (same lora_config and seed): the head comes back too
    again = sc.create_lora_training_client(base_model=svc.base_name, rank=4, seed=5).result(timeout=T)
    again.load_state(saved).result(timeout=T)
    assert info(svc, again)["train_unembed"] is True
    assert torch.equal(logprobs(again, data), logprobs(tc, data))
    # a model without the head refuses the checkpoint (its adapter config differs) and stays as it was
    plain = sc.create_lora_training_client(base_model=svc.base_name, rank=4, train_unembed=False).result(timeout=T)
    with pytest.raises(tinker.RequestFailedError, match="does not match"):
        plain.load_state(saved).result(timeout=T)
    assert info(svc, plain)["train_unembed"] is False


def test_where_the_head_is_not_adapted_the_server_says_so(server, monkeypatch):
    svc, sc = server
    name, why = head_target(svc.fleet.model, svc.fleet, None)
    assert (name, why) == ("lm_head", "")
    assert "sglang" in head_target(svc.fleet.model, svc.fleet, "sglang")[1]
    distributed = pytypes.SimpleNamespace(comm=object(), vocab_names=svc.fleet.vocab_names)
    assert "distributed" in head_target(svc.fleet.model, distributed, None)[1]
    head_ckpt = sc.create_lora_training_client(base_model=svc.base_name, rank=2).result(timeout=T) \
        .save_state("head").result(timeout=T).path
    monkeypatch.setattr(svc, "unembed_target", None)
    monkeypatch.setattr(svc, "unembed_missing", "the sglang rollout engine cannot load LoRA on the LM head")
    tc = sc.create_lora_training_client(base_model=svc.base_name, rank=4).result(timeout=T)  # SDK default True
    assert info(svc, tc)["train_unembed"] is False
    assert head_keys(peft_export(svc, tc, "unsupported")) == []
    with pytest.raises(tinker.BadRequestError, match="sglang rollout engine"):  # head only: nothing to train
        sc.create_lora_training_client(base_model=svc.base_name, rank=4, train_attn=False,
                                       train_mlp=False).result(timeout=T)
    with pytest.raises(tinker.BadRequestError, match="has LoRA on the LM head"):  # refused, not half-served
        sc.create_training_client_from_state(head_ckpt).result(timeout=T)


def test_budget_counts_the_head_bank(server):
    svc, _ = server
    w = svc.fleet.model.get_output_embeddings().weight
    expected = 12 * 8 * (w.shape[0] + w.shape[1]) * (2 * w.element_size() + 8)
    assert head_bank_bytes(svc.fleet.model, 12, 8) == expected
    assert svc.budget.banks == expected
    assert svc.budget.work == svc.budget.limit - svc.budget.baseline - svc.budget.reserve - expected
