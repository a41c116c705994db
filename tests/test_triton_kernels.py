"""Triton kernels vs the plain-torch references: forward and every gradient, odd shapes, mixed
ranks, empty segments, an adapter with zero tokens, shared factors, every kernel-filled buffer
poisoned with NaN. Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set here before the kernel module is first imported, re-imported if something imported it
earlier); with one they run compiled on it."""

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from lorafleet.kernels import dispatch  # noqa: E402
from lorafleet.kernels.dispatch import Segment  # noqa: E402
from lorafleet.kernels.segment_lora import triton_kernels as K  # noqa: E402
from peft_ref import rel  # noqa: E402

if DEVICE == "cpu" and not isinstance(K._segment_mm_kernel, InterpretedFunction):
    importlib.reload(K)  # imported before TRITON_INTERPRET was set: decorate the kernels again

FP32, BF16 = 1e-5, 1e-2


@pytest.fixture(autouse=True)
def triton_nan_poisoned(monkeypatch):
    """Force the Triton backend; every buffer a kernel fills starts as NaN."""
    monkeypatch.setenv("LORAFLEET_KERNELS", "triton")
    monkeypatch.setattr(K, "empty", lambda shape, like: torch.full(
        tuple(shape), float("nan"), dtype=like.dtype, device=like.device))


