"""Tinker wire format <-> lorafleet types.

The official SDK sends ``forward_backward`` as protobuf (``tinker.proto.tinker_public_pb2``) and
expects ``ForwardBackwardOutput`` and ``SampleResponse`` back as protobuf; everything else is
JSON. This module is the only place that knows those encodings. Every decoding error is a
`ProtocolError` (answered as HTTP 400 with a JSON body).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from ..types import Example

PROTO_CONTENT_TYPE = "application/x-protobuf"

# loss_fn_inputs each engine loss reads (besides target_tokens)
LOSS_INPUTS = {
    "cross_entropy": ("weights",),
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
    "cispo": ("logprobs", "advantages"),
    "dpo": ("weights",),
}
KNOWN_INPUTS = {"target_tokens", "weights", "logprobs", "advantages", "mask"}


class ProtocolError(ValueError):
    """A request the server cannot decode; the message says what is wrong. ``model_id`` /
    ``seq_id`` are set when the envelope was readable (so the model's queue can skip it)."""

    model_id: str | None = None
    seq_id: int | None = None


@dataclass
class FwdBwdRequest:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict
    forward_only: bool
    data: list[dict] = field(default_factory=list)  # per datum: tokens + per-token arrays


_NP = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


def _tensor(msg, where: str) -> np.ndarray:
    dt = _NP.get(msg.dtype)
    if dt is None:
        if msg.dtype == pb.DTYPE_BFLOAT16:
            dt = np.uint16
        else:
            raise ProtocolError(f"{where}: unsupported tensor dtype {msg.dtype}")
    if msg.HasField("sparse_csr"):
        raise ProtocolError(f"{where}: sparse tensors are not supported by this server")
    raw = msg.dense
    if len(raw) % np.dtype(dt).itemsize:
        raise ProtocolError(f"{where}: {len(raw)} bytes is not a whole number of {np.dtype(dt).name} values")
    arr = np.frombuffer(raw, dtype=dt)
    if dt is np.uint16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    shape = list(msg.shape)
    if shape and int(np.prod(shape)) != arr.size:
        raise ProtocolError(f"{where}: shape {shape} does not match {arr.size} values")
    if shape and len(shape) != 1:
        raise ProtocolError(f"{where}: expected a 1-D tensor (one value per position), got shape {shape}")
    return arr


def decode_forward_backward(body: bytes) -> FwdBwdRequest:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise ProtocolError(f"body is not a valid protobuf ForwardBackwardRequest ({type(e).__name__}: {e})") from None
    if not msg.model_id:
        raise ProtocolError("ForwardBackwardRequest.model_id is empty")
    try:
        return _decode_body(msg)
    except ProtocolError as e:
        e.model_id, e.seq_id = msg.model_id, int(msg.seq_id)
        raise


def _decode_body(msg) -> FwdBwdRequest:
    cfg: dict = {}
    for k, v in msg.loss_fn_config.items():
        cfg[k] = float(v)
    for k, v in msg.loss_fn_config_v2.items():
        if v.WhichOneof("value") == "text":
            raise ProtocolError(f"loss_fn_config[{k!r}]: string options are not supported")
        cfg[k] = float(v.number)
    req = FwdBwdRequest(msg.model_id, int(msg.seq_id), msg.loss_fn or "cross_entropy", cfg, bool(msg.forward_only))
    if not msg.data:
        raise ProtocolError("ForwardBackwardRequest has no data")
    for i, d in enumerate(msg.data):
        toks: list[int] = []
        for j, ch in enumerate(d.model_input):
            kind = ch.WhichOneof("chunk")
            if kind not in (None, "encoded_text"):
                raise ProtocolError(f"datum {i} chunk {j}: {kind} chunks are not supported (text tokens only)")
            raw = ch.encoded_text.tokens
            if len(raw) % 4:
                raise ProtocolError(f"datum {i} chunk {j}: token bytes are not int32")
            toks.extend(int(t) for t in np.frombuffer(raw, dtype=np.int32))
        if not toks:
            raise ProtocolError(f"datum {i}: model_input has no tokens")
        arrays = {}
        for name, t in d.loss_fn_inputs.items():
            if name not in KNOWN_INPUTS:
                raise ProtocolError(f"datum {i}: unknown loss_fn_input {name!r}; known: {sorted(KNOWN_INPUTS)}")
            arr = _tensor(t, f"datum {i} loss_fn_inputs[{name!r}]")
            if arr.size != len(toks):
                raise ProtocolError(f"datum {i}: loss_fn_inputs[{name!r}] has {arr.size} values for "
                                    f"{len(toks)} input tokens")
            arrays[name] = arr
        if "target_tokens" not in arrays:
            raise ProtocolError(f"datum {i}: loss_fn_inputs lacks 'target_tokens'")
        req.data.append({"tokens": toks, **arrays})
    return req


def to_examples(req: FwdBwdRequest, adapter: str, vocab: int) -> list[Example]:
    """The request's datums as engine Examples for ``adapter`` (ProtocolError if malformed)."""
    needs = LOSS_INPUTS.get(req.loss_fn)
    if needs is None:
        raise ProtocolError(f"unknown loss_fn {req.loss_fn!r}; available: {sorted(LOSS_INPUTS)}")
    out = []
    for i, d in enumerate(req.data):
        targets = [int(t) for t in d["target_tokens"]]
        for name, toks in (("model_input", d["tokens"]), ("target_tokens", targets)):
            if min(toks) < 0 or max(toks) >= vocab:
                raise ProtocolError(f"datum {i}: {name} token ids must be in [0, {vocab})")
        arrays = {}
        for name in ("weights", "logprobs", "advantages"):
            if name in d:
                vals = [float(x) for x in d[name]]
                if not all(math.isfinite(x) for x in vals):
                    raise ProtocolError(f"datum {i}: loss_fn_inputs[{name!r}] has non-finite values")
                arrays[name] = vals
        if "mask" in d and "weights" not in arrays:
            arrays["weights"] = [float(x) for x in d["mask"]]
        for name in needs:
            if name not in arrays and name != "weights":
                raise ProtocolError(f"datum {i}: loss_fn {req.loss_fn!r} needs loss_fn_inputs[{name!r}]")
        out.append(Example(adapter, d["tokens"], targets, **arrays))
    return out


def encode_forward_backward_output(logprobs: list[list[float]], metrics: dict[str, float]) -> bytes:
    """``ForwardBackwardOutput`` with one ArrayRecord holding every datum's ``logprobs``."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for k, v in metrics.items():
        out.metrics[k] = float(v)
    rec = out.loss_fn_outputs.add()
    rec.type_tag = "ArrayRecord"
    rec.num_datums = len(logprobs)
    bt = rec.fields["logprobs"]
    bt.dtype = pb.DTYPE_FLOAT32
    flat = np.concatenate([np.asarray(lp, dtype=np.float32) for lp in logprobs]) if logprobs else np.zeros(0, np.float32)
    bt.data = flat.tobytes()
    offs = np.cumsum([0] + [len(lp) * 4 for lp in logprobs]).astype(np.int64)
    bt.offsets = offs.tobytes()
    return out.SerializeToString()


def encode_sample_response(sequences, prompt_logprobs: list[float | None] | None) -> bytes:
    """``SampleResponse``; ``sequences``: engine SampledSequence list."""
    out = pb.SampleResponse()
    for s in sequences:
        seq = out.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if s.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        seq.tokens = np.asarray(s.tokens, dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(s.logprobs, dtype=np.float32).tobytes()
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray([math.nan if x is None else x for x in prompt_logprobs],
                                         dtype=np.float32).tobytes()
    return out.SerializeToString()
