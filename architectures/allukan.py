"""ALL U-KAN built from an nnU-Net plans configuration (DESIGN.md §3).

Every convolution is a KAonv, every per-voxel linear map a KALinear; apart from normalisation there is
nothing else with weights. The constructor takes the same keywords as dynamic-network-architectures'
``PlainConvUNet`` (so a plans ``architecture`` block written for it can name this class instead), plus the KA
choices. ``nonlin``/``nonlin_kwargs`` are accepted and ignored: the spline activation is the nonlinearity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from dynamic_network_architectures.building_blocks.helper import (convert_conv_op_to_dim,
                                                                  get_matching_instancenorm,
                                                                  maybe_convert_scalar_to_list)
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

from nnunetv2_allukan.activation import ACTIVATIONS, SHARE_MODES, SPLINE_GRAD_MODES, SPLINE_INITS
from nnunetv2_allukan.spline import validate_grid
from nnunetv2_allukan.layers import KA_CONV_FOR, KA_CONV_TRANSPOSE_FOR, KALinear

SKIP_MODES = ("concat", "add")


@dataclass
class PlansTopology:
    """The plans keywords of one network, resolved to per-stage lists and torch ops."""

    dim: int
    conv_op: type
    norm_op: type
    norm_op_kwargs: dict
    dropout_op: type | None
    dropout_op_kwargs: dict
    features: list
    kernel_sizes: list
    strides: list
    n_conv: list
    n_conv_decoder: list

    @property
    def n_stages(self) -> int:
        return len(self.features)


def parse_plans(network_name: str, n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
                n_conv_per_stage_decoder, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs) -> PlansTopology:
    """Resolve a plans ``architecture`` block (PlainConvUNet's keywords); errors name ``network_name``."""
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 2:
        # nnU-Net plans a single stage when the patch is too small to down-sample (e.g. a tiny 3d_lowres).
        raise ValueError(f"{network_name}: n_stages must be ≥ 2 (a U-Net needs at least one down-sampling step "
                         f"for its skip connections and tokenised stages), got n_stages={n_stages!r}; use a "
                         f"configuration with a larger patch_size, or another configuration")
    conv_op = _locate(conv_op, network_name)
    if conv_op not in KA_CONV_TRANSPOSE_FOR:
        raise ValueError(f"{network_name}: conv_op must be torch.nn.Conv2d or torch.nn.Conv3d, got {conv_op!r}")
    norm_op = _locate(norm_op, network_name) if norm_op is not None else get_matching_instancenorm(conv_op)
    dropout_op = _locate(dropout_op, network_name) if dropout_op is not None else None
    per_stage = {name: _per_stage(value, n, name, network_name) for name, value, n in (
        ("features_per_stage", features_per_stage, n_stages), ("kernel_sizes", kernel_sizes, n_stages),
        ("strides", strides, n_stages), ("n_conv_per_stage", n_conv_per_stage, n_stages),
        ("n_conv_per_stage_decoder", n_conv_per_stage_decoder, n_stages - 1))}
    return PlansTopology(
        dim=convert_conv_op_to_dim(conv_op), conv_op=conv_op, norm_op=norm_op,
        norm_op_kwargs=dict(norm_op_kwargs or {"eps": 1e-5, "affine": True}), dropout_op=dropout_op,
        dropout_op_kwargs=dict(dropout_op_kwargs or {}), features=per_stage["features_per_stage"],
        kernel_sizes=[maybe_convert_scalar_to_list(conv_op, k) for k in per_stage["kernel_sizes"]],
        strides=[maybe_convert_scalar_to_list(conv_op, s) for s in per_stage["strides"]],
        n_conv=per_stage["n_conv_per_stage"], n_conv_decoder=per_stage["n_conv_per_stage_decoder"])


def validate_topology_kwargs(network_name: str, token_stages, n_stages: int, skip_mode: str):
    if skip_mode not in SKIP_MODES:
        raise ValueError(f"{network_name}: skip_mode={skip_mode!r} is not supported; allowed: {SKIP_MODES}")
    if isinstance(token_stages, bool) or not isinstance(token_stages, int) or not 0 <= token_stages <= n_stages:
        raise ValueError(f"{network_name}: token_stages must be an integer in [0, n_stages={n_stages}], "
                         f"got {token_stages!r}")


def validate_ka_kwargs(spline_grad, share, grid_size, grid_range, token_stages, n_stages, skip_mode,
                      activation="spline", spline_init="silu-noise"):
    """Fail at build time, naming the argument, before any layer is made."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"AllUKAN: activation={activation!r} is not supported; allowed: {ACTIVATIONS}")
    if spline_init not in SPLINE_INITS:
        raise ValueError(f"AllUKAN: spline_init={spline_init!r} is not supported; allowed: {SPLINE_INITS}")
    if spline_grad not in SPLINE_GRAD_MODES:
        raise ValueError(f"AllUKAN: spline_grad={spline_grad!r} is not supported; allowed: {SPLINE_GRAD_MODES}")
    if share not in SHARE_MODES:
        raise ValueError(f"AllUKAN: share={share!r} is not supported; allowed: {SHARE_MODES}")
    validate_topology_kwargs("AllUKAN", token_stages, n_stages, skip_mode)
    try:
        validate_grid(grid_size, grid_range)
    except ValueError as e:
        raise ValueError(f"AllUKAN: {e}") from None


class KAConvBlock(nn.Sequential):
    """KAonv -> norm (-> dropout). No separate nonlinearity: phi inside the next KA layer is it."""

    def __init__(self, ka_conv, c_in, c_out, kernel_size, stride, norm_op, norm_op_kwargs, dropout_op,
                 dropout_op_kwargs, conv_bias, spline_kwargs, groups=1):
        padding = [(k - 1) // 2 for k in kernel_size]
        layers = [ka_conv(c_in, c_out, kernel_size, stride=stride, padding=padding, groups=groups, bias=conv_bias,
                          **spline_kwargs),
                  norm_op(c_out, **norm_op_kwargs)]
        if dropout_op is not None:
            layers.append(dropout_op(**dropout_op_kwargs))
        super().__init__(*layers)


class TokenKABlock(nn.Module):
    """Tokenised KA block (U-KAN's KAN block, fully KA): x + Sub3(Sub2(Sub1(LayerNorm(x)))).

    Each sub-block is a per-voxel KALinear on the tokens, then a depthwise 3x3(x3) KAonv and the norm.
    """

    def __init__(self, channels, dim, ka_conv, norm_op, norm_op_kwargs, conv_bias, spline_kwargs, n_sub_blocks=3):
        super().__init__()
        self.layer_norm = nn.LayerNorm(channels)
        self.token_linears = nn.ModuleList(KALinear(channels, channels, **spline_kwargs)
                                           for _ in range(n_sub_blocks))
        self.depthwise = nn.ModuleList(
            KAConvBlock(ka_conv, channels, channels, [3] * dim, 1, norm_op, norm_op_kwargs, None, None, conv_bias,
                        spline_kwargs, groups=channels)
            for _ in range(n_sub_blocks))

    def forward(self, x):
        spatial = x.shape[2:]
        y = self.layer_norm(x.flatten(2).transpose(1, 2))  # (N, L, C) tokens
        for linear, depthwise in zip(self.token_linears, self.depthwise):
            y = linear(y).transpose(1, 2).reshape(x.shape[0], -1, *spatial)
            y = depthwise(y)
            y = y.flatten(2).transpose(1, 2)
        return x + y.transpose(1, 2).reshape(x.shape)


class AllUKANEncoder(nn.Module):
    def __init__(self, stages: Sequence[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class AllUKANDecoder(nn.Module):
    """Up-sampling KAonvTranspose, skip fusion, KAonv blocks, a 1x1 KAonv head per stage.

    ``deep_supervision`` is the attribute nnU-Net's ``set_deep_supervision_enabled`` switches. All heads exist
    either way, so the state_dict does not depend on it.
    """

    def __init__(self, upsamplers, stages, heads, skip_mode, deep_supervision):
        super().__init__()
        self.upsamplers = nn.ModuleList(upsamplers)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(heads)
        self.skip_mode = skip_mode
        self.deep_supervision = deep_supervision

    def forward(self, skips):
        x = skips[-1]
        outputs = []
        n = len(self.stages)
        for i in range(n):
            x = self.upsamplers[i](x)
            skip = skips[-(i + 2)]
            x = torch.cat((x, skip), 1) if self.skip_mode == "concat" else x + skip
            x = self.stages[i](x)
            if self.deep_supervision:
                outputs.append(self.seg_layers[i](x))
            elif i == n - 1:
                outputs.append(self.seg_layers[-1](x))
        outputs = outputs[::-1]  # full resolution first, as nnU-Net's deep supervision loss expects
        return outputs if self.deep_supervision else outputs[0]


class AllUKAN(nn.Module):
    """ALL U-KAN: a U-Net made only of KA layers (plus normalisation), built from nnU-Net plans.

    Args (plans): ``input_channels``, ``n_stages``, ``features_per_stage``, ``conv_op`` (nn.Conv2d/3d or its
    dotted name), ``kernel_sizes``, ``strides``, ``n_conv_per_stage``, ``num_classes``,
    ``n_conv_per_stage_decoder``, ``conv_bias``, ``norm_op`` (+kwargs; default: instance norm), ``dropout_op``
    (+kwargs), ``deep_supervision``.
    Args (KA): ``spline_grad`` ("free"|"exact"), ``share`` ("layer"|"channel"|"group": 8 groups of channels), ``grid_size``, ``grid_range``,
    ``token_stages`` (how many of the deepest resolutions carry a tokenised KA block, default 2),
    ``skip_mode`` ("concat"|"add"), ``impl``, ``activation`` ("spline"|"fixed-silu"|"fixed-leakyrelu": the
    frozen-activation controls) and ``spline_init`` ("silu-noise"|"leakyrelu") (see SharedSplineActivation).
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = True,
                 norm_op=None, norm_op_kwargs: dict | None = None, dropout_op=None,
                 dropout_op_kwargs: dict | None = None, nonlin=None, nonlin_kwargs=None,
                 deep_supervision: bool = False, nonlin_first: bool = False, *,
                 spline_grad: str = "free", share: str = "layer", grid_size: int = 5,
                 grid_range: Sequence[float] = (-3.0, 3.0), token_stages: int = 2, skip_mode: str = "concat",
                 impl: str = "function", activation: str = "spline", spline_init: str = "silu-noise"):
        super().__init__()
        t = parse_plans("AllUKAN", n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
                        n_conv_per_stage_decoder, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs)
        validate_ka_kwargs(spline_grad, share, grid_size, grid_range, token_stages, n_stages, skip_mode, activation,
                           spline_init)
        conv_op, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs = \
            t.conv_op, t.norm_op, t.norm_op_kwargs, t.dropout_op, t.dropout_op_kwargs
        dim, features, kernel_sizes, strides, n_conv_dec = \
            t.dim, t.features, t.kernel_sizes, t.strides, t.n_conv_decoder
        spline_kwargs = dict(spline_grad=spline_grad, share=share, grid_size=grid_size,
                             grid_range=tuple(float(v) for v in grid_range), impl=impl, activation=activation,
                             spline_init=spline_init)
        ka_conv, ka_up = KA_CONV_FOR[conv_op], KA_CONV_TRANSPOSE_FOR[conv_op]
        first_token_stage = n_stages - token_stages
        block = dict(norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                     dropout_op_kwargs=dropout_op_kwargs, conv_bias=conv_bias, spline_kwargs=spline_kwargs)

        self.encoder = self.build_encoder(t, block, input_channels, first_token_stage)

        ups, dec, heads = [], [], []
        for s in range(n_stages - 2, -1, -1):
            ups.append(ka_up(features[s + 1], features[s], strides[s + 1], stride=strides[s + 1], bias=conv_bias,
                             **spline_kwargs))
            fused = 2 * features[s] if skip_mode == "concat" else features[s]
            dec.append(ka_stage(t, block, fused, features[s], kernel_sizes[s], 1, n_conv_dec[s],
                                s >= first_token_stage))
            heads.append(ka_conv(features[s], num_classes, [1] * dim, bias=True, **spline_kwargs))
        self.decoder = AllUKANDecoder(ups, dec, heads, skip_mode, deep_supervision)
        self.num_classes = num_classes
        self.strides = strides

    def build_encoder(self, t: PlansTopology, block: dict, input_channels: int, first_token_stage: int) -> nn.Module:
        """Plain KA stages: stage s is ``n_conv[s]`` x [KAonv -> norm], the first with the stage's stride.

        Called once from ``__init__``; ``AllUKANResEnc`` (architectures/resenc.py) builds residual stages here.
        """
        stages, c_in = [], input_channels
        for s in range(t.n_stages):
            stages.append(ka_stage(t, block, c_in, t.features[s], t.kernel_sizes[s], t.strides[s], t.n_conv[s],
                                   s >= first_token_stage))
            c_in = t.features[s]
        return AllUKANEncoder(stages)

    def forward(self, x):
        return self.decoder(self.encoder(x))

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)


