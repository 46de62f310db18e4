"""Uniform cubic B-spline math for the shared spline activation.

Everything here is plain PyTorch and knows nothing of nnU-Net.

Conventions (DESIGN.md §2): ``G`` intervals on ``[lo, hi]``, spline order 3, ``h = (hi - lo) / G``,
``nb = G + 3`` basis functions. With ``u = (x - lo) / h`` the basis ``B_j`` is the cardinal cubic
B-spline centred at ``u = j - 1`` (support ``[j - 3, j + 1]``), so every basis vanishes outside the
extended grid ``[lo - 3h, hi + 3h]``.

Two evaluation strategies:

* the *interval table* (``spline_table``): for interval ``i = floor(u)`` the spline is one cubic
  polynomial in ``t = u - i``. Four gathers and Horner beat evaluating ``nb`` bases per value (every
  elementwise op is a pass over memory), and under ``torch.compile`` it is ~20 ops per layer instead of
  ~300. The KA layers' custom autograd Functions use it;
* the *on-the-fly sum* (``spline_on_the_fly``): ``sum_j c_j B_j(u)`` with no indexing at all, differentiable
  by plain autograd: the ``impl="plain"`` activation, and the independent reference in the tests.
"""
from __future__ import annotations

import math

import torch

SPLINE_ORDER = 3

# Rows k: the cubic pieces of the four bases that are non-zero on one interval, as polynomial
# coefficients in t (columns: 1, t, t^2, t^3). Row 0 belongs to basis i (its last piece), row 3 to
# basis i + 3 (its first piece).
_PIECE_POLYNOMIALS = (
    (1.0, -3.0, 3.0, -1.0),
    (4.0, 0.0, -6.0, 3.0),
    (1.0, 3.0, 3.0, -3.0),
    (0.0, 0.0, 0.0, 1.0),
)


