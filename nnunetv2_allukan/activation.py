"""SharedSplineActivation: the SaKAN activation with the Grad-Free Spline (DESIGN.md §2).

phi(x) = w_b * b(x) + sum_j c_j B_j(x), one coefficient vector per layer (``share="layer"``), per input channel
(``share="channel"``) or per group of consecutive input channels (``share="group"``, ``num_groups`` groups). The
base function b is silu (the KAN default) or nnU-Net's LeakyReLU(0.01) (``base="leakyrelu"``).

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

Size: just over 400 lines: the module, its autograd Function and the piece-wise torch evaluation they share are one
unit; the Triton kernels (``kernels``) and the torch.func rules (``func_transforms``) already live apart.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import math

import torch
from torch import nn
import torch.nn.functional as F

from . import spline
from .func_transforms import first_order_backward, pointwise_vmap
from .kernels import BACKENDS, cpu_kernels_available, default_backend, resolve_backend

SHARE_MODES = ("layer", "channel", "group")
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


class SplineConfig(NamedTuple):
    """Everything but tensors that the custom-Function evaluation of phi needs."""
    lo: float
    inv_h: float
    grid_size: int
    channel_dim: int | None  # None: one spline for the whole layer
    exact: bool
    base: str = "silu"
    backend: str = "torch"  # "torch", "triton" or "cpu", resolved for the input (kernels.resolve_backend)


# Values per piece of the torch path. Its ~10 temporaries (lookup, gathers, base function) are then piece-sized
# rather than input-sized, which bounds a KA layer's transient memory (DESIGN.md §9), and on the CPU each
# elementwise pass stays in cache. On GPUs (where the Triton kernels are the default) pieces are larger, so that
# the ~40 kernel launches per piece stay negligible. None: the whole input at once (the unbounded control of the
# memory test).
TORCH_PIECE_ELEMENTS: int | None = 1 << 18
TORCH_PIECE_ELEMENTS_GPU: int | None = 1 << 24


class SplineEvaluation:
    """phi(x) and its gradients for one input, by the Triton kernels or the torch path.

    The torch path works piece by piece on the ``(A, C, B)`` memory-order view of x (``spline.MemoryLayout``) and
    writes into preallocated outputs; the lookup is recomputed per piece in backward (a few cheap passes) instead of
    being kept input-sized between phi's recomputation and the gradients.
    """

    def __init__(self, x: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor, config: SplineConfig):
        self.x, self.table, self.base_weight, self.config = x, table, base_weight, config

    def values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """phi(x) in ``dtype`` (default: the compute dtype, fp32 for half inputs)."""
        c = self.config
        dtype = dtype or _compute_dtype(self.x)
        if c.backend in KERNEL_BACKENDS:
            return _kernel_ops(c.backend).spline_phi(self.x, self.table, self.base_weight, c.lo, c.inv_h,
                                                     c.channel_dim, c.base, LEAKY_SLOPE, dtype)
        layout = spline.MemoryLayout(self.x, c.channel_dim, self.table.shape[0])
        out = layout.empty(dtype)
        out2 = _planes(layout.view3(out))
        for piece in self._pieces(layout):
            piece.values(out2[piece.index])
        return out

    def gradients(self, grad_phi: torch.Tensor, need_x: bool, need_coef: bool, need_base_weight: bool):
        """(dL/dx, dL/dcoefficients, dL/dbase_weight) for the upstream gradient dL/dphi; None where not needed."""
        c = self.config
        need_params = need_coef or need_base_weight
        if c.backend in KERNEL_BACKENDS:
            grad_x, grad_coef, grad_wb = _kernel_ops(c.backend).spline_phi_backward(
                self.x, grad_phi, self.table, self.base_weight, c.lo, c.inv_h, c.channel_dim, c.base, LEAKY_SLOPE,
                c.exact, need_x, need_params)
        else:
            grad_x, grad_table, grad_wb = self._torch_gradients(grad_phi, need_x, need_params)
            grad_coef = spline.table_gradient_to_coefficients(grad_table) if need_params else None
        return (grad_x if need_x else None, grad_coef if need_coef else None,
                grad_wb if need_base_weight else None)

    @property
    def values_with_gradients(self) -> bool:
        """Whether ``gradients_and_values`` computes phi in the gradients' pass (the CPU kernels); otherwise it is
        a separate pass, and callers that have phi's consumer ready first should ask for values() before."""
        return self.config.backend == "cpu"

    def gradients_and_values(self, grad_phi: torch.Tensor, need_x: bool, need_coef: bool, need_base_weight: bool,
                             dtype: torch.dtype):
        """(dL/dx, dL/dcoefficients, dL/dbase_weight, phi(x) in ``dtype``): one pass over x for the CPU kernels."""
        c = self.config
        if not self.values_with_gradients:
            return (*self.gradients(grad_phi, need_x, need_coef, need_base_weight), self.values(dtype))
        grad_x, grad_coef, grad_wb, phi = _kernel_ops(c.backend).spline_phi_backward_with_values(
            self.x, grad_phi, self.table, self.base_weight, c.lo, c.inv_h, c.channel_dim, c.base, LEAKY_SLOPE,
            c.exact, need_x, need_coef or need_base_weight, dtype)
        return (grad_x if need_x else None, grad_coef if need_coef else None,
                grad_wb if need_base_weight else None, phi)

    def _torch_gradients(self, grad_phi: torch.Tensor, need_x: bool, need_params: bool):
        layout = spline.MemoryLayout(self.x, self.config.channel_dim, self.table.shape[0])
        g2 = _planes(layout.view3(layout.like(grad_phi)))
        grad_x = layout.empty(self.x.dtype) if need_x else None
        grad_x2 = _planes(layout.view3(grad_x)) if need_x else None
        dtype = self.table.dtype
        table_acc = torch.zeros(4, self.table.shape[0] * self.table.shape[1], dtype=dtype, device=self.x.device)
        wb_acc = torch.zeros(self.table.shape[0], dtype=dtype, device=self.x.device)
        for piece in self._pieces(layout):
            g = g2[piece.index].to(dtype)
            if need_x:
                piece.write_grad_x(g, grad_x2[piece.index])
            if need_params:
                spline.accumulate_table_gradient(piece.lookup, g, table_acc)
                piece.add_to_channels(wb_acc, (g * piece.base()).sum(dim=1))
        if not need_params:
            return grad_x, None, None
        return grad_x, table_acc.t().reshape(self.table.shape), wb_acc

    def _pieces(self, layout: spline.MemoryLayout):
        x2 = _planes(layout.view3(layout.x))
        n_channels = layout.shape3[1]
        if _holds_no_memory(self.x):
            piece = None  # shape propagation (FLOP counting, tracing): pieces would only multiply the ops
        else:
            piece = TORCH_PIECE_ELEMENTS if self.x.device.type == "cpu" else TORCH_PIECE_ELEMENTS_GPU
        for planes, positions in _piece_slices(*x2.shape, piece):
            yield _Piece(self, x2[planes, positions], planes, positions, n_channels)


