"""nnUNetTrainerAllUKAN: nnU-Net's trainer with ALL U-KAN in place of PlainConvUNet.

Everything else (planning, data, augmentation, loss, deep supervision, inference) is nnU-Net's own. The
network is built from the plans' architecture block, so 2D/3D, stages, features, kernels and strides are
whatever nnU-Net planned for the dataset.
"""
from __future__ import annotations

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_allukan.architectures.from_plans import (ALLUKAN_CLASS_NAME, DEFAULT_KA_KWARGS, NetworkChoice,
                                                     allukan_arch_kwargs, network_for_plans)

from .guards import CheckpointMismatchMessage, CompileOnlyWhenAsked, NonFiniteLossGuard
from .recipes import EpochCosineLRScheduler, SplineParameterGroup, split_spline_parameters
from .statistics import KAStatistics


def _comparable(value):
    """Plans store JSON (lists), trainers write tuples: compare grid ranges and the like as tuples."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def resolve_ka_kwargs(plans_arch_kwargs: dict, trainer_ka_kwargs: dict,
                      default_ka_kwargs: dict) -> tuple[dict, list[str]]:
    """The KA settings a trainer builds with, and one log note per setting that is not the default.

    Precedence: a trainer variant's explicit choice (a key whose value differs from ``default_ka_kwargs``, the
    base trainer's, e.g. ``_shareChannel``'s share) > the plans configuration's value (e.g. written by
    ``nnunetv2-allukan add-plans --share channel``) > the trainer's default. The result goes to
    ``network_for_plans`` as its ``ka_kwargs``, so the plain and the residual-encoder networks get the same.
    """
    resolved, notes = {}, []
    for key, value in trainer_ka_kwargs.items():
        explicit = key not in default_ka_kwargs or _comparable(value) != _comparable(default_ka_kwargs[key])
        in_plans = key in plans_arch_kwargs
        if explicit:
            resolved[key] = value
            overridden = in_plans and _comparable(plans_arch_kwargs[key]) != _comparable(value)
            notes.append(f"{key}={value!r} (the trainer's choice" +
                         (f", over the plans' {plans_arch_kwargs[key]!r})" if overridden else ")"))
        elif in_plans:
            resolved[key] = plans_arch_kwargs[key]
            if _comparable(plans_arch_kwargs[key]) != _comparable(value):
                notes.append(f"{key}={plans_arch_kwargs[key]!r} (from the plans; the trainer's default: {value!r})")
        else:
            resolved[key] = value
    return resolved, notes


class nnUNetTrainerAllUKAN(SplineParameterGroup, KAStatistics, NonFiniteLossGuard, CheckpointMismatchMessage,
                           CompileOnlyWhenAsked, nnUNetTrainer):
    """ALL U-KAN with the Grad-Free Spline, one spline per layer; nnU-Net's SGD + poly schedule for the
    convolutions, norms and everything else, and the spline parameters (coefficients, base weights) by their own
    Adam (lr 1e-3, no weight decay, same poly schedule and gradient clip).

    The splines' own Adam is the default since version 0.2.0: over 3 slab folds of 2000 iterations it beat the
    earlier recipe (spline parameters in nnU-Net's single SGD group, now ``nnUNetTrainerAllUKAN_splineSGD``) on
    both accuracy tasks, which stalled on the 10-class one (docs/accuracy.md).

    Unlike stock nnU-Net it stops on repeated non-finite losses, explains checkpoint/plans mismatches, compiles
    on CUDA only when nnUNet_compile=1 is set (logged) and writes per-epoch KA-layer and gradient-norm statistics
    (``ka_statistics.jsonl`` in the fold folder, a summary line in the log).
    """

    # The network built from the plans, and the KA choices handed to it; variants override single entries.
    network_class_name = ALLUKAN_CLASS_NAME
    ka_kwargs: dict = dict(DEFAULT_KA_KWARGS)

    @classmethod
    def network_choice(cls, configuration_manager: ConfigurationManager) -> NetworkChoice:
        """``network_class_name``, or its residual counterpart for residual-encoder (ResEnc) plans, with the KA
        settings of ``resolve_ka_kwargs`` (variant's explicit choice > plans configuration > trainer default)."""
        plans_kwargs = configuration_manager.network_arch_init_kwargs
        ka_kwargs, notes = resolve_ka_kwargs(plans_kwargs, cls.ka_kwargs, nnUNetTrainerAllUKAN.ka_kwargs)
        choice = network_for_plans(cls.network_class_name, configuration_manager.network_arch_class_name,
                                   plans_kwargs, ka_kwargs)
        return choice._replace(reason=choice.reason + (f"; KA settings: {', '.join(notes)}" if notes else ""))

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        choice = cls.network_choice(configuration_manager)
        return get_network_from_plans(
            choice.class_name,
            choice.arch_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels,
            num_output_channels,
            allow_init=True,
            deep_supervision=enable_deep_supervision)

    def initialize(self):
        if not self.was_initialized:
            self.print_to_log_file(f"network: {self.network_choice(self.configuration_manager).reason}")
        super().initialize()


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


__all__ = ["nnUNetTrainerAllUKAN", "nnUNetTrainerAllUKAN_AdamCosine", "resolve_ka_kwargs"]
