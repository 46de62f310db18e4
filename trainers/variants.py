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


class nnUNetTrainerAllUKAN_shareGroup(nnUNetTrainerAllUKAN):
    """One spline per group of consecutive input channels (8 groups; gcd(channels, 8) for narrow layers)."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "share": "group"}


class nnUNetTrainerAllUKAN_noTokens(nnUNetTrainerAllUKAN):
    """No tokenised KA blocks: every stage is KAonv -> norm, the CNN's topology with KA layers (token_stages=0)."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "token_stages": 0}


class nnUNetTrainerAllUKAN_skipAdd(nnUNetTrainerAllUKAN):
    """U-KAN's additive skip fusion instead of nnU-Net's concatenation."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "skip_mode": "add"}


def with_budget(base: type, name: str, doc: str, module: str = __name__, **budget) -> type:
    """A subclass of ``base`` that sets training-budget attributes (num_epochs, ...) after nnU-Net's __init__."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net records __init__'s named arguments from locals(): keep the explicit signature.
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in budget.items():
            setattr(self, key, value)

    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": module, "__qualname__": name})


def _with_epochs(n_epochs: int) -> type:
    return with_budget(nnUNetTrainerAllUKAN, f"nnUNetTrainerAllUKAN_{n_epochs}epochs",
                       f"nnUNetTrainerAllUKAN for {n_epochs} epochs (the poly schedule follows the shorter run).",
                       num_epochs=n_epochs)


SMOKE_TEST_BUDGET = dict(num_epochs=1, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1)

nnUNetTrainerAllUKAN_5epochs = _with_epochs(5)
nnUNetTrainerAllUKAN_10epochs = _with_epochs(10)
nnUNetTrainerAllUKAN_50epochs = _with_epochs(50)
nnUNetTrainerAllUKAN_100epochs = _with_epochs(100)
nnUNetTrainerAllUKAN_smokeTest = with_budget(
    nnUNetTrainerAllUKAN, "nnUNetTrainerAllUKAN_smokeTest",
    "For tests and smoke runs only: 1 epoch of 2 training and 1 validation iterations.", **SMOKE_TEST_BUDGET)


# Accuracy-issue variants: controls that freeze phi, and recipes for learning it (docs/accuracy.md).

class nnUNetTrainerAllUKAN_fixedSiLU(nnUNetTrainerAllUKAN):
    """Control: the same topology with phi fixed to silu (no spline parameters)."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "activation": "fixed-silu"}


class nnUNetTrainerAllUKAN_fixedLeakyReLU(nnUNetTrainerAllUKAN):
    """Control: the same topology with phi fixed to nnU-Net's LeakyReLU(0.01) (no spline parameters)."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "activation": "fixed-leakyrelu"}


class nnUNetTrainerAllUKAN_leakyInit(nnUNetTrainerAllUKAN):
    """phi starts as nnU-Net's LeakyReLU(0.01) exactly (leaky base function, zero spline coefficients)."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "spline_init": "leakyrelu"}


class nnUNetTrainerAllUKAN_splineSGD(nnUNetTrainerAllUKAN):
    """The recipe of nnUNetTrainerAllUKAN before 0.2.0: the spline parameters in nnU-Net's single SGD group (same
    lr, momentum and weight decay as the convolutions). Continues checkpoints written by that version."""
    spline_optimizer = "shared"


class nnUNetTrainerAllUKAN_splineAdam(nnUNetTrainerAllUKAN):
    """Spline parameters trained by their own Adam (lr 1e-3, no weight decay), the rest by nnU-Net's SGD: the
    default since 0.2.0, kept under this name so that the runs and commands recorded with it still run."""
    spline_optimizer, spline_lr = "adam", 1e-3


class nnUNetTrainerAllUKAN_splineAdamNoClip(nnUNetTrainerAllUKAN_splineAdam):
    """As _splineAdam, and the spline parameters are left out of nnU-Net's gradient-norm clip at 12."""
    spline_clip = False


class nnUNetTrainerAllUKAN_noTokensSplineAdam(nnUNetTrainerAllUKAN_splineAdam):
    """The two tissue-task gains together: no tokenised blocks (as _noTokens) and the splines' own Adam."""
    ka_kwargs = nnUNetTrainerAllUKAN_noTokens.ka_kwargs


class nnUNetTrainerAllUKAN_splineSGD10x(nnUNetTrainerAllUKAN):
    """Spline parameters in their own SGD group at 10x nnU-Net's lr, no weight decay."""
    spline_optimizer, spline_lr = "sgd", 1e-1


class nnUNetTrainerAllUKAN_splineWarmup(nnUNetTrainerAllUKAN):
    """Spline parameters frozen for the first 10 % of the epochs, then nnU-Net's SGD and schedule (own group)."""
    spline_optimizer, spline_lr, spline_warmup_fraction = "sgd", 1e-2, 0.1


# Round-3 recipe screens (issue 23): one knob of the default recipe each (the splines' own Adam stays).

class nnUNetTrainerAllUKAN_grid3(nnUNetTrainerAllUKAN):
    """3 spline intervals over the grid range instead of 5: a smoother, cheaper phi."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "grid_size": 3}


class nnUNetTrainerAllUKAN_grid8(nnUNetTrainerAllUKAN):
    """8 spline intervals over the grid range instead of 5: a more flexible phi."""
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "grid_size": 8}


class nnUNetTrainerAllUKAN_splineLr3em4(nnUNetTrainerAllUKAN):
    """The splines' Adam at lr 3e-4 instead of 1e-3."""
    spline_lr = 3e-4


class nnUNetTrainerAllUKAN_splineLr3em3(nnUNetTrainerAllUKAN):
    """The splines' Adam at lr 3e-3 instead of 1e-3."""
    spline_lr = 3e-3
