"""nnunetv2-allukan: ALL U-KAN (fully Kolmogorov-Arnold U-Net) for nnU-Net v2.

The core layers below know nothing of nnU-Net; networks live in ``nnunetv2_allukan.architectures`` and
nnU-Net trainers in ``nnunetv2_allukan.trainers``.
"""
from .activation import SharedSplineActivation
from .layers import KALinear, KAModule, KAonv1d, KAonv2d, KAonv3d, KAonvTranspose2d, KAonvTranspose3d

__version__ = "0.2.0"

__all__ = ["SharedSplineActivation", "KALinear", "KAModule", "KAonv1d", "KAonv2d", "KAonv3d",
           "KAonvTranspose2d", "KAonvTranspose3d", "__version__"]
