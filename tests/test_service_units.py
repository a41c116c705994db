"""Service pieces without a server: keys, checkpoint paths, protobuf decoding, futures."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import tinker  # noqa: F401  (the SDK the service speaks)

from tinker.proto import tinker_public_pb2 as pb  # noqa: E402

from lorafleet.service import protocol  # noqa: E402
from lorafleet.service.auth import Authenticator, AuthError, load_keys  # noqa: E402
from lorafleet.service.futures import Failure, FutureStore, Result  # noqa: E402
from lorafleet.service.store import Checkpoints, Invalid, NotFound, parse_tinker_path  # noqa: E402


def test_keys_from_file_and_env(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# tenants\nalice:tml-alice-key\nbob:tml-bob-key  # comment\n")
    keys = load_keys(f, environ={"LORAFLEET_API_KEYS": "carol:tml-carol-key"})
    assert keys == {"tml-alice-key": "alice", "tml-bob-key": "bob", "tml-carol-key": "carol"}
    j = tmp_path / "keys.json"
    j.write_text('{"dave": ["tml-dave-key1", "tml-dave-key2"]}')
    assert load_keys(j, environ={}) == {"tml-dave-key1": "dave", "tml-dave-key2": "dave"}
    for bad in ("nocolon", "../x:tml-longenough", "a:short", "a:tml-same-key,b:tml-same-key"):
        with pytest.raises(ValueError):
            load_keys(None, environ={"LORAFLEET_API_KEYS": bad})
    auth = Authenticator(keys)
    assert auth.tenant_for("tml-bob-key", "10.0.0.1") == "bob"
    for k in (None, "", "tml-wrong"):
        with pytest.raises(AuthError):
            auth.tenant_for(k, "127.0.0.1")
    open_auth = Authenticator({})
    assert open_auth.tenant_for("anything", "127.0.0.1") == "local"
    with pytest.raises(AuthError):
        open_auth.tenant_for("anything", "192.168.1.5")


def test_checkpoint_paths_stay_inside_the_tenant(tmp_path):
    ck = Checkpoints(tmp_path)
    assert parse_tinker_path("tinker://abc:train:0/weights/step-1") == ("abc:train:0", "weights", "step-1")
    for bad in ("tinker://abc:train:0/weights/..", "tinker://abc:train:0/weights/a/b", "file:///etc/passwd",
                "tinker://../../x:train:0/weights/a", "tinker://abc:train:0/other/a", "tinker://abc/weights/a",
                "tinker://abc:train:0/weights/.hidden", 42):
        with pytest.raises(Invalid):
            parse_tinker_path(bad)
    d = ck.dir_for("alice", "abc:train:0", "weights", "s1")
    d.mkdir(parents=True)
    assert ck.resolve("alice", "tinker://abc:train:0/weights/s1") == ("weights", d)
    with pytest.raises(NotFound):
        ck.resolve("bob", "tinker://abc:train:0/weights/s1")


def _request(**kw):
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn=kw.pop("loss_fn", "cross_entropy"))
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray([1, 2, 3], np.int32).tobytes()
    for name, (arr, dt) in kw.items():
        t = d.loss_fn_inputs[name]
        t.dtype = dt
        t.dense = arr.tobytes()
    return msg.SerializeToString()


def test_forward_backward_decoding():
    body = _request(target_tokens=(np.array([2, 3, 4], np.int64), pb.DTYPE_INT64),
                    weights=(np.array([1, 0, 1], np.float32), pb.DTYPE_FLOAT32))
    req = protocol.decode_forward_backward(body)
    ex = protocol.to_examples(req, "a", vocab=10)
    assert ex[0].input_tokens == [1, 2, 3] and ex[0].target_tokens == [2, 3, 4] and ex[0].weights == [1, 0, 1]
    with pytest.raises(protocol.ProtocolError, match="vocab|\\[0, 4\\)"):
        protocol.to_examples(req, "a", vocab=4)
    with pytest.raises(protocol.ProtocolError, match="target_tokens"):
        protocol.decode_forward_backward(_request(weights=(np.ones(3, np.float32), pb.DTYPE_FLOAT32)))
    with pytest.raises(protocol.ProtocolError, match="2 values for 3"):
        protocol.decode_forward_backward(_request(target_tokens=(np.array([2, 3], np.int64), pb.DTYPE_INT64)))
    with pytest.raises(protocol.ProtocolError, match="protobuf"):
        protocol.decode_forward_backward(b"\xff\xff\xff")
    rl = protocol.decode_forward_backward(_request(loss_fn="ppo", target_tokens=(np.array([2, 3, 4]), pb.DTYPE_INT64)))
    with pytest.raises(protocol.ProtocolError, match="needs"):
        protocol.to_examples(rl, "a", vocab=10)


def test_output_round_trips_through_the_sdk_decoder():
    from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

    out = deserialize_forward_backward_output(
        protocol.encode_forward_backward_output([[-1.0, -2.0], [-3.0]], {"loss:sum": 6.0}))
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-1.0, -2.0], [-3.0]]
    assert out.metrics == {"loss:sum": 6.0}

    class S:
        tokens, logprobs, stop_reason = [5, 6], [-0.5, -0.25], "stop"

    res = deserialize_sample_response(protocol.encode_sample_response([S()], [None, -1.5]))
    assert res.sequences[0].tokens == [5, 6] and res.sequences[0].stop_reason == "stop"
    assert res.prompt_logprobs[0] is None and res.prompt_logprobs[1] == -1.5


def test_futures_long_poll():
    fs = FutureStore()
    rid = fs.create("t", "x")
    assert fs.owner(rid) == "t" and fs.wait_sync(rid, 0.01) is None

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, fs.complete, rid, Result(json={"ok": 1}))
        return await fs.wait(rid, 5.0)

    assert asyncio.run(main()).json == {"ok": 1}
    rid2 = fs.create("t", "x")
    fs.complete(rid2, Failure("bad", "user"))
    assert fs.wait_sync(rid2, 1).error == "bad"
