"""The Triton kernels as ``torch.library`` custom ops: ``torch.ops.allukan.spline_phi`` and
``torch.ops.allukan.spline_phi_backward``.

Each is one opaque node for ``torch.compile`` (with a fake implementation for shapes), instead of a graph break
or the torch path's ~20 ops per direction. They are differentiated by the activation's and the KA layers' autograd
Functions, which call the backward op; the ops carry no autograd formula of their own.
The inputs may have any layout: outputs follow ``x``'s (``spline.MemoryLayout``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import spline
from . import triton_spline

_GRID_PARAMS: dict = {}


def _grid_params(lo: float, inv_h: float, leaky_slope: float, dtype: torch.dtype, device: torch.device):
    """(lo, inv_h, slope) as a tensor of the compute dtype, made once per device (a host-to-device copy per call
    would wait for the GPU)."""
    key = (lo, inv_h, leaky_slope, dtype, device)
    params = _GRID_PARAMS.get(key)
    if params is None:
        params = _GRID_PARAMS[key] = torch.tensor([lo, inv_h, leaky_slope], dtype=dtype, device=device)
    return params


@torch.library.custom_op("allukan::spline_phi", mutates_args=())
def spline_phi(x: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor, lo: float, inv_h: float,
               channel_dim: Optional[int], base: str, leaky_slope: float, dtype: torch.dtype) -> torch.Tensor:
    """phi(x) in ``dtype``; math in the table's dtype. ``channel_dim`` None: one spline (``share="layer"``); a
    table with fewer rows than channels: one spline per group of consecutive channels."""
    layout = spline.MemoryLayout(x, channel_dim, table.shape[0])
    out = layout.empty(dtype)
    triton_spline.phi(layout.view3(layout.x), table.contiguous(), base_weight.contiguous(),
                      _grid_params(lo, inv_h, leaky_slope, table.dtype, x.device), base, layout.view3(out))
    return out


@spline_phi.register_fake
def _(x, table, base_weight, lo, inv_h, channel_dim, base, leaky_slope, dtype):
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("allukan::spline_phi_backward", mutates_args=())
def spline_phi_backward(x: torch.Tensor, grad_phi: torch.Tensor, table: torch.Tensor, base_weight: torch.Tensor,
                        lo: float, inv_h: float, channel_dim: Optional[int], base: str, leaky_slope: float,
                        exact: bool, need_x: bool, need_params: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx in x's dtype, dL/dcoefficients (C, G + 3), dL/dbase_weight); an output that is not needed is an empty
    tensor."""
    layout = spline.MemoryLayout(x, channel_dim, table.shape[0])
    grad_x = layout.empty(x.dtype) if need_x else x.new_empty(0)
    grad_coef, grad_wb = triton_spline.phi_grads(
        layout.view3(layout.x), layout.view3(layout.like(grad_phi)), table.contiguous(), base_weight.contiguous(),
        _grid_params(lo, inv_h, leaky_slope, table.dtype, x.device), base, exact,
        layout.view3(grad_x) if need_x else None, need_params)
    if not need_params:
        grad_coef, grad_wb = table.new_empty(0), base_weight.new_empty(0)
    return grad_x, grad_coef, grad_wb


@spline_phi_backward.register_fake
def _(x, grad_phi, table, base_weight, lo, inv_h, channel_dim, base, leaky_slope, exact, need_x, need_params):
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    if need_params:
        return grad_x, table.new_empty(spline.coefficients_shape(table)), torch.empty_like(base_weight)
    return grad_x, table.new_empty(0), base_weight.new_empty(0)
