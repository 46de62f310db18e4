"""Triton kernels of the shared spline activation (DESIGN.md §9): phi in one pass, its gradients in another.

Both kernels work on the ``(A, C, B)`` memory-order view of the input (``spline.MemoryLayout``): ``C`` spline
channels (1 for ``share="layer"``), everything slower in memory in ``A``, everything faster in ``B``. The math is
that of the torch path (``activation.SplineEvaluation``) operation for operation, in the table's dtype (fp32 for
fp32/fp16/bf16 inputs, fp64 for fp64 inputs):

* ``u = (x - lo) * inv_h``, ``t = u - floor(u)``, table row ``clamp(floor(u), -4, G + 3) + 4`` (NaN: row 0);
  rows 0 and G + 7 of the table are zero, so values outside the extended grid see only the base part;
* ``phi = (a0 + t (a1 + t (a2 + t a3))) + w_b b(x)`` with ``b`` silu or leaky_relu(., 0.01);
* backward: ``grad_x = g (w_b b'(x) [+ S'(x)])`` and, accumulated per thread across the program's loop and
  reduced once at its end, the coefficient gradient ``sum g B_j(x)`` per (channel, j) and ``sum g b(x)`` per
  channel. Each program writes its partial sums to its own slot of a (programs x ...) buffer that one
  ``torch.sum`` reduces: no atomics, so two runs give bitwise-equal gradients.

``TRITON_INTERPRET=1``, set before triton is first imported, makes the kernels run on CPU tensors through
Triton's interpreter (tests); it is decided once, when this module is imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import TRITON_MAX_ELEMENTS, triton_interpret_requested

# Kernels were built for the interpreter (CPU tensors; slow) rather than compiled for a GPU.
INTERPRETED = triton_interpret_requested()
# Compiled kernels take the sigmoid's exp and reciprocal from the flush-to-zero approximations (ex2.approx.ftz,
# div.approx.ftz): the same approximations as tl.exp / tl.fdiv(ieee_rounding=False) without their range fix-ups
# for subnormal values (~6 instructions per value), which cannot change 1 / (1 + exp(-x)) beyond a subnormal.
# The interpreter has no libdevice, so it runs the portable branch.
_FAST_SIGMOID = tl.constexpr(not INTERPRETED)
# Table rows: G + 6 intervals of the extended grid plus a zero row at each end (spline.spline_table).
EXTRA_ROWS = 8
# Every program of the backward kernel owns a slot of the partial-sum buffer; about this many programs in all,
# a function of the shape only (not of the GPU), so the reduction order, and the result, are reproducible.
TARGET_PROGRAMS = 1024
# Positions x channels per tile of the backward kernel (one trip of its loop).
BACKWARD_TILE = 256
BASE_CODES = {"silu": 0, "leakyrelu": 1}
PHI_BLOCK = 1024  # values per program of the forward kernel
_MAX_ELEMENTS = TRITON_MAX_ELEMENTS


@triton.jit
def _locate(x, lo, inv_h, GRID: tl.constexpr):
    """(table row, t) of each value; NaN goes to the first (all-zero) row, out-of-grid values to the end rows."""
    u = (x - lo) * inv_h
    floor_u = tl.floor(u)
    t = u - floor_u
    # tl.maximum without propagate_nan is IEEE maxNum (max.f32 compiled, np.fmax interpreted): NaN gives -4, row 0
    r = tl.minimum(tl.maximum(floor_u, -4.0), GRID + 3.0)
    return (r + 4.0).to(tl.int32), t


@triton.jit
def _base_function(x, slope, BASE: tl.constexpr):
    """(b(x), b'(x)): silu (BASE 0) or leaky_relu with ``slope`` (BASE 1)."""
    if BASE == 1:
        positive = x > 0
        b = tl.where(positive, x, x * slope)
        db = tl.where(positive, 1.0, slope)
    else:
        if x.dtype == tl.float32 and _FAST_SIGMOID:
            sig = libdevice.fast_dividef(tl.full(x.shape, 1.0, tl.float32), 1.0 + libdevice.fast_expf(-x))
        elif x.dtype == tl.float32:  # the approximate divide (~2 ulp): the IEEE one is a ~10-instruction sequence
            sig = tl.fdiv(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x), ieee_rounding=False)
        else:
            sig = 1.0 / (1.0 + tl.exp(-x))
        b = x * sig
        db = sig + b * (1.0 - sig)
    return b, db


