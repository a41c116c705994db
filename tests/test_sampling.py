"""Mixed-adapter sampling: greedy mixed == alone, sampler logprobs == trainer logprobs, stops,
seeded reproducibility, finished rows leaving the batch, bad input."""

import pytest

import lorafleet as lf
from lorafleet.data.tokenizer import build_tokenizer
from lorafleet.models.debug import DEBUG_ARCHS, build_debug_model
from peft_ref import randomize

GREEDY = lf.SamplingParams(max_tokens=7, temperature=0, stop_on_eos=False)


def fleet_for(arch, **kw):
    f = lf.Fleet(build_debug_model(arch, seed=0, **kw), max_adapters=3, max_rank=8)
    f.add_adapter("a", lf.AdapterConfig(rank=4, seed=1))
    f.add_adapter("b", lf.AdapterConfig(rank=8, seed=2, target_modules=["q_proj", "v_proj"]
                                        if arch != "deepseek_v3" else "all-linear", expert_sharing="shared_outer"))
    randomize(f, "a", 1, std=0.3)
    randomize(f, "b", 2, std=0.3)
    return f


REQS = [lf.SampleRequest("a", [1, 5, 9, 11], 2), lf.SampleRequest(None, [1, 7], 1),
        lf.SampleRequest("b", [1, 4, 4, 4, 4, 4, 20], 1), lf.SampleRequest("a", [1, 30], 1)]


@pytest.mark.parametrize("arch", DEBUG_ARCHS)
def test_greedy_mixed_equals_alone_and_logprobs_equal_trainer(arch):
    f = fleet_for(arch)
    mixed = f.sample(REQS, GREEDY)
    for r, outs in zip(REQS, mixed):
        alone = f.sample([r], GREEDY)[0]
        assert [s.tokens for s in outs] == [s.tokens for s in alone]
        for s in outs:
            assert len(s.tokens) == 7 and s.stop_reason == "length"
            lp = f.compute_logprobs(r.adapter, r.prompt_tokens + s.tokens)
            assert lp[0] is None and len(lp) == len(r.prompt_tokens) + 7
            # the importance ratio of a fresh policy starts at 1
            assert max(abs(x - y) for x, y in zip(lp[-7:], s.logprobs)) < 1e-5
    assert mixed[0][0].tokens != mixed[2][0].tokens  # different adapters really differ


def test_seeded_sampling_is_reproducible_and_batch_independent():
    f = fleet_for("qwen3_moe")
    p = lf.SamplingParams(max_tokens=6, temperature=1.0, top_k=50, top_p=0.9, seed=123, stop_on_eos=False)
    one = f.sample(REQS, p)
    two = f.sample(REQS, p)
    assert [[s.tokens for s in o] for o in one] == [[s.tokens for s in o] for o in two]
    other = f.sample(REQS, lf.SamplingParams(**{**p.__dict__, "seed": 124}))
    assert [[s.tokens for s in o] for o in one] != [[s.tokens for s in o] for o in other]
    assert one[0][0].tokens != one[0][1].tokens  # samples of one request differ
    # the first request's samples do not depend on what else is in the batch
    alone = f.sample(REQS[:1], p)
    assert [s.tokens for s in alone[0]] == [s.tokens for s in one[0]]


def test_stop_tokens_strings_and_rows_leaving_the_batch():
    tok = build_tokenizer()
    f = fleet_for("qwen3_moe", vocab_size=112)
    f.tokenizer = tok
    free = f.sample(REQS, GREEDY)
    # stop on a token id the first request produces at its 3rd step
    stop_tok = free[0][0].tokens[2]
    out = f.sample(REQS, lf.SamplingParams(max_tokens=7, temperature=0, stop=[stop_tok], stop_on_eos=False))
    first = out[0][0]
    assert first.stop_reason == "stop" and first.tokens == free[0][0].tokens[:3]
    for r_free, r_out in zip(free, out):  # rows that stop early leave; the others are unchanged
        for a, b in zip(r_free, r_out):
            k = len(b.tokens)
            assert b.tokens == a.tokens[:k] and (b.stop_reason == "stop") == (stop_tok in a.tokens)
    # a string stop that spans token boundaries
    text = tok.decode(free[2][0].tokens, skip_special_tokens=True)
    s = text[1:3]
    out = f.sample([REQS[2]], lf.SamplingParams(max_tokens=7, temperature=0, stop=[s], stop_on_eos=False))[0][0]
    assert out.stop_reason == "stop" and s in out.text and s not in tok.decode(out.tokens[:-1], skip_special_tokens=True)


def test_eos_stops_by_default():
    f = fleet_for("llama")
    free = f.sample(REQS[:1], GREEDY)[0][0]
    f.model.config.eos_token_id = free.tokens[1]
    out = f.sample(REQS[:1], lf.SamplingParams(max_tokens=7, temperature=0))[0][0]
    assert out.tokens == free.tokens[:2] and out.stop_reason == "stop"


def test_bad_sampling_input():
    f = fleet_for("qwen3")
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        f.sample([lf.SampleRequest("zz", [1, 2])])
    with pytest.raises(ValueError, match="prompt_tokens is empty"):
        lf.SampleRequest("a", [])
    with pytest.raises(ValueError, match="max_tokens"):
        lf.SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        lf.SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="need a tokenizer"):
        f.sample([lf.SampleRequest("a", [1, 2])], lf.SamplingParams(stop=["\n"]))
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 256\)"):
        f.sample([lf.SampleRequest("a", [1, 999])])
    assert f.sample([]) == []
