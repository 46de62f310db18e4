"""Thin trainers for the comparator networks (DESIGN.md §3): everything but the network is nnU-Net's.

nnU-Net's own ``nnUNetTrainer`` (PlainConvUNet) is the CNN comparator and needs nothing here.
"""
from __future__ import annotations

import torch

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from .nnUNetTrainerAllUKAN import allukan_arch_kwargs, nnUNetTrainerAllUKAN

UKAN_CLASS_NAME = "nnunetv2_allukan.architectures.comparators.UKAN"
STACKED_KAN_CLASS_NAME = "nnunetv2_allukan.architectures.comparators.StackedKAN"

# The topology and grid choices the comparators share with nnUNetTrainerAllUKAN; the AllUKAN-only ones
# (spline_grad, share) do not apply to per-edge KAN layers.
COMPARATOR_KWARGS = {key: nnUNetTrainerAllUKAN.ka_kwargs[key]
                     for key in ("grid_size", "grid_range", "token_stages", "skip_mode")}


class _ComparatorTrainer(nnUNetTrainerAllUKAN):
    """nnUNetTrainerAllUKAN's training recipe with another network class from the same plans."""

    network_class_name: str
    ka_kwargs = COMPARATOR_KWARGS

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        return get_network_from_plans(
            cls.network_class_name,
            allukan_arch_kwargs(configuration_manager.network_arch_init_kwargs, cls.ka_kwargs),
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels,
            num_output_channels,
            allow_init=True,
            deep_supervision=enable_deep_supervision)


class nnUNetTrainerUKAN(_ComparatorTrainer):
    """Partial KA (U-KAN on nnU-Net plans): CNN stages, per-edge KANLinear in the two deepest tokenised stages."""
    network_class_name = UKAN_CLASS_NAME


class nnUNetTrainerStackedKAN(_ComparatorTrainer):
    """The "directly deeply stacked KAN": AllUKAN's topology with per-edge KAN layers everywhere (slow, large)."""
    network_class_name = STACKED_KAN_CLASS_NAME


def _smoke_test(trainer: type) -> type:
    class _Trainer(trainer):
        __doc__ = f"{trainer.__name__} for tests and smoke runs only: 1 epoch of 2 training, 1 validation iterations."

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            # nnU-Net records __init__'s named arguments from locals(): keep the explicit signature.
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1

    _Trainer.__name__ = _Trainer.__qualname__ = f"{trainer.__name__}_smokeTest"
    _Trainer.__module__ = __name__
    return _Trainer


nnUNetTrainerUKAN_smokeTest = _smoke_test(nnUNetTrainerUKAN)
nnUNetTrainerStackedKAN_smokeTest = _smoke_test(nnUNetTrainerStackedKAN)

__all__ = ["nnUNetTrainerUKAN", "nnUNetTrainerStackedKAN", "nnUNetTrainerUKAN_smokeTest",
           "nnUNetTrainerStackedKAN_smokeTest", "UKAN_CLASS_NAME", "STACKED_KAN_CLASS_NAME"]