@triton.jit
def _phi_kernel(x_ptr, table_ptr, wb_ptr, params_ptr, out_ptr, numel, C, B,
                GRID: tl.constexpr, BASE: tl.constexpr, PER_CHANNEL: tl.constexpr, PLANES: tl.constexpr,
                BLOCK: tl.constexpr):
    """phi of BLOCK values per program. PLANES (per-channel splines, planes of at least a few hundred values): the
    grid is (blocks of a plane, planes) and the channel is one scalar per program; otherwise the values are taken
    flat, and with per-channel splines each value's channel is (offset // B) % C (an integer division per value)."""
    lo = tl.load(params_ptr)
    inv_h = tl.load(params_ptr + 1)
    slope = tl.load(params_ptr + 2)
    if PLANES:
        plane = tl.program_id(1)
        b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = b < B
        offs = plane * B + b
        channel = plane % C
        entry = (channel * (GRID + 8)) * 4
        wb = tl.load(wb_ptr + channel)
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        if PER_CHANNEL:
            channel = (offs // B) % C
            entry = channel * ((GRID + 8) * 4)
            wb = tl.load(wb_ptr + channel)  # channel < C for every lane, masked ones included
        else:
            entry = 0
            wb = tl.load(wb_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(lo.dtype)
    row, t = _locate(x, lo, inv_h, GRID)
    entry = (entry + row * 4).to(tl.uint32)  # non-negative: zero-extended (mad.wide.u32), no sign fix-up
    # No mask: every lane's row is clamped into the table (a masked-off lane reads row of x = 0) and its channel is
    # < C, so the address is always valid; a masked load costs a predicate and a select per load.
    a0 = tl.load(table_ptr + entry)
    a1 = tl.load(table_ptr + entry + 1)
    a2 = tl.load(table_ptr + entry + 2)
    a3 = tl.load(table_ptr + entry + 3)
    s = a0 + (a1 + (a2 + a3 * t) * t) * t
    b_x, _ = _base_function(x, slope, BASE)
    tl.store(out_ptr + offs, (s + b_x * wb).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _spline_slope(table_ptr, entry, mask, t, inv_h):
    """S'(x) = (a1 + 2 a2 t + 3 a3 t^2) / h from the table row starting at ``entry`` (exact gradients)."""
    a1 = tl.load(table_ptr + entry + 1, mask=mask, other=0.0)
    a2 = tl.load(table_ptr + entry + 2, mask=mask, other=0.0)
    a3 = tl.load(table_ptr + entry + 3, mask=mask, other=0.0)
    return a1 * inv_h + (a2 * (2.0 * inv_h) + a3 * (3.0 * inv_h) * t) * t


@triton.jit
def _piece_of(k, w0, w1, w2, w3):
    """The contribution to a coefficient that is piece k (0..3) of a value's interval; 0 for any other k."""
    return tl.where(k == 0, w0, tl.where(k == 1, w1, tl.where(k == 2, w2, tl.where(k == 3, w3, 0.0))))


@triton.jit
def _coefficient_pieces(g, row, t, GRID: tl.constexpr):
    """g times the four cubic pieces w_k(t) of a value's interval (zero for the end rows: outside the extended grid,
    or NaN), and the first coefficient they belong to, ``row - 4``."""
    inside = (row >= 1) & (row <= GRID + 6)
    gi = tl.where(inside, g, 0.0)
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    w0 = gi * (s * s * s * (1.0 / 6.0))
    w1 = gi * ((3.0 * t3 - 6.0 * t2 + 4.0) * (1.0 / 6.0))
    w2 = gi * ((-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) * (1.0 / 6.0))
    w3 = gi * (t3 * (1.0 / 6.0))
    return w0, w1, w2, w3, row - 4


@triton.jit
def _grad_kernel_rows(x_ptr, g_ptr, table_ptr, wb_ptr, params_ptr, gx_ptr, part_coef_ptr, part_wb_ptr,
                      M, C, B, blocks_per_program, tiles_per_plane,
                      GRID: tl.constexpr, BASE: tl.constexpr, EXACT: tl.constexpr, NEED_X: tl.constexpr,
                      NEED_PARAMS: tl.constexpr, LAYOUT: tl.constexpr, BM: tl.constexpr, NBP: tl.constexpr):
    """The backward for one spline per program (LAYOUT 0: share="layer", C == 1, M values; LAYOUT 2: channel c of
    an (A, C, B) view with B > 1, M = A planes of ``tiles_per_plane`` tiles each): program (s, c) covers tiles of
    channel c, BM values per trip, as 1-D tiles. Accumulators (NBP, BM): every thread keeps the coefficient sums of
    its own values across the loop, so the loop has no reduction across threads (and no block barrier); they are
    summed once after it."""
    split = tl.program_id(0)
    c = tl.program_id(1)
    lane = tl.arange(0, BM)
    lo = tl.load(params_ptr)
    inv_h = tl.load(params_ptr + 1)
    slope = tl.load(params_ptr + 2)
    wb = tl.load(wb_ptr + c)
    # (NBP, BM), positions fastest: Triton then spreads the positions over the threads and gives every thread all
    # NBP accumulators of its own values; as (BM, NBP) it spread the coefficients over 8 threads, and moving each
    # value's pieces to those threads cost a layout conversion through shared memory (with barriers) per trip.
    coefficient = tl.arange(0, NBP)[:, None]
    acc = tl.zeros((NBP, BM), dtype=lo.dtype)
    acc_wb = tl.zeros((BM,), dtype=lo.dtype)
    for it in range(0, blocks_per_program):
        tile = split * blocks_per_program + it
        if LAYOUT == 0:
            offs = tile * BM + lane
            mask = offs < M
        else:  # tiles within planes: plane a and position block of the tile are scalars (no division per value)
            a = tile // tiles_per_plane
            positions = (tile - a * tiles_per_plane) * BM + lane
            mask = (positions < B) & (a < M)
            offs = (a * C + c) * B + positions
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(lo.dtype)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(lo.dtype)
        row, t = _locate(x, lo, inv_h, GRID)
        b, db = _base_function(x, slope, BASE)
        if NEED_X:
            dphi = db * wb
            if EXACT:
                dphi = dphi + _spline_slope(table_ptr, (c * (GRID + 8) + row) * 4, mask, t, inv_h)
            tl.store(gx_ptr + offs, (g * dphi).to(gx_ptr.dtype.element_ty), mask=mask)
        if NEED_PARAMS:
            w0, w1, w2, w3, first = _coefficient_pieces(g, row, t, GRID)
            acc += _piece_of(coefficient - first[None, :], w0[None, :], w1[None, :], w2[None, :], w3[None, :])
            acc_wb += g * b
    if NEED_PARAMS:
        tl.store(part_coef_ptr + (split * C + c) * NBP + tl.arange(0, NBP), tl.sum(acc, axis=1))
        tl.store(part_wb_ptr + split * C + c, tl.sum(acc_wb, axis=0))


@triton.jit
def _grad_kernel_channels(x_ptr, g_ptr, table_ptr, wb_ptr, params_ptr, gx_ptr, part_coef_ptr, part_wb_ptr,
                          M, C, B, blocks_per_program,
                          GRID: tl.constexpr, BASE: tl.constexpr, EXACT: tl.constexpr, NEED_X: tl.constexpr,
                          NEED_PARAMS: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, NBP: tl.constexpr):
    """The backward for channel blocks: an (A, C, 1) view, channels fastest in memory (channels_last and Linear
    inputs with per-channel splines), element (m, c) at m*C + c. Program (s, cb) covers channels ``cb*BC ..`` and
    positions ``m``; a tile is BM positions x BC channels, handled as one flat block of BM*BC values (position
    major), so that it is laid out and accumulated exactly as ``_grad_kernel_rows``'s 1-D tiles.

    The coefficient gradient is accumulated in coefficient space: a value on table row r (interval r - 4) adds
    g * w_k(t) to coefficient j = r - 4 + k, k = 0..3 (the four cubic pieces), into accumulators of shape
    (NBP, BM*BC) that every thread keeps for its own values across the loop; they, and g * b(x), are summed over
    the positions once, after the loop. Nothing crosses threads inside the loop, hence no block barrier there (a
    (BM, BC, NBP) accumulator made Triton convert layouts through shared memory every trip: 10 barriers).
    """
    split = tl.program_id(0)
    lane = tl.arange(0, BM * BC)
    position = lane // BC  # BC is a power of two: a shift, computed once
    channels = tl.program_id(1) * BC + lane % BC
    channel_mask = channels < C
    lo = tl.load(params_ptr)
    inv_h = tl.load(params_ptr + 1)
    slope = tl.load(params_ptr + 2)
    wb = tl.load(wb_ptr + channels, mask=channel_mask, other=0.0)  # the same channels every trip
    coefficient = tl.arange(0, NBP)[:, None]
    acc = tl.zeros((NBP, BM * BC), dtype=lo.dtype)
    acc_wb = tl.zeros((BM * BC,), dtype=lo.dtype)
    for it in range(0, blocks_per_program):
        m = (split * blocks_per_program + it) * BM + position
        mask = (m < M) & channel_mask
        offs = m * C + channels
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(lo.dtype)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(lo.dtype)
        row, t = _locate(x, lo, inv_h, GRID)
        b, db = _base_function(x, slope, BASE)
        if NEED_X:
            dphi = db * wb
            if EXACT:
                dphi = dphi + _spline_slope(table_ptr, (channels * (GRID + 8) + row) * 4, mask, t, inv_h)
            tl.store(gx_ptr + offs, (g * dphi).to(gx_ptr.dtype.element_ty), mask=mask)
        if NEED_PARAMS:
            w0, w1, w2, w3, first = _coefficient_pieces(g, row, t, GRID)
            acc += _piece_of(coefficient - first[None, :], w0[None, :], w1[None, :], w2[None, :], w3[None, :])
            acc_wb += g * b
    if NEED_PARAMS:
        # once per program: sum over the BM positions of the tile; (NBP, BC) and (BC,)
        coef_sum = tl.sum(tl.reshape(acc, (NBP, BM, BC)), axis=1)
        wb_sum = tl.sum(tl.reshape(acc_wb, (BM, BC)), axis=0)
        block_channels = tl.program_id(1) * BC + tl.arange(0, BC)
        block_mask = block_channels < C
        slot = (split * C + block_channels[None, :]) * NBP + tl.arange(0, NBP)[:, None]
        tl.store(part_coef_ptr + slot, coef_sum, mask=block_mask[None, :])
        tl.store(part_wb_ptr + split * C + block_channels, wb_sum, mask=block_mask)


def _check(x3: torch.Tensor, table: torch.Tensor):
    if x3.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"the Triton spline kernels run on CUDA tensors, got a {x3.device.type} tensor; for tests "
                           "on the CPU set TRITON_INTERPRET=1 before triton is first imported")
    if x3.numel() > _MAX_ELEMENTS:
        raise ValueError(f"the Triton spline kernels take at most 2**30 values per call, got {x3.numel()}")
    if not (x3.is_contiguous() and table.is_contiguous()):
        raise ValueError("x (A, C, B) and the table must be contiguous")


def phi(x3: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor, params: torch.Tensor, base: str,
        out3: torch.Tensor):
    """Write phi(x3) into out3 (any float dtype). x3: contiguous (A, C, B); table: (C, G + 8, 4) in the compute
    dtype; base_weight: (C,); params: (lo, inv_h, leaky slope) in the compute dtype."""
    _check(x3, table)
    numel = x3.numel()
    if numel == 0:
        return out3
    _, C, B = x3.shape
    grid_size = table.shape[1] - EXTRA_ROWS
    A = x3.shape[0]
    planes = C > 1 and B >= PHI_BLOCK // 4 and A * C <= 65535
    grid = (triton.cdiv(B, PHI_BLOCK), A * C) if planes else (triton.cdiv(numel, PHI_BLOCK),)
    _phi_kernel[grid](x3, table, base_weight, params, out3, numel, C, B, GRID=grid_size, BASE=BASE_CODES[base],
                      PER_CHANNEL=C > 1, PLANES=planes, BLOCK=PHI_BLOCK)
    return out3


def phi_grads(x3: torch.Tensor, g3: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor,
              params: torch.Tensor, base: str, exact: bool, gx3: torch.Tensor | None, need_params: bool):
    """Write dL/dx into gx3 (when given) and return (dL/dcoefficients (C, G + 3), dL/dbase_weight) (None unless
    need_params).

    g3 is dL/dphi in x3's layout. Partial sums are per (program, channel); one torch.sum reduces them.
    """
    _check(x3, table)
    A, C, B = x3.shape
    n_rows = table.shape[1]
    grid_size = n_rows - EXTRA_ROWS
    n_coefficients = grid_size + 3
    if C == 1:
        layout, M, bc = 0, A * B, 1
    elif B == 1:
        layout, M, bc = 1, A, min(32, triton.next_power_of_2(C))
    else:
        layout, M, bc = 2, A * B, 1
    bm = max(1, BACKWARD_TILE // bc)
    nbp = triton.next_power_of_2(n_coefficients)
    channel_blocks = triton.cdiv(C, bc)
    blocks = max(1, triton.cdiv(M, bm))
    tiles_per_plane = 1
    if layout == 2:  # tiles within planes (_grad_kernel_rows), M counts the planes
        tiles_per_plane = triton.cdiv(B, bm)
        M, blocks = A, max(1, A * tiles_per_plane)
    splits = max(1, min(blocks, TARGET_PROGRAMS // channel_blocks))
    per_program = triton.cdiv(blocks, splits)
    splits = triton.cdiv(blocks, per_program)
    dtype = table.dtype
    if need_params:
        part_coef = torch.empty(splits, C, nbp, device=x3.device, dtype=dtype)
        part_wb = torch.empty(splits, C, device=x3.device, dtype=dtype)
    else:
        part_coef = part_wb = table  # never written
    if x3.numel():
        common = dict(GRID=grid_size, BASE=BASE_CODES[base], EXACT=exact, NEED_X=gx3 is not None,
                      NEED_PARAMS=need_params, BM=bm, NBP=nbp)
        args = (x3, g3, table, base_weight, params, x3 if gx3 is None else gx3, part_coef, part_wb, M, C, B,
                per_program)
        if layout == 1:
            _grad_kernel_channels[(splits, channel_blocks)](*args, BC=bc, **common)
        else:
            _grad_kernel_rows[(splits, channel_blocks)](*args, tiles_per_plane, LAYOUT=layout, **common)
    elif need_params:
        part_coef.zero_()
        part_wb.zero_()
    if not need_params:
        return None, None
    return part_coef.sum(0)[:, :n_coefficients].contiguous(), part_wb.sum(0)
