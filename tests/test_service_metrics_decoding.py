"""`/metrics` reports the running decodes (`lorafleet_scheduler_decoding`, the scheduler's
`liveness()["decoding"]`): 0 when idle, 1 while a long sample decodes, 0 again once it finished."""

from __future__ import annotations

import re
import time

import httpx
import pytest
import tinker
from tinker import types

from lorafleet.service.core import ServiceConfig
from lorafleet.service.server import ServerThread, build_service, make_app

KEY = "tml-alice-0123456789"
T = 60


@pytest.fixture
def server(tmp_path):
    # small decode pieces: a 4 x 300-token sample spans many scheduler cycles (as in test_service_fairness)
    cfg = ServiceConfig(data_dir=str(tmp_path), max_adapters=2, max_rank=8, long_poll_s=5.0, decode_chunk_tokens=8)
    svc = build_service("debug:qwen3", cfg, log_fn=lambda *a: None)
    app, _ = make_app(svc, keys={KEY: "alice"})
    srv = ServerThread(app)
    url = srv.start()
    yield svc, url
    srv.stop()
    svc.close()


def _decoding(http) -> float:
    text = http.get("/metrics").text
    m = re.search(r"^lorafleet_scheduler_decoding (\S+)$", text, re.M)
    assert m is not None, "no lorafleet_scheduler_decoding on /metrics"
    return float(m.group(1))


def test_decoding_gauge_moves_while_a_long_sample_decodes(server):
    svc, url = server
    with httpx.Client(base_url=url, timeout=10) as http, tinker.ServiceClient(base_url=url, api_key=KEY) as sc:
        assert _decoding(http) == 0.0
        sampler = sc.create_sampling_client(base_model=svc.base_name)
        fut = sampler.sample(types.ModelInput.from_ints([3, 7, 9, 11]), 4,
                             types.SamplingParams(max_tokens=300, temperature=1.0, stop=[]))
        deadline, seen = time.monotonic() + T, []
        while not seen or seen[-1] == 0.0:
            assert time.monotonic() < deadline, "the gauge never showed the running decode"
            seen.append(_decoding(http))
            time.sleep(0.01)
        assert seen[-1] == 1.0  # one request in a running decode
        assert len(fut.result(timeout=T).sequences) == 4
        deadline = time.monotonic() + 10
        while _decoding(http) != 0.0:  # the decode's bookkeeping ends just after its result
            assert time.monotonic() < deadline, "the gauge stayed up after the sample finished"
            time.sleep(0.02)
