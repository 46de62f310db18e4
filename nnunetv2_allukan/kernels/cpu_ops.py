"""The numba CPU kernels as ``torch.library`` custom ops: ``torch.ops.allukan.spline_phi_cpu`` and
``torch.ops.allukan.spline_phi_backward_cpu``, the CPU twins of ``ops`` (Triton).

One opaque node each for ``torch.compile`` (with a fake implementation for shapes). Inputs may have any layout
(outputs follow ``x``'s, ``spline.MemoryLayout``) and any float dtype: the kernels compute in the table's dtype
(float32 or float64), so half-precision inputs and gradients are converted to it first (CPU autocast only).
The thread count is read per call from ``torch.get_num_threads()``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import spline
from . import cpu_spline


def _threads() -> int:
    import os
    return int(os.environ.get("ALLUKAN_CPU_THREADS", torch.get_num_threads()))


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
    cpu_spline.phi(_compute_view(layout, layout.x, compute), table.contiguous(), base_weight.contiguous(), lo, inv_h,
                   base, leaky_slope, layout.view3(out), _threads())
    return out if dtype == compute else out.to(dtype)


@spline_phi_cpu.register_fake
def _(x, table, base_weight, lo, inv_h, channel_dim, base, leaky_slope, dtype):
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("allukan::spline_phi_backward_cpu", mutates_args=(), device_types="cpu")
def spline_phi_backward_cpu(x: torch.Tensor, grad_phi: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor,
                            lo: float, inv_h: float, channel_dim: Optional[int], base: str, leaky_slope: float,
                            exact: bool, need_x: bool, need_params: bool, phi_dtype: Optional[torch.dtype] = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx in x's dtype, dL/dtable, dL/dbase_weight, phi(x) in ``phi_dtype``); an output that is not needed is
    an empty tensor, phi among them when ``phi_dtype`` is None. phi comes from the same pass over x: a KA layer's
    backward needs it for its weight gradient, and the conv's input gradient (``grad_phi``) does not need it."""
    layout = spline.MemoryLayout(x, channel_dim, table.shape[0])
    compute = table.dtype
    grad_x = layout.empty(compute) if need_x else None
    phi = layout.empty(compute) if phi_dtype is not None else None
    grad_table, grad_wb = cpu_spline.phi_grads(
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
        grad_table, grad_wb = table.new_empty(0), base_weight.new_empty(0)
    return grad_x, grad_table, grad_wb, phi


@spline_phi_backward_cpu.register_fake
def _(x, grad_phi, table, base_weight, lo, inv_h, channel_dim, base, leaky_slope, exact, need_x, need_params,
      phi_dtype=None):
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    phi = torch.empty_like(x, dtype=phi_dtype) if phi_dtype is not None else x.new_empty(0)
    if need_params:
        return grad_x, torch.empty_like(table), torch.empty_like(base_weight), phi
    return grad_x, table.new_empty(0), base_weight.new_empty(0), phi


def smoke_test():
    """Compile (or load from numba's cache) the float32 kernels and check them on a few values against the
    closed-form spline and autograd; raises if they disagree (``kernels.cpu_kernels_available`` then falls back)."""
    lo, hi, grid = -3.0, 3.0, 5
    inv_h = grid / (hi - lo)
    x = torch.linspace(-5.0, 5.0, 41).reshape(1, 1, 41)
    coef = torch.linspace(-1.0, 1.0, spline.num_bases(grid)).reshape(1, -1)
    table = spline.spline_table(coef)
    base_weight = torch.ones(1)
    phi = spline_phi_cpu(x, table, base_weight, lo, inv_h, None, "silu", 0.01, torch.float32)
    columns = [coef[0, j] for j in range(coef.shape[1])]
    x_ref = x.detach().clone().requires_grad_()
    reference = torch.nn.functional.silu(x_ref) + spline.spline_on_the_fly((x_ref - lo) * inv_h, columns)
    grad_x, _, grad_wb, phi_again = spline_phi_backward_cpu(x, torch.ones_like(x), table, base_weight, lo, inv_h, None,
                                                            "silu", 0.01, True, True, True, torch.float32)
    reference.sum().backward()
    checks = {"phi": (phi, reference.detach()), "phi in backward": (phi_again, reference.detach()), "dphi/dx": (grad_x, x_ref.grad),
              "dphi/dw_b": (grad_wb, torch.nn.functional.silu(x).sum().reshape(1))}
    for name, (got, want) in checks.items():
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"the CPU kernels' {name} disagrees with the closed form by "
                               f"{(got - want).abs().max().item():.3g}")