def _holds_no_memory(t: torch.Tensor) -> bool:
    """Fake (FakeTensorMode) or meta tensors: the pieces bound memory, which these do not have.

    Under torch.compile the tracer cannot call ``is_fake`` (dynamo refuses it, a graph break that ``fullgraph``
    turns into an error); compiled code takes one piece anyway (see ``_piece_slices``), so answer without it."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def _planes(t3: torch.Tensor) -> torch.Tensor:
    """(A, C, B) -> (A*C, B): plane p holds channel p % C."""
    return t3.reshape(t3.shape[0] * t3.shape[1], t3.shape[2])  # not -1: ambiguous for an empty plane


def _piece_slices(n_planes: int, plane_size: int, piece: int | None):
    """(plane slice, position slice) pieces of about ``piece`` values of the plane view, in memory order; one
    piece for all when ``piece`` is None or under torch.compile (which fuses the passes itself)."""
    if piece is None or n_planes * plane_size <= piece or torch.compiler.is_compiling():
        yield slice(0, n_planes), slice(0, plane_size)
    elif plane_size >= piece:
        for p in range(n_planes):
            for start in range(0, plane_size, piece):
                yield slice(p, p + 1), slice(start, min(start + piece, plane_size))
    else:
        step = piece // plane_size
        for p in range(0, n_planes, step):
            yield slice(p, min(p + step, n_planes)), slice(0, plane_size)


class _Piece:
    """One piece of the torch path: its values, lookup and base function, and the parameters of its planes."""

    def __init__(self, evaluation: SplineEvaluation, x: torch.Tensor, planes: slice, positions: slice,
                 n_channels: int):
        c = evaluation.config
        self.config, self.table, self.index = c, evaluation.table, (planes, positions)
        self.x = x.to(self.table.dtype)
        rows_per_channel = self.table.shape[1]
        if c.channel_dim is None:
            self.channels, offsets, self.base_weight = None, None, evaluation.base_weight
        elif planes.stop - planes.start == 1:
            self.channels = planes.start % n_channels
            offsets, self.base_weight = self.channels * rows_per_channel, evaluation.base_weight[self.channels]
        else:
            self.channels = torch.arange(planes.start, planes.stop, device=x.device) % n_channels
            offsets = (self.channels * rows_per_channel).int()[:, None]
            self.base_weight = evaluation.base_weight[self.channels][:, None]
        self.lookup = spline.IntervalLookup(self.x, c.lo, c.inv_h, c.grid_size, offsets)
        self._base = None

    def values(self, out: torch.Tensor):
        """Write phi of the piece into ``out`` (directly when it has the compute dtype: no extra pass)."""
        spline_part = spline.spline_from_table(self.lookup, self.table)
        if out.dtype == spline_part.dtype:
            torch.addcmul(spline_part, self.base(), self.base_weight, out=out)
        else:
            out.copy_(torch.addcmul(spline_part, self.base(), self.base_weight))

    def write_grad_x(self, g: torch.Tensor, out: torch.Tensor):
        if out.dtype == g.dtype:
            torch.mul(g, self.slope(), out=out)
        else:
            out.copy_(g * self.slope())

    def base(self) -> torch.Tensor:
        if self._base is None:
            self._base = F.leaky_relu(self.x, LEAKY_SLOPE) if self.config.base == "leakyrelu" else F.silu(self.x)
        return self._base

    def slope(self) -> torch.Tensor:
        """dphi/dx: w_b b'(x), plus S'(x) for exact gradients."""
        if self.config.base == "leakyrelu":
            base_slope = torch.where(self.x > 0, 1.0, torch.tensor(LEAKY_SLOPE, dtype=self.x.dtype))
        else:
            sig = torch.sigmoid(self.x)
            self._base = self.x * sig
            base_slope = torch.addcmul(sig, self._base, 1.0 - sig)  # silu'(x) = sig + silu(x) (1 - sig)
        slope = base_slope * self.base_weight
        if self.config.exact:
            slope += spline.spline_slope_from_table(self.lookup, self.table, self.config.inv_h)
        return slope

    def add_to_channels(self, acc: torch.Tensor, per_plane: torch.Tensor):
        """Add per-plane sums to their channels' entries of ``acc`` (one entry for a layer-shared spline)."""
        if self.channels is None:
            acc += per_plane.sum()
        elif isinstance(self.channels, int):
            acc[self.channels] += per_plane.sum()
        else:
            acc.index_add_(0, self.channels, per_plane)


