"""Networks built from nnU-Net plans configurations. Importable as ``nnunetv2_allukan.architectures``."""
from .allukan import AllUKAN, KAConvBlock, TokenKABlock, count_parameters
from .comparators import KANConvTransposeByStride, StackedKAN, TokenBlock, UKAN
from .resenc import AllUKANResEnc

__all__ = ["AllUKAN", "AllUKANResEnc", "KAConvBlock", "TokenKABlock", "count_parameters", "UKAN", "StackedKAN",
           "KANConvTransposeByStride", "TokenBlock"]