def validate_grid(grid_size, grid_range) -> tuple[float, float]:
    """Check a spline grid and return ``(lo, hi)`` as floats; ValueError names the bad argument."""
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size must be an integer >= 1, got {grid_size!r}")
    try:
        lo, hi = (float(v) for v in grid_range)
    except (TypeError, ValueError):
        raise ValueError(f"grid_range must be a pair (lo, hi) of numbers, got {grid_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"grid_range must satisfy lo < hi (both finite), got {grid_range!r}")
    return lo, hi


def num_bases(grid_size: int) -> int:
    return grid_size + SPLINE_ORDER


def cardinal_cubic_bspline(r: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline as a function of the distance ``r >= 0`` from its centre (zero for r >= 2)."""
    inner = (4.0 - 6.0 * r * r + 3.0 * r * r * r) / 6.0
    outer = torch.clamp(2.0 - r, min=0.0) ** 3 / 6.0
    return torch.where(r < 1.0, inner, outer)


def bspline_basis(x: torch.Tensor, grid_size: int, grid_range: tuple[float, float]) -> torch.Tensor:
    """Dense basis ``B(x)`` of shape ``x.shape + (nb,)`` in closed form (for references and plots)."""
    lo, hi = grid_range
    u = (x - lo) * (grid_size / (hi - lo))
    centres = torch.arange(num_bases(grid_size), device=x.device, dtype=x.dtype) - 1.0
    return cardinal_cubic_bspline((u.unsqueeze(-1) - centres).abs())


_PIECE_MATRICES: dict = {}


def _piece_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``_PIECE_POLYNOMIALS / 6`` as a tensor, made once per (dtype, device): building it from Python data on every
    forward of every KA layer was, on CUDA, a host-to-device copy and a stream sync each (~38 per training step).
    Not cached while tracing (torch.compile folds it into the graph) nor when the tensor made holds no memory (a
    fake or meta tensor, e.g. the profiler's FLOP count), and never an inference tensor (a cached one would break a
    later training step)."""
    key = (dtype, device)
    matrix = _PIECE_MATRICES.get(key)
    if matrix is not None:
        return matrix
    if torch.compiler.is_compiling():
        return torch.tensor(_PIECE_POLYNOMIALS, dtype=dtype, device=device) / 6.0
    with torch.inference_mode(False):
        matrix = torch.tensor(_PIECE_POLYNOMIALS, dtype=dtype, device=device) / 6.0
    from torch._subclasses.fake_tensor import is_fake

    if matrix.device.type != "meta" and not is_fake(matrix):
        _PIECE_MATRICES[key] = matrix
    return matrix


def spline_table(coef: torch.Tensor) -> torch.Tensor:
    """Per-interval cubic polynomials of the spline ``sum_j coef[..., j] B_j``.

    ``coef`` has shape ``(C, nb)``. Returns ``(C, G + 8, 4)``: rows ``1 .. G + 6`` are the intervals
    ``i = -3 .. G + 2`` of the extended grid; rows ``0`` and ``G + 7`` are all zero and serve every value below
    and above it, so that a clamp alone finds a value's row.
    Differentiable in ``coef``: gradients reaching the table flow back to the coefficients.
    """
    pieces = _piece_matrix(coef.dtype, coef.device)
    padded = torch.nn.functional.pad(coef, (SPLINE_ORDER, SPLINE_ORDER))
    windows = padded.unfold(-1, SPLINE_ORDER + 1, 1)  # (C, G + 6, 4): c_i .. c_{i+3}
    table = windows @ pieces
    return torch.nn.functional.pad(table, (0, 0, 1, 1))


def coefficients_shape(table: torch.Tensor) -> tuple[int, int]:
    """(C, G + 3) for a table (C, G + 8, 4) of ``spline_table``."""
    return table.shape[0], table.shape[1] - 5


def table_gradient_to_coefficients(grad_table: torch.Tensor) -> torch.Tensor:
    """dL/dcoef from dL/dtable: the transpose of ``spline_table``'s linear map, (C, G + 8, 4) -> (C, G + 3).

    Row ``r`` of the table (interval r - 4) holds ``sum_k coef[r - 4 + k] * pieces[k]``, so each coefficient collects
    the gradient of the four rows it enters, weighted by its piece. The end rows (all zero, for values outside the
    extended grid) depend on no coefficient."""
    pieces = _piece_matrix(grad_table.dtype, grad_table.device)
    windows = grad_table[:, 1:-1, :] @ pieces.t()  # (C, G + 6, 4): the gradient of coefficient r - 4 + k
    n_windows = windows.shape[1]
    padded = windows.new_zeros(windows.shape[0], n_windows + SPLINE_ORDER)
    for k in range(SPLINE_ORDER + 1):
        padded[:, k:k + n_windows] += windows[:, :, k]
    return padded[:, SPLINE_ORDER:-SPLINE_ORDER].clone(memory_format=torch.contiguous_format)


class IntervalLookup:
    """Where each value falls on the grid: flat table row and local coordinate ``t`` in [0, 1)."""

    def __init__(self, x: torch.Tensor, lo: float, inv_h: float, grid_size: int, channel_offsets):
        u = (x - lo) * inv_h
        floor_u = torch.floor(u)
        self.t = u - floor_u
        # Out-of-grid values go to the all-zero first/last row, NaN to the first. int32 rows: half the bytes of
        # int64, and index_select with them is ~2.5x faster than take on the CPU.
        row = torch.nan_to_num(floor_u, nan=-4.0).clamp_(-4.0, grid_size + 3.0).add_(4.0).int()
        if channel_offsets is not None:
            row = row + channel_offsets
        self.row = row

    def gather(self, column: torch.Tensor) -> torch.Tensor:
        return column.index_select(0, self.row.reshape(-1)).view(self.row.shape)


def _horner(lookup: IntervalLookup, columns: list[torch.Tensor]) -> torch.Tensor:
    """``sum_p columns[p][row] * t^p`` evaluated by Horner's rule."""
    acc = lookup.gather(columns[-1])
    for column in reversed(columns[:-1]):
        acc = torch.addcmul(lookup.gather(column), acc, lookup.t)
    return acc


def spline_from_table(lookup: IntervalLookup, table: torch.Tensor) -> torch.Tensor:
    flat = table.reshape(-1, 4)
    return _horner(lookup, [flat[:, p].contiguous() for p in range(4)])


def spline_slope_from_table(lookup: IntervalLookup, table: torch.Tensor, inv_h: float) -> torch.Tensor:
    """dS/dx from the same table: (a1 + 2 a2 t + 3 a3 t^2) / h."""
    flat = table.reshape(-1, 4)
    return _horner(lookup, [(flat[:, p] * (p * inv_h)).contiguous() for p in range(1, 4)])


def accumulate_table_gradient(lookup: IntervalLookup, grad: torch.Tensor, out: torch.Tensor):
    """Add one piece's table gradient to ``out`` of shape (4, table rows): row p holds the t^p column."""
    row = lookup.row.reshape(-1).long()  # scatter_add_ takes int64 indices (and beats int32 index_add_ here)
    weighted = grad
    for p in range(4):
        if p:
            weighted = weighted * lookup.t
        out[p].scatter_add_(0, row, weighted.reshape(-1))


def spline_on_the_fly(u: torch.Tensor, coef_columns: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j c_j B_j(u)`` with each basis evaluated in closed form; no gathers, so it fuses under compile."""
    out = None
    for j, c in enumerate(coef_columns):
        term = c * cardinal_cubic_bspline((u - (j - 1.0)).abs())
        out = term if out is None else out + term
    return out


class MemoryLayout:
    """``x`` seen in memory order as a contiguous ``(A, C, B)`` tensor: channel ``C`` between everything slower
    (``A``) and everything faster (``B``) in memory. Both evaluation paths of the activation work on this view, so
    channels_last inputs need no copy and outputs keep the input's strides.

    ``channel_dim=None`` (one spline for the layer): ``(1, 1, numel)``. ``n_splines`` fewer than the channels (a
    spline per group of consecutive channels, ``share="group"``): ``(A, n_splines, C / n_splines * B)``, a view
    too, because the channels of a group are neighbours in memory order. An input that is not dense (a strided
    slice, an expanded tensor) is copied to contiguous first.
    """

    def __init__(self, x: torch.Tensor, channel_dim: int | None, n_splines: int | None = None):
        perm = _dense_permutation(x)
        if perm is None:
            x, perm = x.contiguous(), tuple(range(x.dim()))
        self.x, self.perm = x, perm
        shape = [x.shape[d] for d in perm]
        if channel_dim is None or x.dim() == 0:
            self.shape3 = (1, 1, x.numel())
        else:
            pos = perm.index(channel_dim % x.dim())
            a, c, b = math.prod(shape[:pos]), shape[pos], math.prod(shape[pos + 1:])
            if n_splines is not None and n_splines != c:
                if n_splines < 1 or c % n_splines:
                    raise ValueError(f"{n_splines} splines cannot share {c} channels in equal groups")
                c, b = n_splines, c // n_splines * b
            self.shape3 = (a, c, b)

    def view3(self, t: torch.Tensor) -> torch.Tensor:
        """The ``(A, C, B)`` view of a tensor laid out like ``self.x`` (``like`` or ``empty`` made it)."""
        return t.permute(self.perm).view(self.shape3)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (same shape as x) in x's layout: itself when it already is, else a copy (e.g. an expanded grad)."""
        if t.stride() == self.x.stride() or t.permute(self.perm).is_contiguous():
            return t
        return self.empty(t.dtype).copy_(t)

    def empty(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty_like(self.x, dtype=dtype)


def _dense_permutation(x: torch.Tensor):
    """Dimension order from slowest to fastest in memory if ``x`` is dense (e.g. channels_last), else None."""
    if x.is_contiguous():
        return tuple(range(x.dim()))
    perm = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))  # stable: size-1 ties keep their order
    return perm if x.permute(perm).is_contiguous() else None
