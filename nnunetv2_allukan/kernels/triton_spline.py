"""Triton kernels of the shared spline activation (DESIGN.md §9): phi in one pass, its gradients in another.

Both kernels work on the ``(A, C, B)`` memory-order view of the input (``spline.MemoryLayout``): ``C`` spline
channels (1 for ``share="layer"``), everything slower in memory in ``A``, everything faster in ``B``. The math is
that of the torch path (``activation.SplineEvaluation``) operation for operation, in the table's dtype (fp32 for
fp32/fp16/bf16 inputs, fp64 for fp64 inputs):

* ``u = (x - lo) * inv_h``, ``t = u - floor(u)``, table row ``clamp(floor(u), -4, G + 3) + 4`` (NaN: row 0);
  rows 0 and G + 7 of the table are zero, so values outside the extended grid see only the base part;
* ``phi = (a0 + t (a1 + t (a2 + t a3))) + w_b b(x)`` with ``b`` silu or leaky_relu(., 0.01);
* backward: ``grad_x = g (w_b b'(x) [+ S'(x)])`` and, reduced inside each program, the table gradient
  ``sum g t^p`` per (channel, row, p) and ``sum g b(x)`` per channel. Each program writes its partial sums to its
  own slot of a (programs x ...) buffer that one ``torch.sum`` reduces: no atomics, so two runs give bitwise-equal
  gradients.

The coefficient gradient is returned as the table gradient (what the autograd Functions return for their
``table`` input); ``spline.spline_table``'s autograd maps it to the coefficients, a (C, G + 8, 4) -> (C, G + 3)
product that costs nothing next to one pass over the activation.

``TRITON_INTERPRET=1``, set before triton is first imported, makes the kernels run on CPU tensors through
Triton's interpreter (tests); it is decided once, when this module is imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_interpret_requested

# Kernels were built for the interpreter (CPU tensors; slow) rather than compiled for a GPU.
INTERPRETED = triton_interpret_requested()
# Table rows: G + 6 intervals of the extended grid plus a zero row at each end (spline.spline_table).
EXTRA_ROWS = 8
# Every program of the backward kernel owns a slot of the partial-sum buffer; about this many programs in all,
# a function of the shape only (not of the GPU), so the reduction order, and the result, are reproducible.
TARGET_PROGRAMS = 1024
BASE_CODES = {"silu": 0, "leakyrelu": 1}
PHI_BLOCK = 1024  # values per program of the forward kernel
_MAX_ELEMENTS = 2 ** 30  # int32 offsets, with room for the last tile's overhang


@triton.jit
def _locate(x, lo, inv_h, GRID: tl.constexpr):
    """(table row, t) of each value; NaN goes to the first (all-zero) row, out-of-grid values to the end rows."""
    u = (x - lo) * inv_h
    floor_u = tl.floor(u)
    t = u - floor_u
    r = tl.where(floor_u != floor_u, -4.0, floor_u)
    r = tl.minimum(tl.maximum(r, -4.0), GRID + 3.0)
    return (r + 4.0).to(tl.int32), t


@triton.jit
def _base_function(x, slope, BASE: tl.constexpr):
    """(b(x), b'(x)): silu (BASE 0) or leaky_relu with ``slope`` (BASE 1)."""
    if BASE == 1:
        positive = x > 0
        b = tl.where(positive, x, x * slope)
        db = tl.where(positive, 1.0, slope)
    else:
        sig = 1.0 / (1.0 + tl.exp(-x))
        b = x * sig
        db = sig + b * (1.0 - sig)
    return b, db


@triton.jit
def _phi_kernel(x_ptr, table_ptr, wb_ptr, params_ptr, out_ptr, numel, C, B,
                GRID: tl.constexpr, BASE: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    lo = tl.load(params_ptr)
    inv_h = tl.load(params_ptr + 1)
    slope = tl.load(params_ptr + 2)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(lo.dtype)
    row, t = _locate(x, lo, inv_h, GRID)
    if PER_CHANNEL:
        channel = (offs // B) % C
        entry = (channel * (GRID + 8) + row) * 4
        wb = tl.load(wb_ptr + channel, mask=mask, other=0.0)
    else:
        entry = row * 4
        wb = tl.load(wb_ptr)
    a0 = tl.load(table_ptr + entry, mask=mask, other=0.0)
    a1 = tl.load(table_ptr + entry + 1, mask=mask, other=0.0)
    a2 = tl.load(table_ptr + entry + 2, mask=mask, other=0.0)
    a3 = tl.load(table_ptr + entry + 3, mask=mask, other=0.0)
    s = a0 + (a1 + (a2 + a3 * t) * t) * t
    b, _ = _base_function(x, slope, BASE)
    tl.store(out_ptr + offs, (s + b * wb).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(x_ptr, g_ptr, table_ptr, wb_ptr, params_ptr, gx_ptr, part_table_ptr, part_wb_ptr,
                 M, C, B, blocks_per_program,
                 GRID: tl.constexpr, BASE: tl.constexpr, EXACT: tl.constexpr, NEED_X: tl.constexpr,
                 NEED_PARAMS: tl.constexpr, LAYOUT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                 RP: tl.constexpr):
    """Program (s, cb) covers channels ``cb*BC ..`` and positions ``m`` (pairs (a, b), ``M = A*B``) of its share.

    LAYOUT 0: C == 1, element m is at m. LAYOUT 1: B == 1 (channels fastest), at m*C + c. LAYOUT 2: at
    (a*C + c)*B + b. Tiles are (BM positions, BC channels); table-gradient partials are (BC channels, RP rows).
    """
    split = tl.program_id(0)
    channels = tl.program_id(1) * BC + tl.arange(0, BC)
    channel_mask = channels < C
    lo = tl.load(params_ptr)
    inv_h = tl.load(params_ptr + 1)
    slope = tl.load(params_ptr + 2)
    wb = tl.load(wb_ptr + channels, mask=channel_mask, other=0.0)
    rows = tl.arange(0, RP)
    acc0 = tl.zeros((BC, RP), dtype=lo.dtype)
    acc1 = tl.zeros((BC, RP), dtype=lo.dtype)
    acc2 = tl.zeros((BC, RP), dtype=lo.dtype)
    acc3 = tl.zeros((BC, RP), dtype=lo.dtype)
    acc_wb = tl.zeros((BC,), dtype=lo.dtype)
    for it in range(0, blocks_per_program):
        m = (split * blocks_per_program + it) * BM + tl.arange(0, BM)
        mask = (m < M)[:, None] & channel_mask[None, :]
        if LAYOUT == 0:
            offs = m[:, None] + channels[None, :]  # channels == 0
        elif LAYOUT == 1:
            offs = m[:, None] * C + channels[None, :]
        else:
            a = m // B
            offs = (a * C)[:, None] * B + channels[None, :] * B + (m - a * B)[:, None]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(lo.dtype)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(lo.dtype)
        row, t = _locate(x, lo, inv_h, GRID)
        b, db = _base_function(x, slope, BASE)
        if NEED_X:
            dphi = db * wb[None, :]
            if EXACT:
                entry = (channels[None, :] * (GRID + 8) + row) * 4
                a1 = tl.load(table_ptr + entry + 1, mask=mask, other=0.0)
                a2 = tl.load(table_ptr + entry + 2, mask=mask, other=0.0)
                a3 = tl.load(table_ptr + entry + 3, mask=mask, other=0.0)
                dphi = dphi + (a1 * inv_h + (a2 * (2.0 * inv_h) + a3 * (3.0 * inv_h) * t) * t)
            tl.store(gx_ptr + offs, (g * dphi).to(gx_ptr.dtype.element_ty), mask=mask)
        if NEED_PARAMS:
            # One-hot over the table rows: (BM, BC, RP), summed over the positions of the tile.
            hit = row[:, :, None] == rows[None, None, :]
            w = g
            acc0 += tl.sum(tl.where(hit, w[:, :, None], 0.0), axis=0)
            w = w * t
            acc1 += tl.sum(tl.where(hit, w[:, :, None], 0.0), axis=0)
            w = w * t
            acc2 += tl.sum(tl.where(hit, w[:, :, None], 0.0), axis=0)
            w = w * t
            acc3 += tl.sum(tl.where(hit, w[:, :, None], 0.0), axis=0)
            acc_wb += tl.sum(g * b, axis=0)
    if NEED_PARAMS:
        slot = (split * C + channels[:, None]) * (4 * RP) + rows[None, :]
        store_mask = channel_mask[:, None]
        tl.store(part_table_ptr + slot, acc0, mask=store_mask)
        tl.store(part_table_ptr + slot + RP, acc1, mask=store_mask)
        tl.store(part_table_ptr + slot + 2 * RP, acc2, mask=store_mask)
        tl.store(part_table_ptr + slot + 3 * RP, acc3, mask=store_mask)
        tl.store(part_wb_ptr + split * C + channels, acc_wb, mask=channel_mask)


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
    _phi_kernel[(triton.cdiv(numel, PHI_BLOCK),)](x3, table, base_weight, params, out3, numel, C, B, GRID=grid_size,
                                                 BASE=BASE_CODES[base], PER_CHANNEL=C > 1, BLOCK=PHI_BLOCK)
    return out3


def phi_grads(x3: torch.Tensor, g3: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor,
              params: torch.Tensor, base: str, exact: bool, gx3: torch.Tensor | None, need_params: bool):
    """Write dL/dx into gx3 (when given) and return (dL/dtable, dL/dbase_weight) (None unless need_params).

    g3 is dL/dphi in x3's layout. Partial sums are per (program, channel); one torch.sum reduces them.
    """
    _check(x3, table)
    A, C, B = x3.shape
    n_rows = table.shape[1]
    grid_size = n_rows - EXTRA_ROWS
    if C == 1:
        layout, M, bc = 0, A * B, 1
    elif B == 1:
        layout, M, bc = 1, A, min(32, triton.next_power_of_2(C))
    else:
        layout, M, bc = 2, A * B, 1
    bm = max(1, 512 // bc)
    rp = triton.next_power_of_2(n_rows)
    channel_blocks = triton.cdiv(C, bc)
    blocks = max(1, triton.cdiv(M, bm))
    splits = max(1, min(blocks, TARGET_PROGRAMS // channel_blocks))
    per_program = triton.cdiv(blocks, splits)
    splits = triton.cdiv(blocks, per_program)
    dtype = table.dtype
    if need_params:
        part_table = torch.empty(splits, C, 4, rp, device=x3.device, dtype=dtype)
        part_wb = torch.empty(splits, C, device=x3.device, dtype=dtype)
    else:
        part_table = part_wb = table  # never written
    if x3.numel():
        _grad_kernel[(splits, channel_blocks)](
            x3, g3, table, base_weight, params, x3 if gx3 is None else gx3, part_table, part_wb, M, C, B, per_program,
            GRID=grid_size, BASE=BASE_CODES[base], EXACT=exact, NEED_X=gx3 is not None, NEED_PARAMS=need_params,
            LAYOUT=layout, BM=bm, BC=bc, RP=rp)
    elif need_params:
        part_table.zero_()
        part_wb.zero_()
    if not need_params:
        return None, None
    grad_table = part_table.sum(0)[:, :, :n_rows].transpose(1, 2).contiguous()
    return grad_table, part_wb.sum(0)
