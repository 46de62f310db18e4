"""SharedSplineActivation: the SaKAN activation with the Grad-Free Spline (DESIGN.md §2).

phi(x) = w_b * silu(x) + sum_j c_j B_j(x), one coefficient vector per layer (``share="layer"``) or per
input channel (``share="channel"``).

Gradient modes:
* ``"free"``  (Grad-Free Spline, the paper's): dphi/dx = w_b * silu'(x); dL/dc stays exact.
* ``"exact"``: dphi/dx also contains sum_j c_j B_j'(x).

Both modes save only ``x`` for backward and recompute the basis there, so their activation memory is
that of a plain pointwise nonlinearity.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from . import spline

SHARE_MODES = ("layer", "channel")
SPLINE_GRAD_MODES = ("free", "exact")
IMPLEMENTATIONS = ("function", "plain")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, otherwise the input's own precision (float64 for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _channel_shape(x: torch.Tensor, channel_dim: int) -> list[int]:
    """Shape that broadcasts a per-channel vector along ``channel_dim`` of ``x``."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return shape


def _reduce_to_channels(t: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
    if channel_dim is None:
        return t.sum().reshape(1)
    dim = channel_dim % t.dim()
    return t.sum(dim=[d for d in range(t.dim()) if d != dim])


class SplineConfig(NamedTuple):
    """Everything but tensors that the custom-Function evaluation of phi needs."""
    lo: float
    inv_h: float
    grid_size: int
    channel_dim: int | None  # None: one spline for the whole layer
    exact: bool


class SplineEvaluation:
    """phi(x) and its gradients from the interval table for one input.

    The interval lookup, sigmoid and silu are computed once and shared, so a backward pass that first needs
    phi(x) again (the fused KA layers) and then the gradients makes one lookup, not two.
    """

    def __init__(self, x: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor, config: SplineConfig):
        self.x, self.table, self.base_weight, self.config = x, table, base_weight, config
        self.x32 = x.to(_compute_dtype(x))
        self._lookup = self._sig = self._silu = None

    @property
    def lookup(self) -> spline.IntervalLookup:
        if self._lookup is None:
            c = self.config
            self._lookup = spline.IntervalLookup(self.x32, c.lo, c.inv_h, c.grid_size,
                                                 _table_offsets(self.x32, self.table, c.channel_dim))
        return self._lookup

    def _sigmoid_silu(self):
        if self._sig is None:
            self._sig = torch.sigmoid(self.x32)
            self._silu = self.x32 * self._sig
        return self._sig, self._silu

    def _base_weight(self) -> torch.Tensor:
        c = self.config
        return self.base_weight if c.channel_dim is None else \
            self.base_weight.reshape(_channel_shape(self.x32, c.channel_dim))

    def values(self) -> torch.Tensor:
        """phi(x) in the compute dtype (fp32 for half inputs)."""
        return torch.addcmul(spline.spline_from_table(self.lookup, self.table), self._sigmoid_silu()[1],
                             self._base_weight())

    def gradients(self, grad_phi: torch.Tensor, need_x: bool, need_table: bool, need_base_weight: bool):
        """(dL/dx, dL/dtable, dL/dbase_weight) for the upstream gradient dL/dphi; None where not needed."""
        c = self.config
        g = grad_phi.to(self.x32.dtype)
        grad_x = grad_table = grad_wb = None
        sig, silu = self._sigmoid_silu()
        if need_x:
            # silu'(x) = sig + silu * (1 - sig)
            slope = torch.addcmul(sig, silu, 1.0 - sig) * self._base_weight()
            if c.exact:
                slope = slope + spline.spline_slope_from_table(self.lookup, self.table, c.inv_h)
            grad_x = (g * slope).to(self.x.dtype)
        if need_table:
            grad_table = spline.table_gradient(self.lookup, g, self.table.shape)
        if need_base_weight:
            grad_wb = _reduce_to_channels(g * silu, c.channel_dim)
        return grad_x, grad_table, grad_wb


class _SharedSplineFunction(torch.autograd.Function):
    """Saves x (plus the tiny parameter tensors); recomputes the interval lookup in backward."""

    @staticmethod
    def forward(ctx, x, table, base_weight, config):
        ctx.save_for_backward(x, table, base_weight)
        ctx.config = config
        return SplineEvaluation(x, table, base_weight, config).values().to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, table, base_weight = ctx.saved_tensors
        grads = SplineEvaluation(x, table, base_weight, ctx.config).gradients(grad_out, *ctx.needs_input_grad[:3])
        return (*grads, None)


def _table_offsets(x: torch.Tensor, table: torch.Tensor, channel_dim: int | None):
    if channel_dim is None:
        return None
    rows = table.shape[1]
    return (torch.arange(table.shape[0], device=x.device) * rows).reshape(_channel_shape(x, channel_dim))


class SharedSplineActivation(nn.Module):
    """Learnable shared univariate activation phi(x) = w_b * silu(x) + sum_j c_j B_j(x).

    Args:
        num_channels: number of input channels; required for ``share="channel"``.
        grid_size: number of spline intervals G on ``grid_range`` (nb = G + 3 coefficients).
        grid_range: (lo, hi). Values outside ``[lo - 3h, hi + 3h]`` see only the silu part. The default
            of (-3, 3) matches inputs that come from instance/layer normalisation.
        share: ``"layer"`` (one spline for the whole layer) or ``"channel"`` (one per input channel).
        spline_grad: ``"free"`` (Grad-Free Spline) or ``"exact"``.
        channel_dim: which dimension of the input holds channels (1 for conv inputs, -1 for Linear).
        impl: ``"function"`` (custom autograd Function: keeps only x, fastest eager, and traced by
            ``torch.compile`` into a small graph) or ``"plain"`` (differentiable closed-form ops, about 15x more
            ops under compile; the independent reference in the tests).
        init_scale: standard deviation of the initial spline coefficients; phi starts as silu + noise.
    """

    def __init__(self, num_channels: int | None = None, grid_size: int = 5,
                 grid_range: tuple[float, float] = (-3.0, 3.0), share: str = "layer", spline_grad: str = "free",
                 channel_dim: int = 1, impl: str = "function", init_scale: float = 0.1):
        super().__init__()
        if share not in SHARE_MODES:
            raise ValueError(f"share={share!r} is not supported; allowed values: {SHARE_MODES}")
        if spline_grad not in SPLINE_GRAD_MODES:
            raise ValueError(f"spline_grad={spline_grad!r} is not supported; allowed values: {SPLINE_GRAD_MODES}")
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl={impl!r} is not supported; allowed values: {IMPLEMENTATIONS}")
        lo, hi = spline.validate_grid(grid_size, grid_range)
        if share == "channel":
            if num_channels is None or int(num_channels) < 1:
                raise ValueError("share='channel' needs num_channels (the number of input channels), "
                                 f"got {num_channels!r}")
            n_splines = int(num_channels)
        else:
            n_splines = 1
        self.num_channels = None if num_channels is None else int(num_channels)
        self.grid_size = grid_size
        self.grid_range = (lo, hi)
        self.share = share
        self.spline_grad = spline_grad
        self.channel_dim = channel_dim
        self.impl = impl
        self.coef = nn.Parameter(torch.randn(n_splines, spline.num_bases(grid_size)) * init_scale)
        self.base_weight = nn.Parameter(torch.ones(n_splines))

    @property
    def inv_h(self) -> float:
        lo, hi = self.grid_range
        return self.grid_size / (hi - lo)

    def extra_repr(self) -> str:
        return (f"num_channels={self.num_channels}, grid_size={self.grid_size}, grid_range={self.grid_range}, "
                f"share={self.share!r}, spline_grad={self.spline_grad!r}")

    def _check_input(self, x: torch.Tensor):
        if self.share == "channel":
            if x.dim() == 0 or x.shape[self.channel_dim] != self.coef.shape[0]:
                got = "a scalar" if x.dim() == 0 else f"shape {tuple(x.shape)}"
                raise ValueError(f"SharedSplineActivation(share='channel') expects {self.coef.shape[0]} channels "
                                 f"in dimension {self.channel_dim}, got {got}")

    def uses_function(self) -> bool:
        """True when phi runs through the custom autograd Function, False for the plain-ops path."""
        return self.impl != "plain"

    def function_inputs(self, x: torch.Tensor):
        """(table, base_weight, SplineConfig) for SplineEvaluation of ``x``, after checking its channels.

        Must be called with autocast off: the table is built in the spline's compute dtype.
        """
        self._check_input(x)
        dtype = _compute_dtype(x)
        config = SplineConfig(self.grid_range[0], self.inv_h, self.grid_size,
                              self.channel_dim if self.share == "channel" else None, self.spline_grad == "exact")
        return spline.spline_table(self.coef.to(dtype)), self.base_weight.to(dtype), config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The spline must not run in fp16/bf16: autocast is switched off and everything is done in fp32.
        with torch.autocast(device_type=x.device.type, enabled=False):
            if not self.uses_function():
                self._check_input(x)
                return self._forward_plain(x, self.channel_dim if self.share == "channel" else None)
            return _SharedSplineFunction.apply(x, *self.function_inputs(x))

    def _forward_plain(self, x: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
        x32 = x.to(_compute_dtype(x))
        u = (x32 - self.grid_range[0]) * self.inv_h
        if self.spline_grad == "free":
            u = u.detach()
        coef = self.coef.to(x32.dtype)
        if channel_dim is None:
            columns = [coef[0, j] for j in range(coef.shape[1])]
            wb = self.base_weight.to(x32.dtype)[0]
        else:
            shape = _channel_shape(x32, channel_dim)
            columns = [coef[:, j].reshape(shape) for j in range(coef.shape[1])]
            wb = self.base_weight.to(x32.dtype).reshape(shape)
        out = wb * F.silu(x32) + spline.spline_on_the_fly(u, columns)
        return out.to(x.dtype)

    @torch.no_grad()
    def curves(self, num_points: int = 200, margin: float = 0.1):
        """(x, base part, spline part) per shared spline, for plotting the learned activations."""
        lo, hi = self.grid_range
        h = (hi - lo) / self.grid_size
        xs = torch.linspace(lo - margin * (hi - lo) - 3 * h, hi + margin * (hi - lo) + 3 * h, num_points)
        basis = spline.bspline_basis(xs, self.grid_size, self.grid_range)
        spline_part = basis @ self.coef.detach().float().cpu().t()  # (P, n_splines)
        base_part = F.silu(xs)[:, None] * self.base_weight.detach().float().cpu()[None]
        return xs, base_part, spline_part
