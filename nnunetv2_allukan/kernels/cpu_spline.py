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

Threads: the kernels release the GIL (``nogil``) and each runs serially over a range of units; ``cpu_ops`` spreads
the units over a small pool of Python threads sized by ``torch.get_num_threads()``. numba's own ``parallel=True``
is not used: its default threading layer (workqueue) terminates the process when two threads enter a parallel
region at once, and its parallel loops did not vectorise here.

This module holds the numba code only (no torch); ``cpu_ops`` cuts the work into units, runs it on threads and
registers the custom ops.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

CHUNK = 512  # values per inner chunk: the scratch arrays of a chunk stay in L1
COPIES = 4  # interleaved copies of the table-gradient cells in the scatter loop
EXTRA_ROWS = 8  # table rows beyond the G intervals (spline.spline_table)
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


def _host_has_avx512() -> bool:
    """Whether the CPU numba compiles for has AVX-512F (numba compiles for the host, and its on-disk cache is keyed
    by the host CPU and its features, so code compiled here never runs on a CPU without them)."""
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("avx512f", False))
    except Exception:  # no way to tell: the portable path
        return False


HOST_HAS_AVX512 = _host_has_avx512()
LANES = 16  # float32 lanes of an AVX-512 register: table rows a permute can look up at once


@intrinsic
def _spline_lanes(typingctx, columns, rows, ts, base_part, out, n):
    """out[j] = base_part[j] + S(rows[j], ts[j]) for the first ``n - n % 16`` values, 16 at a time, and returns that
    count (the caller does the rest, and everything when it returns 0). ``columns`` is the spline's table as four
    16-entry columns (float32, (4, 16), rows past the table zero): each column is looked up for 16 values by one
    AVX-512 permute (vpermps), where the scalar loop spends 4 loads per value. float32 on AVX-512 hosts only;
    elsewhere it does nothing and returns 0."""
    sig = types.intp(columns, rows, ts, base_part, out, n)

    def codegen(context, builder, signature, args):
        intp = context.get_value_type(types.intp)
        if not (HOST_HAS_AVX512 and signature.args[0].dtype == types.float32 and signature.args[4].layout == "C"):
            return ir.Constant(intp, 0)  # no AVX-512, float64, or a strided output (channels_last planes)
        from numba.core import cgutils

        f32, i32 = ir.FloatType(), ir.IntType(32)
        fvec, ivec = ir.VectorType(f32, LANES), ir.VectorType(i32, LANES)
        permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(fvec, [fvec, ivec]),
                                                 "llvm.x86.avx512.permvar.sf.512")
        column = [builder.load(_vector_pointer(context, builder, signature.args[0], args[0],
                                               ir.Constant(intp, p * LANES), LANES), align=4) for p in range(4)]
        n_value = args[5]
        if n_value.type.width < intp.width:
            n_value = builder.sext(n_value, intp)
        blocks = builder.sdiv(n_value, ir.Constant(intp, LANES))
        two = ir.Constant(ivec, [2] * LANES)
        with cgutils.for_range(builder, blocks) as loop:
            j = builder.mul(loop.index, ir.Constant(intp, LANES))
            row = builder.ashr(builder.load(_vector_pointer(context, builder, signature.args[1], args[1], j, LANES),
                                            align=4), two)  # first table entry / 4: the row
            t = builder.load(_vector_pointer(context, builder, signature.args[2], args[2], j, LANES), align=4)
            a = [builder.call(permute, [column[p], row]) for p in range(4)]
            spline = builder.fadd(a[0], builder.fmul(t, builder.fadd(a[1], builder.fmul(
                t, builder.fadd(a[2], builder.fmul(t, a[3]))))))
            base_value = builder.load(_vector_pointer(context, builder, signature.args[3], args[3], j, LANES),
                                      align=4)
            builder.store(builder.fadd(base_value, spline),
                          _vector_pointer(context, builder, signature.args[4], args[4], j, LANES), align=4)
        return builder.mul(blocks, ir.Constant(intp, LANES))

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


@njit(inline="always", **_FLAGS)
def _add_spline(table, columns, rows, ts, base_part, out, m):
    """out[j] = base_part[j] + S(rows[j], ts[j]) for j < m: 16 at a time by permutes where the host allows
    (``_spline_lanes``), the rest by scalar loads of the table row."""
    done = _spline_lanes(columns, rows, ts, base_part, out, m) if columns.shape[0] == 4 * LANES else 0
    for j in range(done, m):
        out[j] = base_part[j] + _spline(table, rows[j], ts[j])


@njit(**_FLAGS)
def _phi_segment(xs, out, table, columns, wb, k, base, rows, ts, pq):
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
            pq[j] = wb * _base(x, base, slope, zero, one)[0]
        _add_spline(table, columns, rows, ts, pq, oc, m)


@njit(**_FLAGS)
def _grad_segment(xs, gs, gxs, phis, table, columns, wb, k, base, exact, need_x, need_params, need_phi, acc, rows,
                  ts, wq, gq, gxq, pq):
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
            _add_spline(table, columns, rows, ts, pq, phis[s:s + m], m)
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
def phi_units(x3, out3, tables, columns, wbs, k, base, u0, u1, a_block, n_a_blocks, b_block, n_b_blocks):
    """phi for units u0..u1 of the (A, C, B) arrays x3 -> out3; tables (C, rows * 4), columns (C, 64) or (C, 0)
    (``table_columns``), wbs (C,)."""
    A, C, B = x3.shape
    rows = np.empty(CHUNK, np.int32)
    ts = np.empty(CHUNK, x3.dtype)
    pq = np.empty(CHUNK, x3.dtype)
    xf = x3.reshape(A * C * B)
    of = out3.reshape(A * C * B)
    for u in range(u0, u1):
        c, a0, a1, b0, b1 = _unit_segments(u, A, C, B, a_block, n_a_blocks, b_block, n_b_blocks)
        table = tables[c]
        if B == 1:  # channels fastest in memory (channels_last): one strided segment of the unit's planes
            _phi_segment(xf[a0 * C + c:a1 * C:C], of[a0 * C + c:a1 * C:C], table, columns[c], wbs[c], k, base, rows, ts,
                         pq)
        else:
            for a in range(a0, a1):
                o = (a * C + c) * B
                _phi_segment(xf[o + b0:o + b1], of[o + b0:o + b1], table, columns[c], wbs[c], k, base, rows, ts, pq)


@njit(**_FLAGS)
def grad_units(x3, g3, gx3, phi3, tables, columns, wbs, k, base, exact, need_x, need_params, need_phi, part_table,
               part_wb, u0, u1, a_block, n_a_blocks, b_block, n_b_blocks):
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
            wb_sum += _grad_segment(xf[s0:s1:C], gf[s0:s1:C], gxf[s0:s1:C], pf[s0:s1:C], table, columns[c], wbs[c],
                                    k, base, exact, need_x, need_params, need_phi, acc, rows, ts, wq, gq, gxq, pq)
        else:
            for a in range(a0, a1):
                o = (a * C + c) * B
                wb_sum += _grad_segment(xf[o + b0:o + b1], gf[o + b0:o + b1], gxf[o + b0:o + b1],
                                        pf[o + b0:o + b1], table, columns[c], wbs[c], k, base, exact, need_x,
                                        need_params, need_phi, acc, rows, ts, wq, gq, gxq, pq)
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
