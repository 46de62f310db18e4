"""The comparators of DESIGN.md §3, built from the same nnU-Net plans keywords as ``AllUKAN``.

* ``UKAN`` -- partial KA, the U-KAN design adapted to nnU-Net plans: conv -> norm -> LeakyReLU stages (nnU-Net's
  own ``StackedConvBlocks``), with a tokenised block at the deepest ``token_stages`` resolutions whose per-token
  maps are the reference per-edge ``KANLinear``; ConvTranspose up-sampling and 1x1 conv heads.
* ``StackedKAN`` -- the paper's "directly deeply stacked KAN": the AllUKAN topology with the reference per-edge
  ``KANConv2d``/``KANConv3d`` for every convolution and ``KANLinear`` for every per-token map. The up-sampling is
  ``KANConvTransposeByStride`` below, the per-edge KAN counterpart of AllUKAN's ``KAonvTranspose`` with
  kernel_size == stride.

Both share AllUKAN's encoder/decoder containers, so deep supervision is switched by ``.decoder.deep_supervision``
(full resolution first) and the state_dict does not depend on it. At image borders StackedKAN and AllUKAN agree:
in both, a kernel tap outside the image contributes nothing (KAonv zero-pads phi(x); the per-edge KANConv masks the
tap), so the comparison measures per-edge against shared splines, not two padding conventions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

from nnunetv2_allukan.spline import validate_grid
from nnunetv2_allukan.reference import KANConv2d, KANConv3d, KANLinear

from .allukan import AllUKANDecoder, AllUKANEncoder, PlansTopology, _locate, parse_plans, validate_topology_kwargs

KAN_CONV_FOR = {nn.Conv2d: KANConv2d, nn.Conv3d: KANConv3d}


@dataclass
class LayerFactories:
    """What distinguishes the comparators; the U-Net wiring around them is shared (``build_unet``).

    ``conv_stage(c_in, c_out, kernel, first_stride, n_blocks)``, ``token_block(channels)``,
    ``upsampler(c_in, c_out, stride)`` and ``head(c_in, num_classes)`` each return a module.
    """

    conv_stage: Callable[..., nn.Module]
    token_block: Callable[[int], nn.Module]
    upsampler: Callable[[int, int, list], nn.Module]
    head: Callable[[int, int], nn.Module]


def build_unet(topology: PlansTopology, input_channels: int, num_classes: int, token_stages: int, skip_mode: str,
               deep_supervision: bool, layers: LayerFactories) -> tuple[AllUKANEncoder, AllUKANDecoder]:
    """AllUKAN's topology (conv stages, tokenised deepest stages, skip fusion, a head per decoder stage)."""
    t = topology
    first_token_stage = t.n_stages - token_stages

    def stage(c_in, c_out, kernel, first_stride, n_blocks, with_tokens):
        blocks = [layers.conv_stage(c_in, c_out, kernel, first_stride, n_blocks)]
        if with_tokens:
            blocks.append(layers.token_block(c_out))
        return nn.Sequential(*blocks)

    encoder_stages, c_in = [], input_channels
    for s in range(t.n_stages):
        encoder_stages.append(stage(c_in, t.features[s], t.kernel_sizes[s], t.strides[s], t.n_conv[s],
                                    s >= first_token_stage))
        c_in = t.features[s]
    upsamplers, decoder_stages, heads = [], [], []
    for s in range(t.n_stages - 2, -1, -1):
        upsamplers.append(layers.upsampler(t.features[s + 1], t.features[s], t.strides[s + 1]))
        fused = 2 * t.features[s] if skip_mode == "concat" else t.features[s]
        decoder_stages.append(stage(fused, t.features[s], t.kernel_sizes[s], 1, t.n_conv_decoder[s],
                                    s >= first_token_stage))
        heads.append(layers.head(t.features[s], num_classes))
    return (AllUKANEncoder(encoder_stages),
            AllUKANDecoder(upsamplers, decoder_stages, heads, skip_mode, deep_supervision))


class TokenBlock(nn.Module):
    """U-KAN's tokenised block: x + Sub_n(...Sub_1(LayerNorm(x))), Sub_i = per-token map -> depthwise conv block.

    The per-token maps (``token_maps``) act on (N, L, C) tokens, the depthwise blocks on (N, C, *spatial).
    """

    def __init__(self, channels: int, token_maps: Sequence[nn.Module], depthwise_blocks: Sequence[nn.Module]):
        super().__init__()
        if len(token_maps) != len(depthwise_blocks):
            raise ValueError("TokenBlock needs one depthwise block per token map")
        self.layer_norm = nn.LayerNorm(channels)
        self.token_maps = nn.ModuleList(token_maps)
        self.depthwise = nn.ModuleList(depthwise_blocks)

    def forward(self, x):
        spatial = x.shape[2:]
        y = self.layer_norm(x.flatten(2).transpose(1, 2))
        for token_map, depthwise in zip(self.token_maps, self.depthwise):
            y = token_map(y).transpose(1, 2).reshape(x.shape[0], -1, *spatial)
            y = depthwise(y).flatten(2).transpose(1, 2)
        return x + y.transpose(1, 2).reshape(x.shape)


