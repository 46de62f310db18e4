"""The numba CPU kernels (``cpu_spline``) on torch tensors: the work cut into units, run on threads, and registered as
``torch.library`` custom ops: ``torch.ops.allukan.spline_phi_cpu`` and ``torch.ops.allukan.spline_phi_backward_cpu``,
the CPU twins of ``ops`` (Triton).

Threads: the units are spread over a small pool of Python threads sized by ``torch.get_num_threads()`` (so
nnU-Net's and the demo's thread settings apply), the calling thread taking the first share; a forked child (an
augmentation worker) makes its own pool. The partial sums are per unit, and units are a function of the shape only,
so the gradients are bitwise the same at any thread count.

One opaque node each for ``torch.compile`` (with a fake implementation for shapes). Inputs may have any layout
(outputs follow ``x``'s, ``spline.MemoryLayout``) and any float dtype: the kernels compute in the table's dtype
(float32 or float64), so half-precision inputs and gradients are converted to it first (CPU autocast only).
The thread count is read per call from ``torch.get_num_threads()``.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from .. import spline
from . import cpu_spline

UNIT_VALUES = 1 << 15  # about this many values per unit of work (and per partial sum)
MIN_VALUES_PER_THREAD = 1 << 15  # below this a second thread costs more than it saves


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


def _arrays(*tensors):
    return [t.detach().numpy() for t in tensors]


def table_columns(table) -> np.ndarray:
    """The tables (C, rows, 4) as four 16-entry columns per spline, (C, 64) float32, rows past the table zero, for
    the permute path (``_spline_lanes``); (C, 0) where it does not apply (float64, more than 16 rows, no
    AVX-512), which sends every value to the scalar path."""
    C, n_rows, _ = table.shape
    values = table.detach().numpy()
    if not (cpu_spline.HOST_HAS_AVX512 and table.dtype == torch.float32 and n_rows <= cpu_spline.LANES):
        return np.zeros((C, 0), dtype=values.dtype)
    columns = np.zeros((C, 4, cpu_spline.LANES), dtype=np.float32)
    columns[:, :, :n_rows] = values.transpose(0, 2, 1)
    return columns.reshape(C, 4 * cpu_spline.LANES)


def _spline_arguments(x: np.ndarray, table, base_weight, lo: float, inv_h: float, base: str, slope: float):
    """What both kernels take about the spline, after the data: (tables (C, rows * 4), columns, base weights,
    constants, base code)."""
    tables, wbs = _arrays(table.reshape(table.shape[0], -1), base_weight)
    k = cpu_spline.constants(lo, inv_h, table.shape[1] - cpu_spline.EXTRA_ROWS, slope, x.dtype)
    return tables, table_columns(table), wbs, k, cpu_spline.BASE_CODES[base]


def run_phi(x3, table, base_weight, lo: float, inv_h: float, base: str, slope: float, out3, threads: int):
    """Write phi(x3) into out3. x3, out3: contiguous (A, C, B) CPU tensors of the table's dtype (float32/64);
    table: (C, G + 8, 4); base_weight: (C,)."""
    if x3.numel() == 0:
        return out3
    x, out = _arrays(x3, out3)
    spline_args = _spline_arguments(x, table, base_weight, lo, inv_h, base, slope)
    n_units, *geometry = units_for(x.shape)
    run_ranges(lambda u0, u1: cpu_spline.phi_units(x, out, *spline_args, u0, u1, *geometry),
               split_units(n_units, x.size, threads))
    return out3


def run_phi_grads(x3, g3, table, base_weight, lo: float, inv_h: float, base: str, slope: float, exact: bool, gx3,
                  need_params: bool, threads: int, phi3=None):
    """Write dL/dx into gx3 (when given) and phi(x3) into phi3 (when given), and return (dL/dtable,
    dL/dbase_weight) (None unless need_params). g3 is dL/dphi in x3's layout and dtype."""
    need_x, need_phi = gx3 is not None, phi3 is not None
    C = table.shape[0]
    grad_table = torch.zeros_like(table) if need_params else None
    grad_wb = torch.zeros_like(base_weight) if need_params else None
    if x3.numel() == 0 or not (need_x or need_params or need_phi):
        return grad_table, grad_wb
    x, g = _arrays(x3, g3)
    # An output that is not needed is a one-value placeholder of its own (never written): were it x, the
    # vectoriser's run-time overlap check would fail and every chunk would run the scalar loop.
    gx = gx3.detach().numpy() if need_x else np.empty(1, x.dtype)
    phi_out = phi3.detach().numpy() if need_phi else np.empty(1, x.dtype)
    spline_args = _spline_arguments(x, table, base_weight, lo, inv_h, base, slope)
    n_units, *geometry = units_for(x.shape)
    part_table = np.empty((n_units if need_params else 0, spline_args[0].shape[1]), x.dtype)
    part_wb = np.empty(n_units if need_params else 0, x.dtype)
    run_ranges(lambda u0, u1: cpu_spline.grad_units(x, g, gx, phi_out, *spline_args, exact, need_x, need_params,
                                                    need_phi, part_table, part_wb, u0, u1, *geometry),
               split_units(n_units, x.size, threads))
    if need_params:
        out_table, out_wb = _arrays(grad_table.view(C, -1), grad_wb)
        cpu_spline.reduce_partials(part_table, part_wb, C, out_table, out_wb)
    return grad_table, grad_wb


