"""ALL U-KAN with nnU-Net's residual encoder: the network of the ResEnc presets (``nnUNetResEncUNet{M,L,XL}Plans``).

``AllUKANResEnc`` mirrors dynamic-network-architectures' ``ResidualEncoderUNet`` block by block (its
``ResidualEncoder`` with ``BasicBlockD`` blocks, strided convolutions, a plain U-Net decoder), with KA layers in
place of conv + nonlinearity. The decoder, the tokenised KA blocks at the deepest ``token_stages`` resolutions, the
heads and deep supervision are AllUKAN's own (this class is an ``AllUKAN`` that builds another encoder).

How each d-n-a piece maps (d-n-a: ``ConvDropoutNormReLU`` = conv -> dropout -> norm -> LeakyReLU; here
``KAConvBlock`` = KAonv -> norm -> dropout, KAonv(z) = conv(phi(z)); the plans never set dropout):

==========================  =========================================  =============================================
piece                       d-n-a ``ResidualEncoderUNet``               here
==========================  =========================================  =============================================
stem (``encoder.stem``)     conv k0 -> norm -> LeakyReLU, stride 1      KAonv k0 -> norm, stride 1
block conv1                 conv k, stride on a stage's first block     KAonv k, same stride -> norm
                            -> norm -> LeakyReLU
block conv2                 conv k -> norm                              KAonv k -> norm (phi in it replaces the
                                                                        LeakyReLU after conv1's norm)
block output                LeakyReLU(conv2 + skip)                     conv2 + skip
identity skip               x (= LeakyReLU(previous block's sum))       x (= the previous block's sum)
projection skip             [AvgPool(stride)] -> 1x1 conv, no bias      [AvgPool(stride)] -> 1x1 KAonv, no bias
(shape changes)             -> norm                                     -> norm
initialisation              He; each block's last norm zeroed           the same (every block starts as its skip)
==========================  =========================================  =============================================

The nonlinearity after the add. There is no standalone nonlinearity in a KA network: phi lives inside the next KA
layer, so LeakyReLU(sum) becomes phi inside whatever reads the sum: the next block's conv1 and projection, the
next stage, the decoder's KAonvTranspose/KAonv (through the skip connection). The one place where this differs
is the identity path: it carries the sum itself, not phi(sum), so the residual stream from block to block is
linear (the "pre-activation" form of He et al. 2016, Identity Mappings in Deep Residual Networks); applying phi
to it would need an activation outside a KA layer and keep one more tensor for backward per block. On the
projection path phi is applied after the average pooling (inside the 1x1 KAonv); d-n-a applies LeakyReLU before
it.

Only ``BasicBlockD`` (what nnU-Net's ResEnc planners use) is supported; ``BottleneckD`` plans are refused.
"""
from __future__ import annotations

import pydoc

from torch import nn

from dynamic_network_architectures.building_blocks.helper import get_matching_pool_op
from dynamic_network_architectures.building_blocks.residual import BasicBlockD

from nnunetv2_allukan.layers import KA_CONV_FOR

from .allukan import AllUKAN, AllUKANEncoder, KAConvBlock, PlansTopology, _per_stage, token_ka_block


class KAResidualBlock(nn.Module):
    """d-n-a's ``BasicBlockD`` with KA layers: ``conv2(conv1(x)) + skip(x)``, no nonlinearity after the add.

    ``block`` holds the KAConvBlock keywords (norm and dropout ops, ``conv_bias``, ``spline_kwargs``).
    """

    def __init__(self, ka_conv: type, c_in: int, c_out: int, kernel, stride, block: dict):
        super().__init__()
        self.conv1 = KAConvBlock(ka_conv, c_in, c_out, kernel, stride, **block)
        # As in BasicBlockD only the first convolution of a block has dropout.
        self.conv2 = KAConvBlock(ka_conv, c_out, c_out, kernel, 1, **{**block, "dropout_op": None})
        self.skip = residual_skip(ka_conv, c_in, c_out, stride, block)

    def forward(self, x):
        return self.conv2(self.conv1(x)) + self.skip(x)

    def zero_init_last_norm(self):
        """d-n-a's ``init_last_bn_before_add_to_0``: the block starts as its skip path."""
        norm = self.conv2[1]
        nn.init.zeros_(norm.weight)
        nn.init.zeros_(norm.bias)