def _kan_kwargs(network_name: str, grid_size, grid_range) -> dict:
    try:
        lo, hi = validate_grid(grid_size, grid_range)
    except ValueError as e:
        raise ValueError(f"{network_name}: {e}") from None
    return {"grid_size": grid_size, "grid_range": (lo, hi)}


class UKAN(nn.Module):
    """Partial-KA U-KAN on nnU-Net plans: CNN stages, per-edge KANLinear only in the tokenised deepest stages.

    Args (plans): as ``AllUKAN`` / nnU-Net's ``PlainConvUNet``; ``nonlin`` (+kwargs, default LeakyReLU) is used.
    Args (KA): ``token_stages`` (default 2, as U-KAN), ``skip_mode`` ("concat" as nnU-Net | "add" as U-KAN),
    ``grid_size``/``grid_range`` of the KANLinear splines (default 5 on [-3, 3], matching LayerNorm outputs).
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = True,
                 norm_op=None, norm_op_kwargs: dict | None = None, dropout_op=None,
                 dropout_op_kwargs: dict | None = None, nonlin=None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, nonlin_first: bool = False, *, token_stages: int = 2,
                 skip_mode: str = "concat", grid_size: int = 5, grid_range: Sequence[float] = (-3.0, 3.0)):
        super().__init__()
        t = parse_plans("UKAN", n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
                        n_conv_per_stage_decoder, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs)
        validate_topology_kwargs("UKAN", token_stages, n_stages, skip_mode)
        kan = _kan_kwargs("UKAN", grid_size, grid_range)
        if nonlin is None:
            nonlin, nonlin_kwargs = nn.LeakyReLU, {"inplace": True}
        nonlin, nonlin_kwargs = _locate(nonlin, "UKAN"), dict(nonlin_kwargs or {})
        conv_kwargs = dict(conv_bias=conv_bias, norm_op=t.norm_op, norm_op_kwargs=t.norm_op_kwargs,
                           nonlin=nonlin, nonlin_kwargs=nonlin_kwargs, nonlin_first=nonlin_first)
        transpose_op = nn.ConvTranspose2d if t.dim == 2 else nn.ConvTranspose3d

        def conv_stage(c_in, c_out, kernel, first_stride, n_blocks):
            return StackedConvBlocks(n_blocks, t.conv_op, c_in, c_out, kernel, first_stride,
                                     dropout_op=t.dropout_op, dropout_op_kwargs=t.dropout_op_kwargs, **conv_kwargs)

        def token_block(channels):
            # U-KAN's DW_bn_relu: depthwise 3x3(x3) conv -> norm -> nonlinearity after every KANLinear.
            depthwise = [nn.Sequential(t.conv_op(channels, channels, 3, padding=1, groups=channels, bias=conv_bias),
                                       t.norm_op(channels, **t.norm_op_kwargs), nonlin(**nonlin_kwargs))
                         for _ in range(3)]
            return TokenBlock(channels, [KANLinear(channels, channels, **kan) for _ in range(3)], depthwise)

        layers = LayerFactories(
            conv_stage=conv_stage, token_block=token_block,
            upsampler=lambda c_in, c_out, stride: transpose_op(c_in, c_out, stride, stride=stride, bias=conv_bias),
            head=lambda c_in, n_classes: t.conv_op(c_in, n_classes, 1, bias=True))
        self.encoder, self.decoder = build_unet(t, input_channels, num_classes, token_stages, skip_mode,
                                                deep_supervision, layers)
        self.num_classes = num_classes
        self.strides = t.strides

    def forward(self, x):
        return self.decoder(self.encoder(x))

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)


class KANConvTransposeByStride(nn.Module):
    """Per-edge KAN transposed convolution with kernel_size == stride (what nnU-Net and AllUKAN up-sample with).

    With kernel == stride, each output voxel depends on exactly one input voxel, at one offset ``r`` inside the
    stride block. The op is therefore a per-voxel ``KANLinear`` from C_in to C_out * prod(stride), followed by a
    pixel shuffle: the edge (c_in -> c_out, r) owns its own spline, as in a per-edge KAN, and the weight count is
    that of ``ConvTranspose(kernel=stride)`` times G + k + 2. (The reference module has no transposed KAN
    convolution; nearest up-sampling plus a KAN conv would change the topology and the parameter count.)
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], **kan_kwargs):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride = tuple(int(s) for s in stride)
        self.linear = KANLinear(in_channels, out_channels * math.prod(self.stride), **kan_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, *spatial = x.shape
        dim = len(spatial)
        if dim != len(self.stride):
            raise ValueError(f"KANConvTransposeByStride with stride {self.stride} got input of shape "
                             f"{tuple(x.shape)}")
        y = self.linear(x.movedim(1, -1))  # (N, *spatial, C_out * prod(stride))
        y = y.reshape(n, *spatial, self.out_channels, *self.stride)
        # (N, C_out, d_0, s_0, d_1, s_1, ...) so that each stride offset lands next to its input voxel.
        order = [0, dim + 1] + [axis for d in range(dim) for axis in (1 + d, dim + 2 + d)]
        return y.permute(order).reshape(n, self.out_channels, *(d * s for d, s in zip(spatial, self.stride)))


class KANConvBlock(nn.Sequential):
    """Per-edge KAN conv -> norm (-> dropout), mirroring AllUKAN's KAConvBlock (the splines are the nonlinearity)."""

    def __init__(self, kan_conv, c_in, c_out, kernel_size, stride, norm_op, norm_op_kwargs, dropout_op,
                 dropout_op_kwargs, kan_kwargs, groups=1):
        padding = [(k - 1) // 2 for k in kernel_size]
        layers = [kan_conv(c_in, c_out, kernel_size, stride=stride, padding=padding, groups=groups, **kan_kwargs),
                  norm_op(c_out, **norm_op_kwargs)]
        if dropout_op is not None:
            layers.append(dropout_op(**dropout_op_kwargs))
        super().__init__(*layers)


class StackedKAN(nn.Module):
    """The "directly deeply stacked KAN": AllUKAN's topology, every layer a reference per-edge KAN layer.

    Args (plans): as ``AllUKAN`` (``nonlin`` is accepted and ignored: the per-edge splines are the nonlinearity;
    ``conv_bias`` too: a per-edge KAN layer has no bias). Args (KA): ``token_stages``, ``skip_mode``,
    ``grid_size``, ``grid_range`` (default 5 on [-3, 3], as AllUKAN). Slow and memory-hungry by design.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = True,
                 norm_op=None, norm_op_kwargs: dict | None = None, dropout_op=None,
                 dropout_op_kwargs: dict | None = None, nonlin=None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, nonlin_first: bool = False, *, token_stages: int = 2,
                 skip_mode: str = "concat", grid_size: int = 5, grid_range: Sequence[float] = (-3.0, 3.0)):
        super().__init__()
        t = parse_plans("StackedKAN", n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                        n_conv_per_stage, n_conv_per_stage_decoder, norm_op, norm_op_kwargs, dropout_op,
                        dropout_op_kwargs)
        validate_topology_kwargs("StackedKAN", token_stages, n_stages, skip_mode)
        kan = _kan_kwargs("StackedKAN", grid_size, grid_range)
        kan_conv = KAN_CONV_FOR[t.conv_op]
        block = dict(norm_op=t.norm_op, norm_op_kwargs=t.norm_op_kwargs, kan_kwargs=kan)

        def conv_stage(c_in, c_out, kernel, first_stride, n_blocks):
            return nn.Sequential(*(
                KANConvBlock(kan_conv, c_in if b == 0 else c_out, c_out, kernel, first_stride if b == 0 else 1,
                             dropout_op=t.dropout_op, dropout_op_kwargs=t.dropout_op_kwargs, **block)
                for b in range(n_blocks)))

        def token_block(channels):
            depthwise = [KANConvBlock(kan_conv, channels, channels, [3] * t.dim, 1, dropout_op=None,
                                      dropout_op_kwargs=None, groups=channels, **block) for _ in range(3)]
            return TokenBlock(channels, [KANLinear(channels, channels, **kan) for _ in range(3)], depthwise)

        layers = LayerFactories(
            conv_stage=conv_stage, token_block=token_block,
            upsampler=lambda c_in, c_out, stride: KANConvTransposeByStride(c_in, c_out, stride, **kan),
            head=lambda c_in, n_classes: kan_conv(c_in, n_classes, 1, **kan))
        self.encoder, self.decoder = build_unet(t, input_channels, num_classes, token_stages, skip_mode,
                                                deep_supervision, layers)
        self.num_classes = num_classes
        self.strides = t.strides

    def forward(self, x):
        return self.decoder(self.encoder(x))


__all__ = ["UKAN", "StackedKAN", "KANConvTransposeByStride", "TokenBlock", "KANConvBlock"]
