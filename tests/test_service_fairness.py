"""Fair scheduling in `lorafleet serve` (issue 14, finding 1): long decodes are cut into pieces.

This part: a resumable decode cut into pieces of any size gives the samples of one
uninterrupted `fleet.sample`, bit for bit, even with other engine work run between pieces."""

from __future__ import annotations

import torch

import lorafleet as lf
from lorafleet.engine import SampleRequest, SamplingParams
from lorafleet.models.debug import build_debug_model


def _fleet():
    fleet = lf.Fleet(build_debug_model("qwen3_moe"), max_adapters=4, max_rank=8)
    fleet.add_adapter("a", lf.AdapterConfig(rank=4, target_modules="all-linear", seed=1))
    with torch.no_grad():  # a non-zero B, so the adapter changes the samples
        for p in fleet.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return fleet


def test_chunked_decode_equals_uninterrupted_sample():
    fleet = _fleet()
    reqs = [SampleRequest("a", [3, 7, 9, 11], 3), SampleRequest(None, [5, 6], 2)]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=1234, stop_on_eos=False)
    ref = fleet.sample(reqs, params)
    for chunk in (1, 5):
        state = fleet.start_sample(reqs, params)
        while not state.done:
            state.advance(chunk)
            # other work between the pieces must not change the samples
            fleet.forward_backward([lf.Example("a", [1, 2, 3], [2, 3, 4])], forward_only=True)
        got = fleet.sample_results(state)
        for r_ref, r_got in zip(ref, got):
            for s_ref, s_got in zip(r_ref, r_got):
                assert s_got.tokens == s_ref.tokens and s_got.logprobs == s_ref.logprobs
                assert s_got.stop_reason == s_ref.stop_reason
    assert len(ref[0][0].tokens) == 12
