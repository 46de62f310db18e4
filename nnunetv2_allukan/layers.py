"""KA layers: every Linear becomes KALinear and every convolution becomes KAonv.

Each KA layer subclasses the torch layer it replaces and applies a SharedSplineActivation to its input
first: y = layer(phi(x)). Subclassing keeps ``.weight``, ``.bias``, ``in_channels``, ``stride`` and friends,
the torch parameter initialisation and ``output_size`` handling of transposed convolutions; the padding a
convolution adds is applied to phi(x), exactly as in the unfold formulation of a KAN convolution.
"""
from __future__ import annotations

import torch
from torch import nn

from .activation import SharedSplineActivation


class KAModule:
    """Marker base of every KA layer; ``.activation`` is its SharedSplineActivation."""

    activation: SharedSplineActivation

    def _init_activation(self, num_channels: int, channel_dim: int, spline_kwargs: dict):
        if "num_channels" in spline_kwargs or "channel_dim" in spline_kwargs:
            raise ValueError("num_channels and channel_dim of a KA layer's activation follow from the layer; "
                             "do not pass them")
        self.activation = SharedSplineActivation(num_channels=num_channels, channel_dim=channel_dim,
                                                 **spline_kwargs)


class KALinear(KAModule, nn.Linear):
    """y = W phi(x) + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 **spline_kwargs):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_activation(in_features, -1, spline_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.activation(x))


def _ka_conv(torch_conv: type, name: str) -> type:
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, **spline_kwargs):
        torch_conv.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                            dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                            device=device, dtype=dtype)
        self._init_activation(in_channels, 1, spline_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
