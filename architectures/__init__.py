"""Networks built from nnU-Net plans configurations. Importable as ``nnunetv2_allukan.architectures``."""
from .allukan import AllUKAN, KAConvBlock, TokenKABlock, count_parameters

__all__ = ["AllUKAN", "KAConvBlock", "TokenKABlock", "count_parameters"]
