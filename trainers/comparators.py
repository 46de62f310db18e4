"""Thin trainers for the comparator networks (DESIGN.md §3): everything but the network is nnU-Net's.

nnU-Net's own ``nnUNetTrainer`` (PlainConvUNet) is the CNN comparator and needs nothing here.
"""
from __future__ import annotations

import torch

from .nnUNetTrainerAllUKAN import nnUNetTrainerAllUKAN
from .variants import SMOKE_TEST_BUDGET, with_budget

UKAN_CLASS_NAME = "nnunetv2_allukan.architectures.comparators.UKAN"
STACKED_KAN_CLASS_NAME = "nnunetv2_allukan.architectures.comparators.StackedKAN"

# The topology and grid choices the comparators share with nnUNetTrainerAllUKAN; the AllUKAN-only ones
# (spline_grad, share) do not apply to per-edge KAN layers.
COMPARATOR_KWARGS = {key: nnUNetTrainerAllUKAN.ka_kwargs[key]
                     for key in ("grid_size", "grid_range", "token_stages", "skip_mode")}


class _ComparatorTrainer(nnUNetTrainerAllUKAN):
    """nnUNetTrainerAllUKAN's guards and statistics with another network class from the same plans, trained by
    nnU-Net's own single SGD group: the comparators are the published architectures under nnU-Net's recipe (and
    every comparator number in docs/accuracy.md was measured so); the splines' own Adam is ALL U-KAN's recipe."""

    network_class_name: str
    ka_kwargs = COMPARATOR_KWARGS
    spline_optimizer = "shared"


class nnUNetTrainerUKAN(_ComparatorTrainer):
    """Partial KA (U-KAN on nnU-Net plans): CNN stages, per-edge KANLinear in the two deepest tokenised stages."""
    network_class_name = UKAN_CLASS_NAME


class nnUNetTrainerStackedKAN(_ComparatorTrainer):
    """The "directly deeply stacked KAN": AllUKAN's topology with per-edge KAN layers everywhere (slow, large)."""
    network_class_name = STACKED_KAN_CLASS_NAME


def _smoke_test(trainer: type) -> type:
    return with_budget(trainer, f"{trainer.__name__}_smokeTest",
                       f"{trainer.__name__} for tests and smoke runs only: 1 epoch of 2 iterations.", __name__,
                       **SMOKE_TEST_BUDGET)


nnUNetTrainerUKAN_smokeTest = _smoke_test(nnUNetTrainerUKAN)
nnUNetTrainerStackedKAN_smokeTest = _smoke_test(nnUNetTrainerStackedKAN)

__all__ = ["nnUNetTrainerUKAN", "nnUNetTrainerStackedKAN", "nnUNetTrainerUKAN_smokeTest",
           "nnUNetTrainerStackedKAN_smokeTest", "UKAN_CLASS_NAME", "STACKED_KAN_CLASS_NAME"]
