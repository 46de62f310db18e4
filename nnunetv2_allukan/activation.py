"""SharedSplineActivation: the SaKAN activation with the Grad-Free Spline (DESIGN.md §2).

phi(x) = w_b * b(x) + sum_j c_j B_j(x), one coefficient vector per layer (``share="layer"``) or per
input channel (``share="channel"``). The base function b is silu (the KAN default) or nnU-Net's
LeakyReLU(0.01) (``base="leakyrelu"``).

What is learned (``activation``):
* ``"spline"``: w_b and c are parameters (the KA layer proper).
* ``"fixed-silu"`` / ``"fixed-leakyrelu"``: phi is exactly silu / leaky_relu(x, 0.01), with no parameters at
  all. These are the accuracy controls that separate what the topology does from what learning phi does.

Initialisation (``spline_init``): ``"silu-noise"`` (phi = silu + N(0, init_scale²) coefficients) or
``"leakyrelu"`` (phi = leaky_relu(x, 0.01) exactly: base leakyrelu, w_b = 1, c = 0, so the network starts with
the CNN's nonlinearity).

Gradient modes:
* ``"free"``  (Grad-Free Spline, the paper's): dphi/dx = w_b * b'(x); dL/dc stays exact.
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
BASE_FUNCTIONS = ("silu", "leakyrelu")
ACTIVATIONS = ("spline", "fixed-silu", "fixed-leakyrelu")
SPLINE_INITS = ("silu-noise", "leakyrelu")
# nnU-Net's CNN uses LeakyReLU with this slope; the "leakyrelu" base function and controls match it exactly.
LEAKY_SLOPE = 0.01


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
    base: str = "silu"


class SplineEvaluation:
    """phi(x) and its gradients from the interval table for one input.

    The interval lookup, sigmoid and silu are computed once and shared, so a backward pass that first needs
    phi(x) again (the fused KA layers) and then the gradients makes one lookup, not two.
    """

    def __init__(self, x: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor, config: SplineConfig):
        self.x, self.table, self.base_weight, self.config = x, table, base_weight, config
        self.x32 = x.to(_compute_dtype(x))
        self._lookup = self._base = self._base_slope = None

    @property
    def lookup(self) -> spline.IntervalLookup:
        if self._lookup is None:
            c = self.config
            self._lookup = spline.IntervalLookup(self.x32, c.lo, c.inv_h, c.grid_size,
                                                 _table_offsets(self.x32, self.table, c.channel_dim))
        return self._lookup

    def _base_function(self):
        """(b(x), b'(x)) of the base function, computed once per evaluation."""
        if self._base is None:
            if self.config.base == "leakyrelu":
                self._base = F.leaky_relu(self.x32, LEAKY_SLOPE)
                self._base_slope = torch.where(self.x32 > 0, 1.0, LEAKY_SLOPE).to(self.x32.dtype)
            else:
                sig = torch.sigmoid(self.x32)
                self._base = self.x32 * sig
                # silu'(x) = sig + silu * (1 - sig)
                self._base_slope = torch.addcmul(sig, self._base, 1.0 - sig)
        return self._base, self._base_slope

    def _base_weight(self) -> torch.Tensor:
        c = self.config
        return self.base_weight if c.channel_dim is None else \
            self.base_weight.reshape(_channel_shape(self.x32, c.channel_dim))

    def values(self) -> torch.Tensor:
        """phi(x) in the compute dtype (fp32 for half inputs)."""
        return torch.addcmul(spline.spline_from_table(self.lookup, self.table), self._base_function()[0],
                             self._base_weight())

    def gradients(self, grad_phi: torch.Tensor, need_x: bool, need_table: bool, need_base_weight: bool):
        """(dL/dx, dL/dtable, dL/dbase_weight) for the upstream gradient dL/dphi; None where not needed."""
        c = self.config
        g = grad_phi.to(self.x32.dtype)
        grad_x = grad_table = grad_wb = None
        base, base_slope = self._base_function()
        if need_x:
            slope = base_slope * self._base_weight()
            if c.exact:
                slope = slope + spline.spline_slope_from_table(self.lookup, self.table, c.inv_h)
            grad_x = (g * slope).to(self.x.dtype)
        if need_table:
            grad_table = spline.table_gradient(self.lookup, g, self.table.shape)
        if need_base_weight:
            grad_wb = _reduce_to_channels(g * base, c.channel_dim)
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
    """Learnable shared univariate activation phi(x) = w_b * b(x) + sum_j c_j B_j(x).

    Args:
        num_channels: number of input channels; required for ``share="channel"``.
        grid_size: number of spline intervals G on ``grid_range`` (nb = G + 3 coefficients).
        grid_range: (lo, hi). Values outside ``[lo - 3h, hi + 3h]`` see only the base part. The default
            of (-3, 3) matches inputs that come from instance/layer normalisation.
        share: ``"layer"`` (one spline for the whole layer) or ``"channel"`` (one per input channel).
        spline_grad: ``"free"`` (Grad-Free Spline) or ``"exact"``.
        channel_dim: which dimension of the input holds channels (1 for conv inputs, -1 for Linear).
        impl: ``"function"`` (custom autograd Function: keeps only x, fastest eager, and traced by
            ``torch.compile`` into a small graph) or ``"plain"`` (differentiable closed-form ops, about 15x more
            ops under compile; the independent reference in the tests).
        activation: ``"spline"`` (learnable w_b and c), ``"fixed-silu"`` or ``"fixed-leakyrelu"`` (phi is that
            function exactly; no parameters: w_b = 1 and c = 0 are non-persistent buffers).
        spline_init: ``"silu-noise"`` (base silu, c ~ N(0, init_scale²)) or ``"leakyrelu"`` (base
            leaky_relu(x, 0.01), c = 0: phi starts as nnU-Net's nonlinearity exactly).
        init_scale: standard deviation of the initial spline coefficients for ``spline_init="silu-noise"``.
    """

    def __init__(self, num_channels: int | None = None, grid_size: int = 5,
                 grid_range: tuple[float, float] = (-3.0, 3.0), share: str = "layer", spline_grad: str = "free",
                 channel_dim: int = 1, impl: str = "function", init_scale: float = 0.1,
                 activation: str = "spline", spline_init: str = "silu-noise"):
        super().__init__()
        for name, value, allowed in (("share", share, SHARE_MODES), ("spline_grad", spline_grad, SPLINE_GRAD_MODES),
                                     ("impl", impl, IMPLEMENTATIONS), ("activation", activation, ACTIVATIONS),
                                     ("spline_init", spline_init, SPLINE_INITS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; allowed values: {allowed}")
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
        self.activation = activation
        self.spline_init = spline_init
        if activation == "spline":
            self.base = "leakyrelu" if spline_init == "leakyrelu" else "silu"
        else:
            self.base = activation[len("fixed-"):]
        if activation == "spline" and spline_init == "silu-noise":
            coef = torch.randn(n_splines, spline.num_bases(grid_size)) * init_scale
        else:
            coef = torch.zeros(n_splines, spline.num_bases(grid_size))
        base_weight = torch.ones(n_splines)
        if activation == "spline":
            self.coef = nn.Parameter(coef)
            self.base_weight = nn.Parameter(base_weight)
        else:
            # Fixed controls: the same code path with a zero spline, but nothing to learn and nothing saved.
            self.register_buffer("coef", coef, persistent=False)
            self.register_buffer("base_weight", base_weight, persistent=False)

    @property
    def learnable(self) -> bool:
        return self.activation == "spline"

    @property
    def inv_h(self) -> float:
        lo, hi = self.grid_range
        return self.grid_size / (hi - lo)

    def extra_repr(self) -> str:
        return (f"num_channels={self.num_channels}, grid_size={self.grid_size}, grid_range={self.grid_range}, "
                f"share={self.share!r}, spline_grad={self.spline_grad!r}, activation={self.activation!r}, "
                f"base={self.base!r}")

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
                              self.channel_dim if self.share == "channel" else None, self.spline_grad == "exact",
                              self.base)
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
        out = wb * self._base_function(x32) + spline.spline_on_the_fly(u, columns)
        return out.to(x.dtype)

    def _base_function(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, LEAKY_SLOPE) if self.base == "leakyrelu" else F.silu(x)

    @torch.no_grad()
    def curves(self, num_points: int = 200, margin: float = 0.1):
        """(x, base part, spline part) per shared spline, for plotting the learned activations."""
        lo, hi = self.grid_range
        h = (hi - lo) / self.grid_size
        xs = torch.linspace(lo - margin * (hi - lo) - 3 * h, hi + margin * (hi - lo) + 3 * h, num_points)
        basis = spline.bspline_basis(xs, self.grid_size, self.grid_range)
        spline_part = basis @ self.coef.detach().float().cpu().t()  # (P, n_splines)
        base_part = self._base_function(xs)[:, None] * self.base_weight.detach().float().cpu()[None]
        return xs, base_part, spline_part
