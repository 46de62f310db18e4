"""KA layers: every Linear becomes KALinear and every convolution becomes KAonv.

Each KA layer subclasses the torch layer it replaces and applies a SharedSplineActivation to its input
first: y = layer(phi(x)). Subclassing keeps ``.weight``, ``.bias``, ``in_channels``, ``stride`` and friends,
the torch parameter initialisation and ``output_size`` handling of transposed convolutions. The padding a
convolution adds is applied to phi(x): a kernel tap outside the image contributes nothing, as in a CNN and as in
the reference per-edge KAN convolution (``reference.KANConv2d``/``3d``, which masks those taps), so the two agree
at the borders too (tested with tied weights). Zero-padding x before phi would instead add phi(0), which is not 0
for a spline, once per outside tap.

Phi and the linear map run as one autograd node (``_KAFunction``) that keeps only ``x`` for
backward and recomputes phi(x) there: run as two ops, autograd would also keep phi(x) for the weight gradient,
one extra activation-sized tensor per layer, and the network would need ~1.5x the activation memory of a CNN
(conv + norm + in-place LeakyReLU keep two tensors per block; so does KAonv + norm when fused).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from .activation import SharedSplineActivation, SplineEvaluation
from .func_transforms import batch_dim_first, first_order_backward, per_sample


def _op_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype torch would run the conv/linear in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ConvSpec(NamedTuple):
    """Arguments of aten.convolution, for both directions of a (transposed) convolution."""
    stride: list
    padding: list
    dilation: list
    transposed: bool
    output_padding: list
    groups: int

    def forward(self, phi, weight, bias):
        return torch.ops.aten.convolution(phi, weight, bias, self.stride, self.padding, self.dilation,
                                          self.transposed, self.output_padding, self.groups)

    def backward(self, grad_out, phi, weight, has_bias, mask):
        return torch.ops.aten.convolution_backward(
            grad_out, phi, weight, [grad_out.shape[1]] if has_bias else None, self.stride, self.padding,
            self.dilation, self.transposed, self.output_padding, self.groups, mask)


class LinearSpec(NamedTuple):
    def forward(self, phi, weight, bias):
        return F.linear(phi, weight, bias)

    def backward(self, grad_out, phi, weight, has_bias, mask):
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_phi = grad_out @ weight if mask[0] else None
        grad_weight = rows.t() @ phi.reshape(-1, phi.shape[-1]) if mask[1] else None
        grad_bias = rows.sum(0) if has_bias and mask[2] else None
        return grad_phi, grad_weight, grad_bias


class _KAFunction(torch.autograd.Function):
    """y = op(phi(x)) with only x (and the parameters) saved; phi(x) is recomputed in backward.

    Forward without ctx plus ``setup_context`` and a ``vmap`` rule: the form torch.func (grad, vmap, vjp) needs.
    """

    @staticmethod
    def forward(x, coef, table, base_weight, weight, bias, spline_config, op, dtype):
        phi = SplineEvaluation(x, table, base_weight, spline_config).values(dtype)
        return op.forward(phi, weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, coef, table, base_weight, weight, bias, spline_config, op, dtype = inputs
        ctx.save_for_backward(x, table, base_weight, weight)
        ctx.spline_config, ctx.op, ctx.dtype, ctx.has_bias = spline_config, op, dtype, bias is not None

    @staticmethod
    def vmap(info, in_dims, x, coef, table, base_weight, weight, bias, spline_config, op, dtype):
        args = (x, coef, table, base_weight, weight, bias, spline_config, op, dtype)
        if any(d is not None for d in in_dims[1:6]):  # batched parameters: one sample at a time
            return per_sample(_KAFunction, info, in_dims, args), 0
        x, channel_dim = batch_dim_first(x, in_dims[0], spline_config.channel_dim, info.batch_size)
        if isinstance(op, LinearSpec):  # any leading dimensions; channels last
            config = spline_config._replace(channel_dim=channel_dim)
            return _KAFunction.apply(x, coef, table, base_weight, weight, bias, config, op, dtype), 0
        # a convolution: vmap's batch and the conv's batch (N, C, *spatial) become one batch, channels stay at 1
        out = _KAFunction.apply(x.flatten(0, 1), coef, table, base_weight, weight, bias, spline_config, op, dtype)
        return out.unflatten(0, x.shape[:2]), 0

    @staticmethod
    def backward(ctx, grad_out):
        spline_config, op, dtype, has_bias = ctx.spline_config, ctx.op, ctx.dtype, ctx.has_bias
        need_x, need_coef, _, need_wb, need_weight, need_bias = ctx.needs_input_grad[:6]
        need_phi = need_x or need_coef or need_wb

        def formula(x, table, base_weight, weight, grad_out):
            evaluation = SplineEvaluation(x, table, base_weight, spline_config)
            grad_out, weight_ = grad_out.to(dtype), weight.to(dtype)
            if need_phi and evaluation.values_with_gradients:
                # The input gradient of the linear map does not need phi; one pass over x then gives phi (for the
                # weight gradient) and the spline's gradients together.
                like_phi = x if x.dtype == dtype else x.to(dtype)
                grad_phi = op.backward(grad_out, like_phi, weight_, has_bias, [True, False, False])[0]
                del like_phi
                *grads, phi = evaluation.gradients_and_values(grad_phi, need_x, need_coef, need_wb, dtype)
                del grad_phi
                _, grad_weight, grad_bias = op.backward(grad_out, phi, weight_, has_bias,
                                                        [False, need_weight, need_bias])
            else:
                phi = evaluation.values(dtype)
                grad_phi, grad_weight, grad_bias = op.backward(grad_out, phi, weight_, has_bias,
                                                               [need_phi, need_weight, need_bias])
                del phi
                grads = (evaluation.gradients(grad_phi, need_x, need_coef, need_wb) if need_phi
                         else (None, None, None))
            grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
            grad_bias = None if grad_bias is None else grad_bias.to(weight.dtype)
            return (*grads, grad_weight, grad_bias)

        grad_x, grad_coef, grad_wb, grad_weight, grad_bias = first_order_backward(formula, *ctx.saved_tensors,
                                                                                  grad_out)
        return grad_x, grad_coef, None, grad_wb, grad_weight, grad_bias, None, None, None


class KAModule:
    """Marker base of every KA layer; ``.activation`` is its SharedSplineActivation.

    ``fuse_activation`` (default True) runs phi and the layer's linear map as one memory-saving autograd node
    whenever the activation uses its custom Function (``impl="function"``, the default, eager or compiled); set
    it to False to run them as two ops, e.g. to swap the activation's forward for an experiment.
    """

    activation: SharedSplineActivation
    fuse_activation: bool = True

    def _init_activation(self, num_channels: int, channel_dim: int, spline_kwargs: dict):
        if "num_channels" in spline_kwargs or "channel_dim" in spline_kwargs:
            raise ValueError("num_channels and channel_dim of a KA layer's activation follow from the layer; "
                             "do not pass them")
        self.activation = SharedSplineActivation(num_channels=num_channels, channel_dim=channel_dim,
                                                 **spline_kwargs)

    def _use_fused(self) -> bool:
        return self.fuse_activation and self.activation.uses_function()

    def _fused(self, x: torch.Tensor, op) -> torch.Tensor:
        dtype = _op_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            coef, table, base_weight, spline_config = self.activation.function_inputs(x)
            return _KAFunction.apply(x, coef, table, base_weight, self.weight, self.bias, spline_config, op, dtype)


class KALinear(KAModule, nn.Linear):
    """y = W phi(x) + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 **spline_kwargs):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_activation(in_features, -1, spline_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_fused():
            return self._fused(x, LinearSpec())
        return super().forward(self.activation(x))


def _ka_conv(torch_conv: type, name: str) -> type:
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, **spline_kwargs):
        torch_conv.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                            dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                            device=device, dtype=dtype)
        self._init_activation(in_channels, 1, spline_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == len(self.kernel_size) + 1:  # unbatched (C, *spatial), as torch's conv accepts it
            return forward(self, x.unsqueeze(0)).squeeze(0)
        # String paddings ("same") and non-zero padding modes stay with torch's own conv forward.
        if self._use_fused() and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            spec = ConvSpec(list(self.stride), list(self.padding), list(self.dilation), False,
                            [0] * len(self.stride), self.groups)
            return self._fused(x, spec)
        return torch_conv.forward(self, self.activation(x))

    doc = f"y = {torch_conv.__name__}(phi(x)); arguments as in torch, plus SharedSplineActivation keywords."
    return type(name, (KAModule, torch_conv), {"__init__": __init__, "forward": forward, "__doc__": doc,
                                                "__module__": __name__})


def _ka_conv_transpose(torch_conv: type, name: str) -> type:
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None, **spline_kwargs):
        torch_conv.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                            output_padding=output_padding, groups=groups, bias=bias, dilation=dilation,
                            padding_mode=padding_mode, device=device, dtype=dtype)
        self._init_activation(in_channels, 1, spline_kwargs)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if x.dim() == len(self.kernel_size) + 1:  # unbatched (C, *spatial), as torch's conv accepts it
            spatial_size = None if output_size is None else list(output_size)[-len(self.kernel_size):]
            return forward(self, x.unsqueeze(0), spatial_size).squeeze(0)
        if self._use_fused():
            n_spatial = len(self.kernel_size)
            output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                                  n_spatial, self.dilation)
            spec = ConvSpec(list(self.stride), list(self.padding), list(self.dilation), True, list(output_padding),
                            self.groups)
            return self._fused(x, spec)
        return torch_conv.forward(self, self.activation(x), output_size)

    doc = f"y = {torch_conv.__name__}(phi(x)); arguments as in torch, plus SharedSplineActivation keywords."
    return type(name, (KAModule, torch_conv), {"__init__": __init__, "forward": forward, "__doc__": doc,
                                                "__module__": __name__})


KAonv1d = _ka_conv(nn.Conv1d, "KAonv1d")
KAonv2d = _ka_conv(nn.Conv2d, "KAonv2d")
KAonv3d = _ka_conv(nn.Conv3d, "KAonv3d")
KAonvTranspose2d = _ka_conv_transpose(nn.ConvTranspose2d, "KAonvTranspose2d")
KAonvTranspose3d = _ka_conv_transpose(nn.ConvTranspose3d, "KAonvTranspose3d")

# nnU-Net plans name torch conv ops; the network builder maps them to their KA counterparts.
KA_CONV_FOR = {nn.Conv1d: KAonv1d, nn.Conv2d: KAonv2d, nn.Conv3d: KAonv3d}
KA_CONV_TRANSPOSE_FOR = {nn.Conv2d: KAonvTranspose2d, nn.Conv3d: KAonvTranspose3d}
