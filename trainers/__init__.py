"""nnU-Net trainers for ALL U-KAN. Importable as ``nnunetv2_allukan.trainers``.

nnU-Net finds them through ``export nnUNet_extTrainer="$(nnunetv2-allukan ext-path)"``.
"""
from .comparators import (nnUNetTrainerStackedKAN, nnUNetTrainerStackedKAN_smokeTest, nnUNetTrainerUKAN,
                          nnUNetTrainerUKAN_smokeTest)
from .nnUNetTrainerAllUKAN import nnUNetTrainerAllUKAN, nnUNetTrainerAllUKAN_AdamCosine
from .variants import (nnUNetTrainerAllUKAN_5epochs, nnUNetTrainerAllUKAN_10epochs, nnUNetTrainerAllUKAN_50epochs,
                       nnUNetTrainerAllUKAN_100epochs, nnUNetTrainerAllUKAN_exactGrad,
                       nnUNetTrainerAllUKAN_shareChannel, nnUNetTrainerAllUKAN_skipAdd,
                       nnUNetTrainerAllUKAN_smokeTest, nnUNetTrainerAllUKAN_fixedSiLU,
                       nnUNetTrainerAllUKAN_fixedLeakyReLU, nnUNetTrainerAllUKAN_leakyInit,
                       nnUNetTrainerAllUKAN_splineAdam, nnUNetTrainerAllUKAN_splineAdamNoClip,
                       nnUNetTrainerAllUKAN_splineSGD,
                       nnUNetTrainerAllUKAN_splineSGD10x, nnUNetTrainerAllUKAN_splineWarmup,
                       nnUNetTrainerAllUKAN_shareGroup, nnUNetTrainerAllUKAN_noTokens,
                       nnUNetTrainerAllUKAN_noTokensSplineAdam, nnUNetTrainerAllUKAN_grid3,
                       nnUNetTrainerAllUKAN_grid8, nnUNetTrainerAllUKAN_splineLr3em4,
                       nnUNetTrainerAllUKAN_splineLr3em3)

TRAINER_NAMES = ["nnUNetTrainerAllUKAN", "nnUNetTrainerAllUKAN_AdamCosine", "nnUNetTrainerAllUKAN_exactGrad",
                 "nnUNetTrainerAllUKAN_shareChannel", "nnUNetTrainerAllUKAN_skipAdd",
                 "nnUNetTrainerAllUKAN_5epochs", "nnUNetTrainerAllUKAN_10epochs", "nnUNetTrainerAllUKAN_50epochs",
                 "nnUNetTrainerAllUKAN_100epochs", "nnUNetTrainerAllUKAN_smokeTest",
                 "nnUNetTrainerUKAN", "nnUNetTrainerStackedKAN", "nnUNetTrainerUKAN_smokeTest",
                 "nnUNetTrainerStackedKAN_smokeTest",
                 # accuracy controls and recipes (docs/accuracy.md)
                 "nnUNetTrainerAllUKAN_fixedSiLU", "nnUNetTrainerAllUKAN_fixedLeakyReLU",
                 "nnUNetTrainerAllUKAN_leakyInit", "nnUNetTrainerAllUKAN_splineSGD", "nnUNetTrainerAllUKAN_splineAdam",
                 "nnUNetTrainerAllUKAN_splineAdamNoClip", "nnUNetTrainerAllUKAN_splineSGD10x",
                 "nnUNetTrainerAllUKAN_splineWarmup", "nnUNetTrainerAllUKAN_shareGroup",
                 "nnUNetTrainerAllUKAN_noTokens", "nnUNetTrainerAllUKAN_noTokensSplineAdam",
                 # round-3 recipe screens
                 "nnUNetTrainerAllUKAN_grid3", "nnUNetTrainerAllUKAN_grid8", "nnUNetTrainerAllUKAN_splineLr3em4",
                 "nnUNetTrainerAllUKAN_splineLr3em3"]

__all__ = TRAINER_NAMES + ["TRAINER_NAMES"]