def _run(fn, inputs, gy):
    """Output and the gradients of every input that requires one."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    y = fn(*leaves)
    y.backward(gy)
    return y.detach(), [t.grad for t in leaves if t.requires_grad]


def _compare(fn_tri, fn_ref, inputs, gy, tol):
    y, grads = _run(fn_tri, inputs, gy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFLEET_KERNELS", "reference")
        y_ref, grads_ref = _run(fn_ref, [t.float() for t in inputs], gy.float())
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    errs = [rel(y, y_ref)] + [rel(g, r) for g, r in zip(grads, grads_ref)]
    assert max(errs) <= tol, errs
    return y, grads


def _segs(rows):
    return [Segment(*r) for r in rows]


# (N, IN, OUT, G, R, segments as (start, end, a_index, b_index, rank, scale))
CASES = {
    # base rows before, between and after segments; segment 2 empty; factor 4 never used
    "dense_odd": (37, 19, 23, 5, 7, [(3, 8, 0, 0, 7, 2.0), (8, 17, 1, 1, 1, 0.5), (17, 17, 2, 2, 3, 1.0),
                                     (20, 30, 3, 3, 4, 1.5)]),
    # expert LoRA: (slot, expert) groups; shared A (index 0) and shared B (index 5)
    "experts_shared": (29, 17, 13, 8, 5, [(0, 4, 0, 1, 5, 1.0), (4, 9, 0, 3, 5, 1.0), (9, 9, 0, 2, 5, 1.0),
                                          (9, 20, 4, 5, 3, 2.0), (20, 29, 6, 5, 3, 2.0)]),
    # longer than a row tile, inner and outer dims past one block, max rank 16
    "multi_block": (83, 70, 67, 3, 16, [(0, 70, 2, 2, 13, 0.25), (70, 83, 0, 0, 16, 1.0)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_segment_lora_matches_reference(case):
    N, IN, OUT, G, R, rows = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN + 3, generator=g)[:, 1 : IN + 1].requires_grad_()  # strided rows
    A = torch.randn(G, R, IN, generator=g).requires_grad_()
    B = torch.randn(G, OUT, R, generator=g).requires_grad_()
    gy = torch.randn(N, OUT, generator=g)
    dev = [t.to(DEVICE) for t in (x, A, B, gy)]
    segs = _segs(rows)
    fn = lambda x, A, B: dispatch.segment_lora(x, A, B, segs)  # noqa: E731
    y, (gx, gA, gB) = _compare(fn, fn, dev[:3], dev[3], FP32)
    used = {s.a_index for s in segs if s.end > s.start} | {s.b_index for s in segs if s.end > s.start}
    for i in set(range(G)) - used:  # a factor no token uses: zero gradient, not garbage
        assert gA[i].abs().sum() == 0 and gB[i].abs().sum() == 0
    for s in segs:  # rank padding never gets gradient
        assert gA[s.a_index, s.rank :].abs().sum() == 0 and gB[s.b_index, :, s.rank :].abs().sum() == 0
    covered = torch.zeros(N, dtype=torch.bool)
    for s in segs:
        covered[s.start : s.end] = True
    assert y[~covered.to(DEVICE)].abs().sum() == 0 and gx[~covered.to(DEVICE)].abs().sum() == 0


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_mm_matches_reference(transposed):
    G, IN, OUT = 5, 70, 21
    offsets = [0, 3, 3, 40, 45, 45]  # empty groups 1 and 4; rows 45.. in no group
    g = torch.Generator().manual_seed(1)
    x = torch.randn(47, IN, generator=g)
    W = torch.randn(*((G, IN, OUT) if transposed else (G, OUT, IN)), generator=g)
    gy = torch.randn(47, OUT, generator=g)
    dev = [t.to(DEVICE).requires_grad_(i < 2) for i, t in enumerate((x, W, gy))]
    fn = lambda x, W: dispatch.grouped_mm(x, W, offsets, transposed)  # noqa: E731
    y, (gx, gW) = _compare(fn, fn, dev[:2], dev[2], FP32)
    assert y[45:].abs().sum() == 0 and gx[45:].abs().sum() == 0
    assert gW[1].abs().sum() == 0 and gW[4].abs().sum() == 0


def test_bf16_inputs_accumulate_in_fp32():
    N, IN, OUT, G, R, rows = CASES["experts_shared"]
    g = torch.Generator().manual_seed(2)
    x, A, B, gy = (torch.randn(*s, generator=g).to(DEVICE, torch.bfloat16)
                   for s in ((N, IN), (G, R, IN), (G, OUT, R), (N, OUT)))
    for t in (x, A, B):
        t.requires_grad_()
    segs = _segs(rows)
    fn = lambda x, A, B: dispatch.segment_lora(x, A, B, segs)  # noqa: E731
    y, _ = _compare(fn, fn, [x, A, B], gy, BF16)
    assert y.dtype == torch.bfloat16
    W = torch.randn(3, 24, IN, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    fn = lambda x, W: dispatch.grouped_mm(x, W, [0, 10, 10, N])  # noqa: E731
    _compare(fn, fn, [x.detach().requires_grad_(), W], torch.randn(N, 24).to(DEVICE, torch.bfloat16), BF16)


LINEAR_CASES = {
    # base rows before, between and after segments (gap tiles carry the base alone), empty segment
    "dense_odd_bias": (83, 70, 67, 4, 7, True, [(3, 8, 0, 0, 7, 2.0), (8, 70, 1, 1, 1, 0.5),
                                               (70, 70, 2, 2, 3, 1.0), (72, 80, 3, 3, 4, 1.5)]),
    "no_bias_one_adapter": (21, 19, 9, 2, 5, False, [(0, 21, 1, 1, 5, 0.25)]),
    "no_segments": (13, 11, 7, 2, 3, True, []),
}


@pytest.mark.parametrize("mode", ["epilogue", "gemm"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_fused_lora_linear_matches_reference(case, mode):
    """Base GEMM + scale·S·Bᵀ and dX = dy·W + dS·A, fused two ways: the LoRA added in place into
    cuBLAS's output ("epilogue") or one Triton pass computing both (LoRAFusion's "gemm")."""
    N, IN, OUT, G, R, has_bias, rows = LINEAR_CASES[case]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, IN + 2, generator=g)[:, 1 : IN + 1].requires_grad_()  # strided rows
    W = torch.randn(OUT, IN, generator=g)
    bias = torch.randn(OUT, generator=g) if has_bias else None
    A = torch.randn(G, R, IN, generator=g).requires_grad_()
    B = torch.randn(G, OUT, R, generator=g).requires_grad_()
    gy = torch.randn(N, OUT, generator=g)
    dev = [t.to(DEVICE) for t in (x, A, B, gy)]
    W, bias = W.to(DEVICE), None if bias is None else bias.to(DEVICE)
    segs = _segs(rows)
    fn = lambda x, A, B: dispatch.lora_linear(x, W, bias, A, B, segs, mode)  # noqa: E731
    if segs:
        y, (gx, gA, gB) = _compare(fn, fn, dev[:3], dev[3], FP32)
        for s in segs:  # rank padding never gets gradient
            assert gA[s.a_index, s.rank :].abs().sum() == 0 and gB[s.b_index, :, s.rank :].abs().sum() == 0
    else:
        y, (gx,) = _compare(lambda x: fn(x, dev[1], dev[2]), lambda x: fn(x, dev[1], dev[2]), dev[:1], dev[3], FP32)
    base = x.to(DEVICE).detach() @ W.T + (0 if bias is None else bias)
    covered = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    for s in segs:
        covered[s.start : s.end] = True
    assert rel(y[~covered], base[~covered]) <= FP32  # rows of no adapter: the base output exactly


@pytest.mark.parametrize("mode", ["epilogue", "gemm"])
def test_fused_lora_linear_bf16_and_errors(mode):
    N, IN, OUT, G, R, _, rows = LINEAR_CASES["dense_odd_bias"]
    g = torch.Generator().manual_seed(4)
    x, W, bias, A, B, gy = (torch.randn(*s, generator=g).to(DEVICE, torch.bfloat16)
                            for s in ((N, IN), (OUT, IN), (OUT,), (G, R, IN), (G, OUT, R), (N, OUT)))
    segs = _segs(rows)
    fn = lambda x, A, B: dispatch.lora_linear(x, W, bias, A, B, segs, mode)  # noqa: E731
    fn_ref = lambda x, A, B: dispatch.lora_linear(x, W.float(), bias.float(), A, B, segs)  # noqa: E731
    y, _ = _compare(fn, fn_ref, [x.requires_grad_(), A.requires_grad_(), B.requires_grad_()], gy, BF16)
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no gradient for the base weight"):
        dispatch.lora_linear(x, W.detach().requires_grad_(), bias, A, B, segs)
    with pytest.raises(ValueError, match="one dtype"):
        dispatch.lora_linear(x, W.float(), bias, A, B, segs)
    with pytest.raises(ValueError, match="bad shapes"):
        dispatch.lora_linear(x, W[:, :-1], bias, A, B, segs)
    with pytest.raises(ValueError, match="mode"):
        dispatch.lora_linear(x, W, bias, A, B, segs, "fast")


def test_layer_fuses_base_as_asked(monkeypatch):
    """MultiLoRALinear runs the fused op unless LORAFLEET_FUSE_BASE=off, and every mode matches
    the unfused layer."""
    from lorafleet.kernels.lora_linear import triton_op as fused_op
    from lorafleet.lora.routing import Routing, use_routing
    from lora_layers import random_multilora_linear

    layer = random_multilora_linear(24, 20, {0: (4, 2.0), 2: (2, 0.5)}, 3, 4, "model.layers.0.mlp.up_proj", DEVICE)
    calls = []
    real = fused_op.lora_linear_fwd
    monkeypatch.setattr(fused_op, "lora_linear_fwd", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 9, 24, device=DEVICE)
    gy = torch.randn(4, 9, 20, device=DEVICE)

    def run(fuse):
        monkeypatch.setenv("LORAFLEET_FUSE_BASE", fuse)
        leaves = [x.clone().requires_grad_(), layer.lora_A, layer.lora_B]
        for t in leaves[1:]:
            t.grad = None
        with use_routing(Routing.from_row_slots([0, 0, -1, 2], DEVICE)):
            y = layer(leaves[0])
        y.backward(gy)
        return [y.detach()] + [t.grad.clone() for t in leaves]

    unfused = run("off")
    assert not calls
    for mode in ("", "epilogue", "gemm", "1"):
        calls.clear()
        fused = run(mode)
        assert calls
        assert max(rel(a, b) for a, b in zip(fused, unfused)) <= FP32
    monkeypatch.setenv("LORAFLEET_FUSE_BASE", "maybe")
    with pytest.raises(ValueError, match="LORAFLEET_FUSE_BASE"):
        dispatch.fuse_base()


def test_dispatch_backend_choice(monkeypatch):
    t = torch.zeros(2, device=DEVICE)
    assert dispatch.backend(t) == "triton"
    assert dispatch.backend(t.double()) == "reference"  # dtype the kernels do not take
    monkeypatch.setenv("LORAFLEET_KERNELS", "reference")
    assert dispatch.backend(t) == "reference"
    monkeypatch.setenv("LORAFLEET_KERNELS", "auto")
    assert dispatch.backend(torch.zeros(2)) == "reference"  # CPU tensors: reference unless forced
    monkeypatch.setenv("LORAFLEET_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LORAFLEET_KERNELS"):
        dispatch.backend(t)
    monkeypatch.setenv("LORAFLEET_KERNELS", "triton")
    with pytest.raises(ValueError, match="out of range"):
        dispatch.segment_lora(torch.zeros(4, 3), torch.zeros(2, 2, 3), torch.zeros(2, 5, 2),
                              [Segment(0, 4, 2, 0, 2, 1.0)])
    with pytest.raises(ValueError, match="overlapping"):
        dispatch.segment_lora(torch.zeros(4, 3), torch.zeros(2, 2, 3), torch.zeros(2, 5, 2),
                              [Segment(0, 3, 0, 0, 2, 1.0), Segment(2, 4, 1, 1, 2, 1.0)])
    with pytest.raises(ValueError, match="offsets"):
        dispatch.grouped_mm(torch.zeros(4, 3), torch.zeros(2, 5, 3), [0, 3, 2])


@pytest.mark.parametrize("arch,fuse", [("qwen3", "off"), ("qwen3", "gemm"), ("qwen3_moe", "epilogue"),
                                       pytest.param("gpt_oss", "epilogue", marks=pytest.mark.slow)])
def test_fleet_triton_backend_matches_reference(arch, fuse, monkeypatch):
    """A whole model through Fleet: logits and every LoRA gradient, Triton vs reference backend
    (dense and expert LoRA; per-expert, shared-A and shared-outer adapters; base-model rows;
    ``fuse``: how the dense layers join their base GEMM and the LoRA)."""
    import lorafleet as lf
    from lorafleet.kernels.lora_linear import triton_op as fused_op

    calls = []
    real = fused_op.lora_linear_fwd
    monkeypatch.setattr(fused_op, "lora_linear_fwd", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("LORAFLEET_FUSE_BASE", fuse)
    from lorafleet.models.debug import build_debug_model

    torch.manual_seed(0)
    model = build_debug_model(arch, seed=0).to(DEVICE)
    fleet = lf.Fleet(model, max_adapters=4, max_rank=8)
    plan = {"a": dict(rank=4, experts=True), "b": dict(rank=8, experts=True, expert_sharing="shared_a"),
            "c": dict(rank=3, experts=True, expert_sharing="shared_outer"), "idle": dict(rank=5)}
    for i, (name, kw) in enumerate(plan.items()):
        targets = [n for n in ("q_proj", "o_proj", "down_proj") if n in fleet.linear_names]  # interpreter is slow
        fleet.add_adapter(name, lf.AdapterConfig(alpha=8, target_modules=targets, seed=i, **kw))
        w = fleet.get_adapter_weights(name)
        g = torch.Generator().manual_seed(10 + i)
        for _, t in w.tensors():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
        fleet.set_adapter_weights(name, w)
    rows = ["a", None, "b", "c"]
    ids = torch.randint(0, model.config.vocab_size, (len(rows), 5), generator=torch.Generator().manual_seed(5))
    proj = torch.randn(len(rows), 5, model.config.vocab_size, generator=torch.Generator().manual_seed(6))

    def run(backend):
        monkeypatch.setenv("LORAFLEET_KERNELS", backend)
        for p in fleet.lora_parameters():
            p.grad = None
        logits = fleet.forward(ids.to(DEVICE), adapters=rows).logits
        (logits * proj.to(DEVICE)).sum().backward()
        return logits.detach(), [p.grad.clone() for p in fleet.lora_parameters() if p.grad is not None]

    logits_tri, grads_tri = run("triton")
    assert bool(calls) == (fuse != "off")
    logits_ref, grads_ref = run("reference")
    assert len(grads_tri) == len(grads_ref) > 0
    assert rel(logits_tri, logits_ref) <= FP32
    assert max(rel(a, b) for a, b in zip(grads_tri, grads_ref)) <= FP32


def test_autotune_candidates_fit_the_problem(monkeypatch):
    """Candidates are clamped to the problem (a rank-16 shrink never times 128-wide columns) and
    de-duplicated; the interpreter and LORAFLEET_AUTOTUNE=0 use the fixed heuristic blocks."""
    from lorafleet.kernels.segment_lora import tuning

    seg = tuning._configs(tuning.SEGMENT_MM_CANDIDATES, ("BN", "BK"))
    shrink = tuning.prune_segment_mm(seg, {"NOUT": 16, "K": 4096, "KB": 0})
    assert {c.kwargs["BN"] for c in shrink} == {16} and max(c.kwargs["BK"] for c in shrink) == 128
    assert len(shrink) == len({(c.kwargs["BK"], c.num_warps, c.num_stages) for c in shrink}) < len(seg)
    fused = tuning.prune_segment_mm(seg, {"NOUT": 4096, "K": 16, "KB": 4096})
    assert len(fused) == len(seg) and max(c.kwargs["BN"] for c in fused) == 256
    outer = tuning.prune_group_outer(tuning._configs(tuning.GROUP_OUTER_CANDIDATES, ("BI", "BJ", "BM")),
                                     {"I": 7, "J": 70})
    assert {c.kwargs["BI"] for c in outer} == {16} and max(c.kwargs["BJ"] for c in outer) == 128
    assert not tuning.enabled(interpret=True)
    monkeypatch.setenv("LORAFLEET_AUTOTUNE", "0")
    assert not tuning.enabled(interpret=False)
    monkeypatch.setenv("LORAFLEET_AUTOTUNE", "1")
    assert tuning.enabled(interpret=False)
    monkeypatch.setenv("LORAFLEET_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="LORAFLEET_AUTOTUNE"):
        tuning.enabled(interpret=False)
