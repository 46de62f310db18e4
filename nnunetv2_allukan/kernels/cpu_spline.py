"""CPU kernels of the shared spline activation (DESIGN.md §10), compiled by numba: phi in one pass, its gradients
in another.

The math is the torch path's (``activation.SplineEvaluation``) and the Triton kernels' (``triton_spline``), on the
same ``(A, C, B)`` memory-order view of the input (``spline.MemoryLayout``) and the same interval table
(``spline.spline_table``: ``(C, G + 8, 4)``, zero first and last rows), in the table's dtype (float32 or float64):

* ``u = (x - lo) * inv_h``, ``t = u - floor(u)``, table row ``clamp(floor(u), -4, G + 3) + 4`` (NaN: row 0);
* ``phi = (a0 + t (a1 + t (a2 + t a3))) + w_b b(x)``, ``b`` silu or leaky_relu(., slope);
* backward: ``grad_x = g (w_b b'(x) [+ S'(x)])``, the table gradient ``sum g t^p`` per (spline, row, p) and
  ``sum g b(x)`` per spline.

How it is fast (measured on the 2-core AVX-512 machine of this project, 4x32x64x64 values, 1 thread; the numbers
are in docs/cpu_kernels.md):

* every pass works through the data in chunks of ``CHUNK`` values that stay in L1: a first loop with no table
  access (locate, t, the base function with a polynomial exp for float32, dL/dx) that LLVM vectorises, and a second,
  scalar loop for what needs the table row of each value (the four table entries of phi; the scatter of
  ``g t^p`` into the 4 x (G + 8) table-gradient cells). A gather in the first loop would keep it scalar.
* the scatter goes to ``COPIES`` interleaved copies of the cells, so that neighbouring values that fall in the same
  interval do not wait for each other's store.

Determinism: the work is cut into *units* (a spline, a block of its planes, a block of positions), a function of
the shape only. Each unit sums its own gradient partials in order; the partials of a spline are then summed in unit
order. Which thread ran which unit does not enter the result: bitwise-equal gradients at any thread count.

Threads: the kernels release the GIL (``nogil``) and run serially each; ``run_units`` spreads the units over a
small pool of Python threads sized by ``torch.get_num_threads()`` (so nnU-Net's and the demo's thread settings
apply), with the calling thread taking the first share. numba's own ``parallel=True`` is not used: its default
threading layer (workqueue) terminates the process when two threads enter a parallel region at once, and the
parallel loops did not vectorise here.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numba
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

CHUNK = 512  # values per inner chunk: the scratch arrays of a chunk stay in L1
COPIES = 4  # interleaved copies of the table-gradient cells in the scatter loop
EXTRA_ROWS = 8  # table rows beyond the G intervals (spline.spline_table)
UNIT_VALUES = 1 << 15  # about this many values per unit of work (and per partial sum)
MIN_VALUES_PER_THREAD = 1 << 15  # below this a second thread costs more than it saves
BASE_CODES = {"silu": 0, "leakyrelu": 1}
# Fast-math flags: contraction into FMAs, reassociation (vectorised sums) and reciprocals, but not 'nnan'/'ninf':
# NaN and infinite inputs must behave as on the torch path.
_FLAGS = dict(nogil=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc", "arcp", "nsz"})


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def _vector_pointer(context, builder, array_type, array_value, index, width):
    """Pointer to ``width`` consecutive elements of a numba array from ``index`` on, as an LLVM vector pointer."""
    array = context.make_array(array_type)(context, builder, array_value)
    i64 = ir.IntType(64)
    if index.type.width < 64:
        index = builder.sext(index, i64)
    vector = ir.VectorType(context.get_data_type(array_type.dtype), width)
    return builder.bitcast(builder.gep(array.data, [index]), vector.as_pointer())


@intrinsic
def _add4(typingctx, dst, i, src, j):
    """dst[i:i + 4] += src[j:j + 4] as one 4-wide load, add and store (LLVM does not combine the four scalar
    read-modify-writes of a scatter by itself): the table-gradient scatter is ~4x faster so."""
    sig = types.void(dst, i, src, j)

    def codegen(context, builder, signature, args):
        dst_ptr = _vector_pointer(context, builder, signature.args[0], args[0], args[1], 4)
        src_ptr = _vector_pointer(context, builder, signature.args[2], args[2], args[3], 4)
        total = builder.fadd(builder.load(dst_ptr, align=4), builder.load(src_ptr, align=4))
        builder.store(total, dst_ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", **_FLAGS)
def _exp_float32(y):
    """e^y in float32 within ~2 ulp (Cody-Waite reduction, degree-6 polynomial, 2^n from the exponent bits); unlike
    libm's expf it vectorises. Inputs are clamped to the normal range: e^y saturates at ~1.6e38 and ~1.6e-38, which
    leaves silu and its slope exact to float32 (sigmoid is 0 or 1 there); NaN stays NaN."""
    yc = min(max(y, np.float32(-87.0)), np.float32(88.0))
    yc = yc if y == y else y
    n = np.floor(yc * np.float32(1.4426950408889634) + np.float32(0.5))
    f = yc - n * np.float32(0.693359375)
    f = f + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * f + np.float32(1.3981999507e-3)
    p = p * f + np.float32(8.3334519073e-3)
    p = p * f + np.float32(4.1665795894e-2)
    p = p * f + np.float32(1.6666665459e-1)
    p = p * f + np.float32(5.0000001201e-1)
    p = p * f * f + f + np.float32(1.0)
    return p * _int32_bits_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))


def _exp(y):
    raise NotImplementedError  # numba only (overloaded below)


@overload(_exp, inline="always", fastmath=_FLAGS["fastmath"])
def _exp_overload(y):
    if y == types.float32:
        return lambda y: _exp_float32(y)
    return lambda y: math.exp(y)


# Constants travel as one small array of the compute dtype, so that every literal has that dtype (a float literal in
# numba is float64, which would promote float32 arithmetic).
K_LO, K_INV_H, K_TOP, K_SLOPE, K_BOTTOM, K_ONE, K_ZERO, N_CONSTANTS = range(8)


def constants(lo: float, inv_h: float, grid_size: int, slope: float, dtype) -> np.ndarray:
    values = np.zeros(N_CONSTANTS, dtype=dtype)
    values[[K_LO, K_INV_H, K_TOP, K_SLOPE, K_BOTTOM, K_ONE]] = lo, inv_h, grid_size + 3, slope, -4.0, 1.0
    return values


@njit(inline="always", **_FLAGS)
def _locate(x, lo, inv_h, bottom, top):
    """(first table entry of x's row, t): the row as in triton_spline._locate, times 4. The constants come as
    scalars read before the loop: read from an array inside it, they would keep LLVM from vectorising (the output
    might alias them)."""
    u = (x - lo) * inv_h
    floor_u = np.floor(u)
    r = min(max(floor_u, bottom), top)
    r = r if floor_u == floor_u else bottom
    return (np.int32(r) + np.int32(4)) * np.int32(4), u - floor_u


@njit(inline="always", **_FLAGS)
def _base(x, base, slope, zero, one):
    """(b(x), b'(x)) for silu (base 0) or leaky_relu (base 1)."""
    if base == 1:
        positive = x > zero
        return (x if positive else x * slope), (one if positive else slope)
    sig = one / (one + _exp(-x))
    b = x * sig
    return b, sig + b * (one - sig)


@njit(inline="always", **_FLAGS)
def _spline(table, e, t):
    """The spline on table row ``e`` (its first entry) at local coordinate t, by Horner's rule."""
    return table[e] + (table[e + 1] + (table[e + 2] + table[e + 3] * t) * t) * t


@njit(inline="always", **_FLAGS)
def _spline_slope(table, e, t, two, three):
    """dS/du on table row ``e`` at t (times inv_h: dS/dx)."""
    return table[e + 1] + (two * table[e + 2] + three * table[e + 3] * t) * t


@njit(**_FLAGS)
def _phi_segment(xs, out, table, wb, k, base, rows, ts):
    """phi of a 1-D segment (contiguous or strided), CHUNK values at a time."""
    n = xs.shape[0]
    lo, inv_h, bottom, top = k[K_LO], k[K_INV_H], k[K_BOTTOM], k[K_TOP]
    slope, zero, one = k[K_SLOPE], k[K_ZERO], k[K_ONE]
    for s in range(0, n, CHUNK):
        m = min(n - s, CHUNK)
        xc = xs[s:s + m]
        oc = out[s:s + m]
        for j in range(m):  # vectorised: no table access
            x = xc[j]
            e, t = _locate(x, lo, inv_h, bottom, top)
            rows[j] = e
            ts[j] = t
            oc[j] = wb * _base(x, base, slope, zero, one)[0]
        for j in range(m):  # the table row of each value
            oc[j] += _spline(table, rows[j], ts[j])


@njit(**_FLAGS)
def _grad_segment(xs, gs, gxs, phis, table, wb, k, base, exact, need_x, need_params, need_phi, acc, rows, ts, wq,
                  gq, gxq, pq):
    """dL/dx of a segment into gxs (need_x), its table-gradient cells into ``acc`` (COPIES interleaved copies of
    4 x rows, need_params) and phi into phis (need_phi: the recomputed phi that the layer's weight gradient needs,
    in the same pass); returns its sum g b(x).

    The first loop computes everything, needed or not, into scratch: rows, ts, gq (g), gxq (the base part of
    dL/dx), pq (the base part of phi) and wq (g (1, t, t^2, t^3), the value's four table-gradient cells side by
    side, which the scatter adds as one 4-wide vector): a store that depends on a flag would keep it from
    vectorising. The second loops add the table row's part and write what is needed."""
    n = xs.shape[0]
    lo, inv_h, bottom, top = k[K_LO], k[K_INV_H], k[K_BOTTOM], k[K_TOP]
    slope, zero, one = k[K_SLOPE], k[K_ZERO], k[K_ONE]
    two = one + one
    three = two + one
    acc_wb = zero
    stride = acc.shape[0] // COPIES
    for s in range(0, n, CHUNK):
        m = min(n - s, CHUNK)
        xc = xs[s:s + m]
        gc = gs[s:s + m]
        for j in range(m):  # vectorised: no table access, no condition
            x = xc[j]
            g = gc[j]
            e, t = _locate(x, lo, inv_h, bottom, top)
            b, db = _base(x, base, slope, zero, one)
            rows[j] = e
            ts[j] = t
            gq[j] = g
            gxq[j] = g * (wb * db)
            pq[j] = wb * b
            acc_wb += g * b
            q = 4 * j
            gt = g * t
            wq[q] = g
            wq[q + 1] = gt
            gt = gt * t
            wq[q + 2] = gt
            wq[q + 3] = gt * t
        if need_x:
            gxc = gxs[s:s + m]
            if exact:
                for j in range(m):
                    gxc[j] = gxq[j] + gq[j] * (_spline_slope(table, rows[j], ts[j], two, three) * inv_h)
            else:
                gxc[:] = gxq[:m]
        if need_params:
            for j in range(m):
                _add4(acc, rows[j] + (j & (COPIES - 1)) * stride, wq, 4 * j)
        if need_phi:
            pc = phis[s:s + m]
            for j in range(m):
                pc[j] = pq[j] + _spline(table, rows[j], ts[j])
    return acc_wb


@njit(inline="always", **_FLAGS)
def _unit_segments(u, A, C, B, a_block, n_a_blocks, b_block, n_b_blocks):
    """(spline c, planes a0..a1, positions b0..b1) of unit u; units are ordered by spline first."""
    per_spline = n_a_blocks * n_b_blocks
    c = u // per_spline
    rest = u - c * per_spline
    ab = rest // n_b_blocks
    bb = rest - ab * n_b_blocks
    a0 = ab * a_block
    b0 = bb * b_block
    return c, a0, min(A, a0 + a_block), b0, min(B, b0 + b_block)


@njit(**_FLAGS)
def phi_units(x3, out3, tables, wbs, k, base, u0, u1, a_block, n_a_blocks, b_block, n_b_blocks):
    """phi for units u0..u1 of the (A, C, B) arrays x3 -> out3; tables (C, rows * 4), wbs (C,)."""
    A, C, B = x3.shape
    rows = np.empty(CHUNK, np.int32)
    ts = np.empty(CHUNK, x3.dtype)
    xf = x3.reshape(A * C * B)
    of = out3.reshape(A * C * B)
    for u in range(u0, u1):
        c, a0, a1, b0, b1 = _unit_segments(u, A, C, B, a_block, n_a_blocks, b_block, n_b_blocks)
        table = tables[c]
        if B == 1:  # channels fastest in memory (channels_last): one strided segment of the unit's planes
            _phi_segment(xf[a0 * C + c:a1 * C:C], of[a0 * C + c:a1 * C:C], table, wbs[c], k, base, rows, ts)
        else:
            for a in range(a0, a1):
                o = (a * C + c) * B
                _phi_segment(xf[o + b0:o + b1], of[o + b0:o + b1], table, wbs[c], k, base, rows, ts)


@njit(**_FLAGS)
def grad_units(x3, g3, gx3, phi3, tables, wbs, k, base, exact, need_x, need_params, need_phi, part_table, part_wb,
               u0, u1, a_block, n_a_blocks, b_block, n_b_blocks):
    """Gradients for units u0..u1: dL/dx into gx3 (need_x), each unit's table-gradient and sum g b(x) partials
    into part_table[u] (rows * 4) and part_wb[u] (need_params), and phi into phi3 (need_phi). gx3 and phi3 are
    arrays of x3's shape or, when not needed, one-value placeholders that are never written."""
    A, C, B = x3.shape
    cells = tables.shape[1]
    acc = np.empty(COPIES * cells, x3.dtype)
    rows = np.empty(CHUNK, np.int32)
    ts = np.empty(CHUNK, x3.dtype)
    wq = np.empty(4 * CHUNK, x3.dtype)
    gq = np.empty(CHUNK, x3.dtype)
    gxq = np.empty(CHUNK, x3.dtype)
    pq = np.empty(CHUNK, x3.dtype)
    xf = x3.reshape(A * C * B)
    gf = g3.reshape(A * C * B)
    gxf = gx3.reshape(gx3.size)
    pf = phi3.reshape(phi3.size)
    if not need_x:
        gxf = gxf[:0]
    if not need_phi:
        pf = pf[:0]
    for u in range(u0, u1):
        c, a0, a1, b0, b1 = _unit_segments(u, A, C, B, a_block, n_a_blocks, b_block, n_b_blocks)
        table = tables[c]
        acc[:] = 0
        wb_sum = k[K_ZERO]
        if B == 1:  # channels_last: one strided segment
            s0, s1 = a0 * C + c, a1 * C
            wb_sum += _grad_segment(xf[s0:s1:C], gf[s0:s1:C], gxf[s0:s1:C], pf[s0:s1:C], table, wbs[c], k, base,
                                    exact, need_x, need_params, need_phi, acc, rows, ts, wq, gq, gxq, pq)
        else:
            for a in range(a0, a1):
                o = (a * C + c) * B
                wb_sum += _grad_segment(xf[o + b0:o + b1], gf[o + b0:o + b1], gxf[o + b0:o + b1],
                                        pf[o + b0:o + b1], table, wbs[c], k, base, exact, need_x, need_params,
                                        need_phi, acc, rows, ts, wq, gq, gxq, pq)
        if need_params:
            for q in range(cells):
                total = acc[q]
                for copy in range(1, COPIES):
                    total += acc[copy * cells + q]
                part_table[u, q] = total
            part_wb[u] = wb_sum


@njit(**_FLAGS)
def reduce_partials(part_table, part_wb, n_splines, out_table, out_wb):
    """Sum each spline's unit partials in unit order (units are ordered by spline)."""
    per_spline = part_table.shape[0] // n_splines
    for c in range(n_splines):
        out_table[c, :] = 0
        out_wb[c] = 0
        for u in range(c * per_spline, (c + 1) * per_spline):
            out_table[c, :] += part_table[u, :]
            out_wb[c] += part_wb[u]


# ---------------------------------------------------------------------------------------------------------------
# Units and threads


def units_for(shape3) -> tuple[int, int, int, int, int]:
    """(number of units, a_block, n_a_blocks, b_block, n_b_blocks) for an (A, C, B) view: a function of the shape
    only, so the partial sums, and the gradients, do not depend on the thread count."""
    A, C, B = shape3
    if B >= UNIT_VALUES:
        a_block, b_block = 1, UNIT_VALUES
    else:
        a_block, b_block = max(1, UNIT_VALUES // max(B, 1)), max(B, 1)
    n_a_blocks = max(1, -(-A // a_block))
    n_b_blocks = max(1, -(-B // b_block))
    return C * n_a_blocks * n_b_blocks, a_block, n_a_blocks, b_block, n_b_blocks


_POOL: dict = {}
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads for this process (a forked child, e.g. a data-augmentation worker, makes its
    own: threads do not survive fork)."""
    key = (os.getpid(), workers)
    with _POOL_LOCK:
        pool = _POOL.get(key)
        if pool is None:
            _POOL.clear()
            pool = _POOL[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="allukan-spline")
    return pool


def split_units(n_units: int, numel: int, threads: int) -> list[tuple[int, int]]:
    """Contiguous unit ranges, one per thread used (never more threads than pay for themselves)."""
    workers = max(1, min(threads, n_units, numel // MIN_VALUES_PER_THREAD))
    step = -(-n_units // workers)
    return [(u, min(n_units, u + step)) for u in range(0, n_units, step)]


def run_ranges(call, ranges):
    """call(u0, u1) for every range: the first in this thread, the others on the pool; re-raises their errors."""
    if len(ranges) == 1:
        call(*ranges[0])
        return
    futures = [_pool(len(ranges) - 1).submit(call, *r) for r in ranges[1:]]
    try:
        call(*ranges[0])
    finally:
        for f in futures:
            f.result()


# ---------------------------------------------------------------------------------------------------------------
# Entry points on torch tensors (the custom ops of cpu_ops call these)


def _arrays(*tensors):
    return [t.detach().numpy() for t in tensors]


def phi(x3, table, base_weight, lo: float, inv_h: float, base: str, slope: float, out3, threads: int):
    """Write phi(x3) into out3. x3, out3: contiguous (A, C, B) CPU tensors of the table's dtype (float32/64);
    table: (C, G + 8, 4); base_weight: (C,)."""
    if x3.numel() == 0:
        return out3
    x, out, tables, wbs = _arrays(x3, out3, table.reshape(table.shape[0], -1), base_weight)
    k = constants(lo, inv_h, table.shape[1] - EXTRA_ROWS, slope, x.dtype)
    n_units, *geometry = units_for(x.shape)
    code = BASE_CODES[base]
    run_ranges(lambda u0, u1: phi_units(x, out, tables, wbs, k, code, u0, u1, *geometry),
               split_units(n_units, x.size, threads))
    return out3


def phi_grads(x3, g3, table, base_weight, lo: float, inv_h: float, base: str, slope: float, exact: bool, gx3,
              need_params: bool, threads: int, phi3=None):
    """Write dL/dx into gx3 (when given) and phi(x3) into phi3 (when given), and return (dL/dtable,
    dL/dbase_weight) (None unless need_params). g3 is dL/dphi in x3's layout and dtype."""
    import torch

    need_x = gx3 is not None
    C = table.shape[0]
    grad_table = torch.zeros_like(table) if need_params else None
    grad_wb = torch.zeros_like(base_weight) if need_params else None
    need_phi = phi3 is not None
    if x3.numel() == 0 or not (need_x or need_params or need_phi):
        return grad_table, grad_wb
    x, g, tables, wbs = _arrays(x3, g3, table.reshape(C, -1), base_weight)
    # An output that is not needed is a one-value placeholder of its own (never written): were it x, the
    # vectoriser's run-time overlap check would fail and every chunk would run the scalar loop.
    gx = gx3.detach().numpy() if need_x else np.empty(1, x.dtype)
    phi_out = phi3.detach().numpy() if need_phi else np.empty(1, x.dtype)
    k = constants(lo, inv_h, table.shape[1] - EXTRA_ROWS, slope, x.dtype)
    n_units, *geometry = units_for(x.shape)
    cells = tables.shape[1]
    part_table = np.empty((n_units if need_params else 0, cells), x.dtype)
    part_wb = np.empty(n_units if need_params else 0, x.dtype)
    code = BASE_CODES[base]
    run_ranges(lambda u0, u1: grad_units(x, g, gx, phi_out, tables, wbs, k, code, exact, need_x, need_params,
                                         need_phi, part_table, part_wb, u0, u1, *geometry),
               split_units(n_units, x.size, threads))
    if need_params:
        out_table, out_wb = _arrays(grad_table.view(C, -1), grad_wb)
        reduce_partials(part_table, part_wb, C, out_table, out_wb)
    return grad_table, grad_wb