def token_ka_block(t: PlansTopology, block: dict, channels: int) -> TokenKABlock:
    """The tokenised KA block of a stage, with the network's norm, bias and spline keywords (``block``)."""
    return TokenKABlock(channels, t.dim, KA_CONV_FOR[t.conv_op], block["norm_op"], block["norm_op_kwargs"],
                        block["conv_bias"], block["spline_kwargs"])


def ka_stage(t: PlansTopology, block: dict, c_in: int, c_out: int, kernel, first_stride, n_blocks: int,
             with_tokens: bool) -> nn.Sequential:
    """``n_blocks`` x [KAonv -> norm] (the first with ``first_stride``), then a tokenised KA block if asked.

    ``block`` holds the KAConvBlock keywords: norm and dropout ops, ``conv_bias``, ``spline_kwargs``.
    """
    ka_conv = KA_CONV_FOR[t.conv_op]
    blocks = [KAConvBlock(ka_conv, c_in if b == 0 else c_out, c_out, kernel, first_stride if b == 0 else 1, **block)
              for b in range(n_blocks)]
    if with_tokens:
        blocks.append(token_ka_block(t, block, c_out))
    return nn.Sequential(*blocks)


def _locate(op, network_name: str = "AllUKAN"):
    if isinstance(op, str):
        import pydoc
        located = pydoc.locate(op)
        if located is None:
            raise ValueError(f"{network_name}: cannot import {op!r} named in the plans")
        return located
    return op


def _per_stage(value, n: int, name: str, network_name: str) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{network_name}: {name} has {len(value)} entries, but {n} are needed")
    return value


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["AllUKAN", "TokenKABlock", "KAConvBlock", "count_parameters", "validate_ka_kwargs", "SKIP_MODES",
           "PlansTopology", "parse_plans", "validate_topology_kwargs", "ka_stage", "token_ka_block"]