def residual_skip(ka_conv: type, c_in: int, c_out: int, stride, block: dict) -> nn.Module:
    """BasicBlockD's skip: the identity, or where the shape changes [AvgPool(stride)] -> [1x1 KAonv -> norm].

    As in d-n-a (ResNet-D) the stride is an average pooling before the 1x1 projection, which has no bias.
    """
    ops = []
    if any(s != 1 for s in stride):
        ops.append(get_matching_pool_op(dimension=len(stride), pool_type="avg")(stride, stride))
    if c_in != c_out:
        ops.append(KAConvBlock(ka_conv, c_in, c_out, [1] * len(stride), 1, block["norm_op"], block["norm_op_kwargs"],
                               None, None, False, block["spline_kwargs"]))
    return nn.Sequential(*ops) if ops else nn.Identity()


class ResidualKAEncoder(AllUKANEncoder):
    """d-n-a's ``ResidualEncoder`` layout: ``stem``, then ``stages``; returns every stage's output (the skips)."""

    def __init__(self, stem: nn.Module, stages):
        super().__init__(stages)
        self.stem = stem

    def forward(self, x):
        return super().forward(self.stem(x))


class AllUKANResEnc(AllUKAN):
    """ALL U-KAN whose encoder is nnU-Net's residual encoder (ResEnc plans), fully KA. See the module docstring.

    Args (plans): the keywords of d-n-a's ``ResidualEncoderUNet`` (``n_blocks_per_stage`` residual blocks per
    encoder stage; ``block`` must be BasicBlockD or absent; ``stem_channels``, default ``features_per_stage[0]``).
    ``nonlin``/``nonlin_kwargs`` are accepted and ignored: phi inside the KA layers is the nonlinearity.
    Args (KA): every keyword of ``AllUKAN`` (``spline_grad``, ``share``, ``grid_size``, ``grid_range``,
    ``token_stages``, ``skip_mode``, ``impl``, ``activation``, ...), handed to it unchanged.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_blocks_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs: dict | None = None, dropout_op=None,
                 dropout_op_kwargs: dict | None = None, nonlin=None, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = False, block=None, bottleneck_channels=None, stem_channels: int | None = None,
                 **ka_kwargs):
        _require_basic_block(block, bottleneck_channels)
        n_blocks = _per_stage(n_blocks_per_stage, n_stages, "n_blocks_per_stage", "AllUKANResEnc")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in n_blocks):
            raise ValueError(f"AllUKANResEnc: n_blocks_per_stage must be integers >= 1, got {n_blocks_per_stage!r}")
        # Read by build_encoder, which AllUKAN.__init__ calls (a plain attribute may be set before Module.__init__).
        self.stem_channels = stem_channels
        # AllUKAN's n_conv_per_stage is the number of encoder blocks per stage: here, residual blocks.
        super().__init__(input_channels=input_channels, n_stages=n_stages, features_per_stage=features_per_stage,
                         conv_op=conv_op, kernel_sizes=kernel_sizes, strides=strides, n_conv_per_stage=n_blocks,
                         num_classes=num_classes, n_conv_per_stage_decoder=n_conv_per_stage_decoder,
                         conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                         dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                         deep_supervision=deep_supervision, **ka_kwargs)

    def build_encoder(self, t: PlansTopology, block: dict, input_channels: int,
                      first_token_stage: int) -> ResidualKAEncoder:
        """Stem, then per stage ``n_blocks_per_stage`` residual blocks (the first strided) and, at the deepest
        stages, AllUKAN's tokenised KA block."""
        ka_conv = KA_CONV_FOR[t.conv_op]
        stem_channels = t.features[0] if self.stem_channels is None else self.stem_channels
        stem = KAConvBlock(ka_conv, input_channels, stem_channels, t.kernel_sizes[0], 1, **block)
        stages, c_in = [], stem_channels
        for s in range(t.n_stages):
            c_out = t.features[s]
            blocks = [KAResidualBlock(ka_conv, c_in if b == 0 else c_out, c_out, t.kernel_sizes[s],
                                      t.strides[s] if b == 0 else [1] * t.dim, block) for b in range(t.n_conv[s])]
            if s >= first_token_stage:
                blocks.append(token_ka_block(t, block, c_out))
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        return ResidualKAEncoder(stem, stages)

    @staticmethod
    def initialize(module):
        AllUKAN.initialize(module)
        if isinstance(module, KAResidualBlock):
            module.zero_init_last_norm()


def _require_basic_block(block, bottleneck_channels):
    located = pydoc.locate(block) if isinstance(block, str) else block
    if located not in (None, BasicBlockD) or bottleneck_channels is not None:
        raise ValueError(f"AllUKANResEnc: only BasicBlockD residual blocks are supported (nnU-Net's ResEnc plans), "
                         f"got block={block!r}, bottleneck_channels={bottleneck_channels!r}")


__all__ = ["AllUKANResEnc", "KAResidualBlock", "ResidualKAEncoder", "residual_skip"]
