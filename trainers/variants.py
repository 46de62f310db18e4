"""Thin variants of nnUNetTrainerAllUKAN, one idea each, named in nnU-Net's style."""
from __future__ import annotations

import torch

from .nnUNetTrainerAllUKAN import nnUNetTrainerAllUKAN


class nnUNetTrainerAllUKAN_exactGrad(nnUNetTrainerAllUKAN):
    """Exact spline input gradients instead of the Grad-Free Spline (same memory: the basis is recomputed)."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "spline_grad": "exact"}


class nnUNetTrainerAllUKAN_shareChannel(nnUNetTrainerAllUKAN):
    """One spline per input channel instead of one per layer."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "share": "channel"}


class nnUNetTrainerAllUKAN_skipAdd(nnUNetTrainerAllUKAN):
    """U-KAN's additive skip fusion instead of nnU-Net's concatenation."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "skip_mode": "add"}


def _with_epochs(n_epochs: int) -> type:
    class _Trainer(nnUNetTrainerAllUKAN):
        __doc__ = f"nnUNetTrainerAllUKAN for {n_epochs} epochs (the poly schedule follows the shorter run)."

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            # nnU-Net records __init__'s named arguments from locals(): keep the explicit signature.
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = n_epochs

    _Trainer.__name__ = _Trainer.__qualname__ = f"nnUNetTrainerAllUKAN_{n_epochs}epochs"
    _Trainer.__module__ = __name__
    return _Trainer


nnUNetTrainerAllUKAN_5epochs = _with_epochs(5)
nnUNetTrainerAllUKAN_10epochs = _with_epochs(10)
nnUNetTrainerAllUKAN_50epochs = _with_epochs(50)
nnUNetTrainerAllUKAN_100epochs = _with_epochs(100)


class nnUNetTrainerAllUKAN_smokeTest(nnUNetTrainerAllUKAN):
    """For tests and smoke runs only: 1 epoch of 2 training and 1 validation iterations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net records __init__'s named arguments from locals(): keep the explicit signature.
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
