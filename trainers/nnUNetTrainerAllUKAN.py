"""nnUNetTrainerAllUKAN: nnU-Net's trainer with ALL U-KAN in place of PlainConvUNet.

Everything else (planning, data, augmentation, loss, deep supervision, inference) is nnU-Net's own. The
network is built from the plans' architecture block, so 2D/3D, stages, features, kernels and strides are
whatever nnU-Net planned for the dataset.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import _LRScheduler

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from .guards import CheckpointMismatchMessage, CompileOnlyWhenAsked, NonFiniteLossGuard

ALLUKAN_CLASS_NAME = "nnunetv2_allukan.architectures.AllUKAN"


def allukan_arch_kwargs(plans_arch_kwargs: dict, ka_kwargs: dict) -> dict:
    """The plans' architecture keywords, adapted to AllUKAN, plus the KA choices.

    Residual-encoder plans name ``n_blocks_per_stage``; AllUKAN's encoder blocks are single KAonv blocks, so
    that count becomes ``n_conv_per_stage``.
    """
    kwargs = dict(plans_arch_kwargs)
    if "n_conv_per_stage" not in kwargs and "n_blocks_per_stage" in kwargs:
        kwargs["n_conv_per_stage"] = kwargs.pop("n_blocks_per_stage")
    kwargs.pop("n_blocks_per_stage", None)
    kwargs.pop("block", None)
    kwargs.pop("bottleneck_channels", None)
    kwargs.pop("stem_channels", None)
    kwargs.update(ka_kwargs)
    return kwargs


class EpochCosineLRScheduler(_LRScheduler):
    """Cosine annealing computed from the epoch number, keeping each parameter group's own base lr.

    nnU-Net steps the scheduler with an explicit epoch and does not checkpoint it, so the lr must be a
    function of the epoch alone (also after ``--c``).
    """

    def __init__(self, optimizer, max_epochs: int, min_lr_fraction: float = 0.01):
        self.max_epochs = max_epochs
        self.min_lr_fraction = min_lr_fraction
        self.base_lrs_by_group = [g["lr"] for g in optimizer.param_groups]
        super().__init__(optimizer, -1)

    def lr_factor(self, epoch: int) -> float:
        progress = min(max(epoch, 0), self.max_epochs) / self.max_epochs
        return self.min_lr_fraction + (1 - self.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = getattr(self, "_ctr", 0)
            self._ctr = current_step + 1
        factor = self.lr_factor(current_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs_by_group):
            group["lr"] = base * factor
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


def split_spline_parameters(network: torch.nn.Module):
    """(spline activation parameters, all other parameters)."""
    spline, other = [], []
    for name, p in network.named_parameters():
        (spline if ".activation." in f".{name}" else other).append(p)
    return spline, other


class nnUNetTrainerAllUKAN(NonFiniteLossGuard, CheckpointMismatchMessage, CompileOnlyWhenAsked, nnUNetTrainer):
    """ALL U-KAN with the Grad-Free Spline, one spline per layer, nnU-Net's SGD + poly schedule.

    Unlike stock nnU-Net it stops on repeated non-finite losses, explains checkpoint/plans mismatches and compiles
    on CUDA only when nnUNet_compile=1 is set (logged).
    """

    # The network built from the plans, and the KA choices handed to it; variants override single entries.
    network_class_name = ALLUKAN_CLASS_NAME
    ka_kwargs: dict = {"spline_grad": "free", "share": "layer", "grid_size": 5, "grid_range": (-3.0, 3.0),
                       "token_stages": 2, "skip_mode": "concat"}

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


class nnUNetTrainerAllUKAN_AdamCosine(nnUNetTrainerAllUKAN):
    """The U-KAN recipe: Adam 1e-4 (spline parameters 1e-2), weight decay 1e-4, cosine schedule."""

    spline_lr = 1e-2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net records __init__'s named arguments from locals(): keep the explicit signature.
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 1e-4

    def configure_optimizers(self):
        spline, other = split_spline_parameters(self.network)
        optimizer = torch.optim.Adam([{"params": other, "lr": self.initial_lr},
                                      {"params": spline, "lr": self.spline_lr}],
                                     weight_decay=self.weight_decay)
        return optimizer, EpochCosineLRScheduler(optimizer, self.num_epochs)


__all__ = ["nnUNetTrainerAllUKAN", "nnUNetTrainerAllUKAN_AdamCosine", "EpochCosineLRScheduler",
           "allukan_arch_kwargs", "split_spline_parameters", "ALLUKAN_CLASS_NAME"]
