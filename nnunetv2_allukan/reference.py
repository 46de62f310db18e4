"""Reference per-edge KAN (efficient-kan style), written from the math.

This is the status quo the paper compares against (the "directly stacked KAN"): every edge (input i,
output o) owns its own spline, y_o = sum_i [w_b[o,i] silu(x_i) + s[o,i] sum_j w_s[o,i,j] B_j(x_i)], i.e.
G + k + 2 parameters per edge. The basis is built with the Cox-de Boor recursion and differentiated by
plain autograd through the dense basis, as efficient-kan does, so its memory is what a naive KAN costs.
These layers are slow by design; they serve as comparators and as test references.

Image borders: a tap of a padded convolution that falls outside the image is not an input, so its edge
contributes nothing (``KANConv2d``/``KANConv3d`` mask those taps). This is how a convolution treats its padding
in a CNN, and how AllUKAN's KAonv treats it (it zero-pads phi(x)), so with tied weights KANConv and KAonv agree
everywhere, borders included. Unfolding a zero-padded x instead would give every outside tap phi(0), which is not
0 for a spline: a border-only extra term.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def cox_de_boor_basis(x: torch.Tensor, grid: torch.Tensor, spline_order: int) -> torch.Tensor:
    """B-spline bases of order ``spline_order`` on the extended knot vector ``grid``: shape x.shape + (nb,)."""
    x = x.unsqueeze(-1)
    bases = ((x >= grid[:-1]) & (x < grid[1:])).to(x.dtype)
    for k in range(1, spline_order + 1):
        left = (x - grid[:-(k + 1)]) / (grid[k:-1] - grid[:-(k + 1)]) * bases[..., :-1]
        right = (grid[k + 1:] - x) / (grid[k + 1:] - grid[1:-k]) * bases[..., 1:]
        bases = left + right
    return bases


class _PerEdgeKAN(nn.Module):
    """Grouped per-edge KAN map from ``groups x in_per_group`` features to ``groups x out_per_group``."""

    def __init__(self, in_per_group: int, out_per_group: int, groups: int, grid_size: int, spline_order: int,
                 grid_range: tuple[float, float], init_scale: float):
        super().__init__()
        if grid_size < 1 or spline_order < 0:
            raise ValueError(f"grid_size must be >= 1 and spline_order >= 0, got {grid_size}, {spline_order}")
        lo, hi = (float(v) for v in grid_range)
        if not lo < hi:
            raise ValueError(f"grid_range must satisfy lo < hi, got {grid_range!r}")
        h = (hi - lo) / grid_size
        knots = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * h + lo
        self.register_buffer("grid", knots, persistent=False)
        self.spline_order = spline_order
        self.grid_size = grid_size
        nb = grid_size + spline_order
        bound = 1.0 / math.sqrt(in_per_group)
        self.base_weight = nn.Parameter(torch.empty(groups, out_per_group, in_per_group).uniform_(-bound, bound))
        self.spline_weight = nn.Parameter(torch.randn(groups, out_per_group, in_per_group, nb) * init_scale)
        self.spline_scaler = nn.Parameter(torch.empty(groups, out_per_group, in_per_group).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., groups, in_per_group) -> (..., groups, out_per_group).

        ``present`` (broadcastable to x, 1 or 0) marks the inputs that exist; the edges of absent ones (padding
        taps outside the image) contribute nothing.
        """
        silu = F.silu(x)
        basis = cox_de_boor_basis(x, self.grid.to(x.dtype), self.spline_order)
        if present is not None:
            silu, basis = silu * present, basis * present.unsqueeze(-1)
        weights = self.spline_weight * self.spline_scaler.unsqueeze(-1)
        base = torch.einsum("...gi,goi->...go", silu, self.base_weight)
        return base + torch.einsum("...gif,goif->...go", basis, weights)


class KANLinear(nn.Module):
    """Per-edge KAN layer: y = W_b silu(x) + W_s vec(B(x)) (efficient-kan parameterisation)."""

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 grid_range: tuple[float, float] = (-3.0, 3.0), init_scale: float = 0.1):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kan = _PerEdgeKAN(in_features, out_features, 1, grid_size, spline_order, grid_range, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KANLinear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        return self.kan(x.unsqueeze(-2)).squeeze(-2)


def _ntuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} needs {n} values, got {value}")
    return value


def _unfold_patches(x: torch.Tensor, kernel, stride, padding, dilation) -> tuple[torch.Tensor, tuple]:
    """(N, C, *spatial) -> patches (N, *out_spatial, C, prod(kernel)), written with Tensor.unfold for any dim."""
    n_dim = len(kernel)
    x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    for d in range(n_dim):
        span = dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])
        if dilation[d] > 1:
            x = x[..., ::dilation[d]]
    # x: (N, C, *out_spatial, *kernel)
    out_spatial = tuple(x.shape[2:2 + n_dim])
    perm = [0, *range(2, 2 + n_dim), 1, *range(2 + n_dim, 2 + 2 * n_dim)]
    patches = x.permute(perm).reshape(x.shape[0], *out_spatial, x.shape[1], -1)
    return patches, out_spatial


class _KANConvNd(nn.Module):
    n_dim = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, grid_size: int = 5, spline_order: int = 3,
                 grid_range: tuple[float, float] = (-3.0, 3.0), init_scale: float = 0.1):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                             f"by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _ntuple(kernel_size, self.n_dim, "kernel_size")
        self.stride = _ntuple(stride, self.n_dim, "stride")
        self.padding = _ntuple(padding, self.n_dim, "padding")
        self.dilation = _ntuple(dilation, self.n_dim, "dilation")
        taps = math.prod(self.kernel_size)
        self.kan = _PerEdgeKAN(in_channels // groups * taps, out_channels // groups, groups, grid_size,
                               spline_order, grid_range, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.n_dim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects (N, {self.in_channels}, {self.n_dim} spatial dims), "
                             f"got shape {tuple(x.shape)}")
        patches, out_spatial = _unfold_patches(x, self.kernel_size, self.stride, self.padding, self.dilation)
        patches = patches.reshape(*patches.shape[:-2], self.groups, -1)
        y = self.kan(patches, self._taps_inside(x, out_spatial))  # (N, *out_spatial, groups, out_per_group)
        y = y.reshape(x.shape[0], *out_spatial, self.out_channels)
        return y.movedim(-1, 1)

    def _taps_inside(self, x: torch.Tensor, out_spatial: tuple) -> torch.Tensor | None:
        """1 for the taps of each patch that lie inside the image, 0 for padding; None without padding."""
        if not any(self.padding):
            return None
        inside, _ = _unfold_patches(x.new_ones((1, 1, *x.shape[2:])), self.kernel_size, self.stride, self.padding,
                                    self.dilation)  # (1, *out_spatial, 1, taps): the same unfold of a ones image
        inside = inside.expand(1, *out_spatial, self.in_channels, inside.shape[-1])
        return inside.reshape(1, *out_spatial, self.groups, -1)


class KANConv2d(_KANConvNd):
    """Per-edge KAN convolution: KANLinear over every (unfolded) 2D patch; taps outside the image contribute 0."""
    n_dim = 2


class KANConv3d(_KANConvNd):
    """Per-edge KAN convolution: KANLinear over every (unfolded) 3D patch; taps outside the image contribute 0."""
    n_dim = 3