KERNEL_BACKENDS = ("triton", "cpu")


class _CPUKernelOps:
    """The numba kernels' custom ops with the Triton ones' signatures (``kernels.ops``), plus the backward that
    also returns phi."""

    def __init__(self):
        from .kernels import cpu_ops  # imports numba: only when the CPU kernels are used

        self.spline_phi = cpu_ops.spline_phi_cpu
        self.spline_phi_backward_with_values = cpu_ops.spline_phi_backward_cpu

    def spline_phi_backward(self, *args):
        return self.spline_phi_backward_with_values(*args)[:3]


_CPU_OPS: list = []


def _kernel_ops(backend: str):
    """The custom ops of a kernel backend: ``kernels.ops`` (Triton) or the numba CPU ops."""
    if backend == "cpu":
        if not _CPU_OPS:
            _CPU_OPS.append(_CPUKernelOps())
        return _CPU_OPS[0]
    from .kernels import ops  # imports triton: only when the Triton backend is used

    return ops


class _SharedSplineFunction(torch.autograd.Function):
    """phi(x) for inputs (x, coef, table, base_weight, config): the table is ``spline_table(coef)``, made outside
    and not differentiated (the gradient goes to ``coef`` directly: the kernels sum it in coefficient space). Saves
    x (plus the tiny parameter tensors); recomputes the interval lookup in backward. In torch.func's form (forward
    without ctx, ``setup_context``, a ``vmap`` rule: ``func_transforms``)."""

    @staticmethod
    def forward(x, coef, table, base_weight, config):
        return SplineEvaluation(x, table, base_weight, config).values(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, coef, table, base_weight, config = inputs
        ctx.save_for_backward(x, table, base_weight)
        ctx.config = config

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_coef, _, need_wb = ctx.needs_input_grad[:4]

        def formula(x, table, base_weight, grad_out):
            return SplineEvaluation(x, table, base_weight, ctx.config).gradients(grad_out, need_x, need_coef, need_wb)
        grad_x, grad_coef, grad_wb = first_order_backward(formula, *ctx.saved_tensors, grad_out)
        return grad_x, grad_coef, None, grad_wb, None

    @staticmethod
    def vmap(info, in_dims, x, coef, table, base_weight, config):
        return pointwise_vmap(_SharedSplineFunction, info, in_dims, x, (coef, table, base_weight), config)


class SharedSplineActivation(nn.Module):
    """Learnable shared univariate activation phi(x) = w_b * b(x) + sum_j c_j B_j(x).

    Args:
        num_channels: number of input channels; required for ``share="channel"`` and ``"group"``.
        grid_size: number of spline intervals G on ``grid_range`` (nb = G + 3 coefficients).
        grid_range: (lo, hi). Values outside ``[lo - 3h, hi + 3h]`` see only the base part. The default
            of (-3, 3) matches inputs that come from instance/layer normalisation.
        share: ``"layer"`` (one spline for the whole layer), ``"channel"`` (one per input channel) or ``"group"``
            (one per group of consecutive channels: gcd(num_channels, num_groups) groups, so a 1-channel input
            layer has one spline and 32 channels in 8 groups have one per 4 channels).
        num_groups: the number of groups for ``share="group"`` (ignored otherwise).
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
        backend: who evaluates phi and its gradients for ``impl="function"``: ``"triton"`` (the fused GPU kernels
            of ``nnunetv2_allukan.kernels``: one pass forward, one backward, deterministic), ``"cpu"`` (the fused
            numba kernels for CPU tensors, likewise), ``"torch"`` (the reference path, any device) or ``"auto"``
            (Triton for CUDA tensors when triton is installed, the numba kernels for CPU tensors when they load,
            else torch; $ALLUKAN_SPLINE_BACKEND, when set, replaces "auto"). All give the same values and
            gradients up to rounding.
    """

    def __init__(self, num_channels: int | None = None, grid_size: int = 5,
                 grid_range: tuple[float, float] = (-3.0, 3.0), share: str = "layer", spline_grad: str = "free",
                 channel_dim: int = 1, impl: str = "function", init_scale: float = 0.1,
                 activation: str = "spline", spline_init: str = "silu-noise", backend: str = "auto",
                 num_groups: int = 8):
        super().__init__()
        for name, value, allowed in (("share", share, SHARE_MODES), ("spline_grad", spline_grad, SPLINE_GRAD_MODES),
                                     ("impl", impl, IMPLEMENTATIONS), ("activation", activation, ACTIVATIONS),
                                     ("spline_init", spline_init, SPLINE_INITS), ("backend", backend, BACKENDS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; allowed values: {allowed}")
        if impl == "plain" and backend in KERNEL_BACKENDS:
            raise ValueError(f"backend={backend!r} evaluates the custom Function: it needs impl='function'")
        if backend == "auto":
            backend = default_backend()
        if backend in ("auto", "cpu") and impl == "function":
            cpu_kernels_available()  # decided here, once, so that resolve_backend is a constant under compile
        lo, hi = spline.validate_grid(grid_size, grid_range)
        if share in ("channel", "group"):
            if num_channels is None or int(num_channels) < 1:
                raise ValueError(f"share={share!r} needs num_channels (the number of input channels), "
                                 f"got {num_channels!r}")
            if share == "group" and (isinstance(num_groups, bool) or not isinstance(num_groups, int)
                                     or num_groups < 1):
                raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
            n_splines = int(num_channels) if share == "channel" else math.gcd(int(num_channels), num_groups)
        else:
            n_splines = 1
        self.num_channels = None if num_channels is None else int(num_channels)
        self.grid_size = grid_size
        self.grid_range = (lo, hi)
        self.share = share
        self.num_groups = n_splines if share == "group" else None
        self.spline_grad = spline_grad
        self.channel_dim = channel_dim
        self.impl = impl
        self.backend = backend
        self.kind = activation  # "spline" or a fixed control (not .activation: KA layers own that name)
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
        return self.kind == "spline"

    @property
    def inv_h(self) -> float:
        lo, hi = self.grid_range
        return self.grid_size / (hi - lo)

    def extra_repr(self) -> str:
        return (f"num_channels={self.num_channels}, grid_size={self.grid_size}, grid_range={self.grid_range}, "
                f"share={self.share!r}{f', num_groups={self.num_groups}' if self.num_groups else ''}, "
                f"spline_grad={self.spline_grad!r}, activation={self.kind!r}, "
                f"base={self.base!r}, backend={self.backend!r}")

    @property
    def spline_channel_dim(self) -> int | None:
        """The dimension the splines are spread over; None for one spline per layer."""
        return None if self.share == "layer" else self.channel_dim

    def _check_input(self, x: torch.Tensor):
        if self.share != "layer":
            if x.dim() == 0 or x.shape[self.channel_dim] != self.num_channels:
                got = "a scalar" if x.dim() == 0 else f"shape {tuple(x.shape)}"
                raise ValueError(f"SharedSplineActivation(share={self.share!r}) expects {self.num_channels} "
                                 f"channels in dimension {self.channel_dim}, got {got}")

    def uses_function(self) -> bool:
        """True when phi runs through the custom autograd Function, False for the plain-ops path."""
        return self.impl != "plain"

    def function_inputs(self, x: torch.Tensor):
        """(coef, table, base_weight, SplineConfig) for the custom Functions on ``x``, after checking its channels:
        the table (``spline.spline_table`` of the coefficients) is made from detached coefficients, the gradient
        goes to ``coef``.

        Must be called with autocast off: the table is built in the spline's compute dtype.
        """
        self._check_input(x)
        dtype = _compute_dtype(x)
        config = SplineConfig(self.grid_range[0], self.inv_h, self.grid_size, self.spline_channel_dim,
                              self.spline_grad == "exact",
                              self.base, resolve_backend(self.backend, x))
        coef = self.coef.to(dtype)
        return coef, spline.spline_table(coef.detach()), self.base_weight.to(dtype), config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The spline must not run in fp16/bf16: autocast is switched off and everything is done in fp32.
        with torch.autocast(device_type=x.device.type, enabled=False):
            if not self.uses_function():
                self._check_input(x)
                return self._forward_plain(x, self.spline_channel_dim)
            return _SharedSplineFunction.apply(x, *self.function_inputs(x))

    def _forward_plain(self, x: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
        x32 = x.to(_compute_dtype(x))
        u = (x32 - self.grid_range[0]) * self.inv_h
        if self.spline_grad == "free":
            u = u.detach()
        coef, wb = self.coef.to(x32.dtype), self.base_weight.to(x32.dtype)
        if channel_dim is None:
            columns = [coef[0, j] for j in range(coef.shape[1])]
            wb = wb[0]
        else:
            if coef.shape[0] != x32.shape[channel_dim]:  # share="group": each group's spline for its channels
                per_group = x32.shape[channel_dim] // coef.shape[0]
                coef, wb = coef.repeat_interleave(per_group, 0), wb.repeat_interleave(per_group, 0)
            shape = _channel_shape(x32, channel_dim)
            columns = [coef[:, j].reshape(shape) for j in range(coef.shape[1])]
            wb = wb.reshape(shape)
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


@contextlib.contextmanager
def spline_backend(module: nn.Module, backend: str):
    """Every SharedSplineActivation in ``module`` evaluates with ``backend`` inside the block, then as before; e.g.
    ``"torch"`` for an export that must hold plain ops only (export-onnx)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed values: {BACKENDS}")
    activations = [m for m in module.modules() if isinstance(m, SharedSplineActivation)]
    before = [a.backend for a in activations]
    try:
        for a in activations:
            a.backend = backend
        yield module
    finally:
        for a, b in zip(activations, before):
            a.backend = b