def _compute_view(layout: spline.MemoryLayout, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (A, C, B) view of ``t`` (laid out like x) in the compute dtype."""
    return layout.view3(layout.like(t) if t.dtype == dtype else layout.like(t).to(dtype))


@torch.library.custom_op("allukan::spline_phi_cpu", mutates_args=(), device_types="cpu")
def spline_phi_cpu(x: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor, lo: float, inv_h: float,
                   channel_dim: Optional[int], base: str, leaky_slope: float, dtype: torch.dtype) -> torch.Tensor:
    """phi(x) in ``dtype``; math in the table's dtype (see ``ops.spline_phi``)."""
    layout = spline.MemoryLayout(x, channel_dim, table.shape[0])
    compute = table.dtype
    out = layout.empty(compute)
    run_phi(_compute_view(layout, layout.x, compute), table.contiguous(), base_weight.contiguous(), lo, inv_h,
                   base, leaky_slope, layout.view3(out), torch.get_num_threads())
    return out if dtype == compute else out.to(dtype)


@spline_phi_cpu.register_fake
def _(x, table, base_weight, lo, inv_h, channel_dim, base, leaky_slope, dtype):
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("allukan::spline_phi_backward_cpu", mutates_args=(), device_types="cpu")
def spline_phi_backward_cpu(x: torch.Tensor, grad_phi: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor,
                            lo: float, inv_h: float, channel_dim: Optional[int], base: str, leaky_slope: float,
                            exact: bool, need_x: bool, need_params: bool, phi_dtype: Optional[torch.dtype] = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx in x's dtype, dL/dcoefficients (C, G + 3), dL/dbase_weight, phi(x) in ``phi_dtype``); an output
    that is not needed is an empty tensor, phi among them when ``phi_dtype`` is None. (The kernels sum the table
    gradient, 4 x (G + 8) cells per spline; ``spline.table_gradient_to_coefficients`` maps it to the coefficients.)
    phi comes from the same pass over x: a KA layer's backward needs it for its weight gradient, and the conv's
    input gradient (``grad_phi``) does not need it."""
    layout = spline.MemoryLayout(x, channel_dim, table.shape[0])
    compute = table.dtype
    grad_x = layout.empty(compute) if need_x else None
    phi = layout.empty(compute) if phi_dtype is not None else None
    grad_table, grad_wb = run_phi_grads(
        _compute_view(layout, layout.x, compute), _compute_view(layout, grad_phi, compute), table.contiguous(),
        base_weight.contiguous(), lo, inv_h, base, leaky_slope, exact,
        layout.view3(grad_x) if need_x else None, need_params, torch.get_num_threads(),
        layout.view3(phi) if phi is not None else None)
    if grad_x is None:
        grad_x = x.new_empty(0)
    elif grad_x.dtype != x.dtype:
        grad_x = grad_x.to(x.dtype)
    if phi is None:
        phi = x.new_empty(0)
    elif phi.dtype != phi_dtype:
        phi = phi.to(phi_dtype)
    if not need_params:
        return grad_x, table.new_empty(0), base_weight.new_empty(0), phi
    return grad_x, spline.table_gradient_to_coefficients(grad_table), grad_wb, phi


@spline_phi_backward_cpu.register_fake
def _(x, grad_phi, table, base_weight, lo, inv_h, channel_dim, base, leaky_slope, exact, need_x, need_params,
      phi_dtype=None):
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    phi = torch.empty_like(x, dtype=phi_dtype) if phi_dtype is not None else x.new_empty(0)
    if need_params:
        return grad_x, table.new_empty(spline.coefficients_shape(table)), torch.empty_like(base_weight), phi
    return grad_x, table.new_empty(0), base_weight.new_empty(0), phi


def smoke_test():
    """Compile (or load from numba's cache) the float32 kernels and check them on a few values against the
    closed-form spline; raises if they disagree (``kernels.cpu_kernels_available`` then falls back). numpy only: it
    may run inside a FakeTensorMode or a meta-device context (a network built for FLOP counting), where torch
    tensors hold no values."""
    lo, hi, grid = -3.0, 3.0, 5
    inv_h = grid / (hi - lo)
    x = np.linspace(-5.0, 5.0, 41, dtype=np.float32)
    coef = np.linspace(-1.0, 1.0, grid + 3)
    pieces = np.array(spline._PIECE_POLYNOMIALS) / 6.0
    padded = np.concatenate([np.zeros(3), coef, np.zeros(3)])
    table = np.zeros((grid + cpu_spline.EXTRA_ROWS, 4))
    table[1:-1] = np.stack([padded[i:i + 4] for i in range(grid + 6)]) @ pieces
    tables = table.reshape(1, -1).astype(np.float32)
    columns = np.zeros((1, 0), np.float32)
    if cpu_spline.HOST_HAS_AVX512:
        columns = np.zeros((1, 4, cpu_spline.LANES), np.float32)
        columns[0, :, :table.shape[0]] = table.T
        columns = columns.reshape(1, -1)
    wbs = np.ones(1, np.float32)
    k = cpu_spline.constants(lo, inv_h, grid, 0.01, np.float32)
    x3 = x.reshape(1, 1, -1)
    n_units, *geometry = units_for(x3.shape)
    phi = np.empty_like(x3)
    cpu_spline.phi_units(x3, phi, tables, columns, wbs, k, 0, 0, n_units, *geometry)
    grad_x, phi_again = np.empty_like(x3), np.empty_like(x3)
    part_table = np.empty((n_units, tables.shape[1]), np.float32)
    part_wb = np.empty(n_units, np.float32)
    cpu_spline.grad_units(x3, np.ones_like(x3), grad_x, phi_again, tables, columns, wbs, k, 0, True, True, True,
                          True, part_table, part_wb, 0, n_units, *geometry)
    u = (x.astype(np.float64) - lo) * inv_h
    r = np.abs(u[:, None] - (np.arange(grid + 3) - 1.0))
    basis = np.where(r < 1, (4 - 6 * r ** 2 + 3 * r ** 3) / 6, np.clip(2 - r, 0, None) ** 3 / 6)
    r_slope = u[:, None] - (np.arange(grid + 3) - 1.0)
    slope = np.where(np.abs(r_slope) < 1, (-12 * r_slope + 9 * r_slope * np.abs(r_slope)) / 6,
                     -np.sign(r_slope) * np.clip(2 - np.abs(r_slope), 0, None) ** 2 / 2) * inv_h
    sig = 1 / (1 + np.exp(-x.astype(np.float64)))
    silu = x * sig
    checks = {"phi": (phi.ravel(), silu + basis @ coef), "phi in backward": (phi_again.ravel(), silu + basis @ coef),
              "dphi/dx": (grad_x.ravel(), sig + silu * (1 - sig) + slope @ coef), "dphi/dw_b": (part_wb, silu.sum())}
    for name, (got, want) in checks.items():
        if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"the CPU kernels' {name} disagrees with the closed form by "
                               f"{np.abs(got - want).max():.3g}")
