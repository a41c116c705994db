"""Triton primitives for segmented LoRA and grouped GEMMs: two kernels, each one launch over all
segments. Every product of ``segment_lora`` (forward and backward) and ``grouped_mm`` is one of them.

A *plan* (built on the host from the segment list) holds, per segment, ``(start, end, a_index,
b_index, rank)`` and ``scale``; row tiles of ``BLOCK_M`` rows that cover ``[0, N)`` (gap tiles,
``seg = -1``, cover rows no segment owns); and, per factor index, the list of segments using it.

``segment_mm`` (shrink, expand, dS, dX, grouped forward; with ``base``, the fused LoRA linear)::

    for t, (seg, r0, r1) in enumerate(tiles):           # one program per (tile, column block)
        acc = zeros(r1 - r0, NOUT)
        if seg >= 0:
            g = segs[seg][g_col]; k = rank if k_is_rank else K; n = rank if n_is_rank else NOUT
            acc = X[r0:r1, :k] @ M[g][:k, :n]           # M[g][k, n] read through strides
            acc = pad_columns(acc, NOUT)                # columns n..NOUT are 0
            acc *= scale[seg] if use_scale else 1
        if base:                                        # every tile, gap tiles too
            acc += X0[r0:r1] @ W0 + (bias if bias is not None else 0)   # W0[k, n] through strides
        if accumulate and seg < 0: continue             # rows of no segment are left alone
        Y[r0:r1] = (Y[r0:r1] if accumulate else 0) + acc

So a plan's gap tiles write zeros, or the base product alone. The fused LoRA linear
(LoRAFusion's forward) is ``Y = X·Wᵀ + b + scale·S·B[b]ᵀ`` in one pass over Y, and its input
gradient ``dX = dY·W + dS·A[a]`` likewise, instead of a base GEMM, an expand and an add.

``group_outer`` (dA, dB, grouped weight gradient)::

    for g in range(G):                                  # one program per (used group, output tile)
        O[g] = sum((scale[s] if use_scale else 1) * P[start:end].T @ Q[start:end]
                   for s in segments_of_group[g] for start, end in [segs[s][:2]])   # 0 if none

Inputs of 16-bit types are multiplied on tensor cores with fp32 accumulation; fp32 inputs use
IEEE fp32 products (no TF32), so results match the torch reference to ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import os

import torch
import triton
import triton.language as tl

from . import tuning

BLOCK_M = 32  # row tile of the plan: shared by every launch over one plan
SEG_FIELDS = 5  # start, end, a_index, b_index, rank


def _fix_interpreter_index() -> None:
    """Triton <= 3.6's interpreter turns a scalar into ``int`` via a 1-element array, which
    numpy >= 2.4 refuses (triton-lang/triton#9171): ``range(lo, hi)`` over loaded values breaks.
    Same one-line fix as upstream, applied to the interpreter only."""
    from triton.runtime import interpreter as interp

    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_lorafleet_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._lorafleet_fixed = True
    interp._patch_lang_tensor = patched


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRET:
    _fix_interpreter_index()


@dataclass(frozen=True)
class Plan:
    segs: torch.Tensor  # [n_seg, 5] int32
    scales: torch.Tensor  # [n_seg] float32
    tiles: torch.Tensor  # [T, 3] int32: seg (-1 gap), first row, end row
    num_tiles: int
    block_m: int = BLOCK_M  # rows per tile: the M block of every launch over this plan


@dataclass(frozen=True)
class GroupIndex:
    used: torch.Tensor  # [U] int32: group ids some non-empty segment uses
    ptr: torch.Tensor  # [U + 1] int32 into seg_ids
    seg_ids: torch.Tensor  # [n] int32, segments sorted by group
    unused: torch.Tensor | None  # int64 ids of the other groups (zero-filled), None if none
    num_groups: int


def make_plan(rows: list, num_rows: int, device, block_m: int = BLOCK_M) -> Plan:
    """rows: [(start, end, a_index, b_index, rank, scale)], disjoint. Tiles cover [0, num_rows)."""
    order = sorted(range(len(rows)), key=lambda i: rows[i][0])
    tiles, covered = [], 0

    def add(seg, s, e):
        tiles.extend((seg, r, min(r + block_m, e)) for r in range(s, e, block_m))

    for i in order:
        s, e = rows[i][0], rows[i][1]
        if s < covered:
            raise ValueError(f"overlapping segments at row {s}")
        add(-1, covered, s)
        add(i, s, e)
        covered = max(covered, e)
    add(-1, covered, num_rows)
    segs = torch.tensor([r[:5] for r in rows] or [[0] * 5], dtype=torch.int32)
    scales = torch.tensor([float(r[5]) for r in rows] or [0.0], dtype=torch.float32)
    tile_t = torch.tensor(tiles or [[-1, 0, 0]], dtype=torch.int32)
    return Plan(segs.to(device), scales.to(device), tile_t.to(device), len(tiles), block_m)


def make_group_index(rows: list, col: int, num_groups: int, device) -> GroupIndex:
    """Segments grouped by ``rows[i][col]`` (2: a_index, 3: b_index); empty segments dropped."""
    members: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if r[1] > r[0]:
            members.setdefault(int(r[col]), []).append(i)
    used = sorted(members)
    ptr, ids = [0], []
    for g in used:
        ids.extend(members[g])
        ptr.append(len(ids))
    unused = sorted(set(range(num_groups)) - set(used))
    i32 = lambda v: torch.tensor(v or [0], dtype=torch.int32).to(device)  # noqa: E731
    return GroupIndex(
        i32(used)[: len(used)], i32(ptr), i32(ids),
        torch.tensor(unused, dtype=torch.int64).to(device) if unused else None, num_groups,
    )


def empty(shape, like: torch.Tensor) -> torch.Tensor:
    """Every buffer a kernel fills comes from here (tests swap in a NaN-filled one)."""
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(p, hi) if hi else p


def _prec(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 or _upcast(t) else "tf32"  # 16-bit operands ignore it


def _upcast(t: torch.Tensor) -> bool:
    """The interpreter multiplies bf16 tiles as raw integers (Triton 3.6): feed it fp32 tiles
    instead, which is the same arithmetic (bf16 products are exact in fp32)."""
    return INTERPRET and t.dtype == torch.bfloat16


# Kernels use core builtins only (tl.full, not tl.zeros / tl.cdiv): the standard-library helpers
# are @jit functions themselves and break the interpreter when triton was imported before
# TRITON_INTERPRET was set.
@triton.jit
def _segment_mm_kernel(
    X, M, Y, tiles, segs, scales, K, NOUT,
    sxm, sxk, smg, smk, smn, sym, syn,
    X0, W0, bias, KB, sx0m, sx0k, swk, swn,
    G_COL: tl.constexpr, K_IS_RANK: tl.constexpr, N_IS_RANK: tl.constexpr,
    USE_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    t = tl.program_id(0)
    pn = tl.program_id(1)
    seg = tl.load(tiles + 3 * t)
    r0 = tl.load(tiles + 3 * t + 1)
    r1 = tl.load(tiles + 3 * t + 2)
    rows = (r0 + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < r1
    cols = pn * BN + tl.arange(0, BN)
    cmask = cols < NOUT
    acc = tl.full((BM, BN), 0.0, tl.float32)
    if seg >= 0:
        g = tl.load(segs + seg * 5 + G_COL).to(tl.int64)
        rank = tl.load(segs + seg * 5 + 4)
        k_lim = K
        if K_IS_RANK:
            k_lim = rank
        n_lim = NOUT
        if N_IS_RANK:
            n_lim = rank
        m_base = M + g * smg
        for k0 in range(0, k_lim, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < k_lim
            xt = tl.load(X + rows[:, None] * sxm + ks[None, :] * sxk, mask=rmask[:, None] & kmask[None, :], other=0.0)
            mt = tl.load(m_base + ks[:, None] * smk + cols[None, :] * smn,
                         mask=kmask[:, None] & (cols < n_lim)[None, :], other=0.0)
            if UPCAST:
                xt, mt = xt.to(tl.float32), mt.to(tl.float32)
            acc = tl.dot(xt, mt, acc, input_precision=PREC)
        if USE_SCALE:
            acc = acc * tl.load(scales + seg)
    if BASE:  # the frozen base product, accumulated onto the LoRA tile before the one store
        for k0 in range(0, KB, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < KB
            xt = tl.load(X0 + rows[:, None] * sx0m + ks[None, :] * sx0k, mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
            wt = tl.load(W0 + ks[:, None] * swk + cols[None, :] * swn, mask=kmask[:, None] & cmask[None, :], other=0.0)
            if UPCAST:
                xt, wt = xt.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=PREC)
        if HAS_BIAS:
            acc = acc + tl.load(bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    ptrs = Y + rows[:, None] * sym + cols[None, :] * syn
    mask = rmask[:, None] & cmask[None, :]
    if ACCUMULATE:
        if seg >= 0:  # rows of no segment keep what Y holds
            acc = acc + tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_outer_kernel(
    P, Q, O, gids, gptr, gseg, segs, scales, I, J,
    spm, spi, sqm, sqj, sog, soi, soj,
    USE_SCALE: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    u = tl.program_id(0)
    g = tl.load(gids + u).to(tl.int64)
    pt = tl.program_id(1)
    n_j = (J + BJ - 1) // BJ
    ii = (pt // n_j) * BI + tl.arange(0, BI)
    jj = (pt % n_j) * BJ + tl.arange(0, BJ)
    imask = ii < I
    jmask = jj < J
    acc = tl.full((BI, BJ), 0.0, tl.float32)
    lo = tl.load(gptr + u)
    hi = tl.load(gptr + u + 1)
    for j in range(lo, hi):
        seg = tl.load(gseg + j)
        s = tl.load(segs + seg * 5)
        e = tl.load(segs + seg * 5 + 1)
        part = tl.full((BI, BJ), 0.0, tl.float32)
        for m0 in range(s, e, BM):
            rows = (m0 + tl.arange(0, BM)).to(tl.int64)
            rmask = rows < e
            pt_ = tl.load(P + rows[None, :] * spm + ii[:, None] * spi, mask=imask[:, None] & rmask[None, :], other=0.0)
            qt = tl.load(Q + rows[:, None] * sqm + jj[None, :] * sqj, mask=rmask[:, None] & jmask[None, :], other=0.0)
            if UPCAST:
                pt_, qt = pt_.to(tl.float32), qt.to(tl.float32)
            part = tl.dot(pt_, qt, part, input_precision=PREC)
        if USE_SCALE:
            part = part * tl.load(scales + seg)
        acc += part
    ptrs = O + g * sog + ii[:, None] * soi + jj[None, :] * soj
    tl.store(ptrs, acc.to(O.dtype.element_ty), mask=imask[:, None] & jmask[None, :])


def segment_mm(X, M_strides, M, Y, plan: Plan, K: int, *, g_col: int, k_is_rank: bool,
               n_is_rank: bool, use_scale: bool, accumulate: bool = False, base=None):
    """Launch ``_segment_mm_kernel`` writing ``Y`` [N, NOUT] (every row, unless ``accumulate``).
    ``M_strides`` = strides of M[group, k, n]; ``K`` is X's column count (the padded rank R when
    ``k_is_rank``). ``base = (X0, W0, W0_strides, bias)`` adds ``X0 @ W0 + bias`` to every row,
    with ``W0[k, n]`` read through ``W0_strides`` and ``bias`` [NOUT] or None."""
    NOUT = Y.shape[1]
    if plan.num_tiles == 0 or NOUT == 0:
        return Y
    X0, W0, (swk, swn), bias = base if base is not None else (X, M, (0, 0), None)
    KB = X0.shape[1] if base is not None else 0
    smg, smk, smn = M_strides
    args = (X, M, Y, plan.tiles, plan.segs, plan.scales, K, NOUT,
            X.stride(0), X.stride(1), smg, smk, smn, Y.stride(0), Y.stride(1),
            X0, W0, bias if bias is not None else Y, KB, X0.stride(0), X0.stride(1), swk, swn)
    flags = dict(G_COL=g_col, K_IS_RANK=k_is_rank, N_IS_RANK=n_is_rank, USE_SCALE=use_scale,
                 ACCUMULATE=accumulate, BASE=base is not None, HAS_BIAS=bias is not None,
                 BM=plan.block_m, PREC=_prec(X), UPCAST=_upcast(X))
    if tuning.enabled(INTERPRET):
        grid = lambda meta: (plan.num_tiles, triton.cdiv(NOUT, meta["BN"]))  # noqa: E731
        tuning.tuned("segment_mm", _segment_mm_kernel)[grid](*args, **flags)
    else:
        BN, BK = _pow2(NOUT, hi=64), _pow2(max(K, KB), hi=64)
        _segment_mm_kernel[(plan.num_tiles, triton.cdiv(NOUT, BN))](*args, **flags, BN=BN, BK=BK)
    return Y


def group_outer(P, Q, O, plan: Plan, groups: GroupIndex, *, use_scale: bool):
    """Launch ``_group_outer_kernel`` over the used groups of O [G, I, J]; zero the others."""
    G, I, J = O.shape
    assert groups.num_groups == G, (groups.num_groups, G)
    if groups.unused is not None:
        O.index_fill_(0, groups.unused, 0)
    U = groups.used.numel()
    if U == 0 or I == 0 or J == 0:
        return O
    args = (P, Q, O, groups.used, groups.ptr, groups.seg_ids, plan.segs, plan.scales, I, J,
            P.stride(0), P.stride(1), Q.stride(0), Q.stride(1), O.stride(0), O.stride(1), O.stride(2))
    flags = dict(USE_SCALE=use_scale, PREC=_prec(P), UPCAST=_upcast(P))
    if tuning.enabled(INTERPRET):
        grid = lambda meta: (U, triton.cdiv(I, meta["BI"]) * triton.cdiv(J, meta["BJ"]))  # noqa: E731
        tuning.tuned("group_outer", _group_outer_kernel)[grid](*args, **flags)
    else:
        BI, BJ = _pow2(I, hi=64), _pow2(J, hi=64)
        grid = (U, triton.cdiv(I, BI) * triton.cdiv(J, BJ))
        _group_outer_kernel[grid](*args, **flags, BM=BLOCK_M, BI=BI, BJ=BJ)
    return O
