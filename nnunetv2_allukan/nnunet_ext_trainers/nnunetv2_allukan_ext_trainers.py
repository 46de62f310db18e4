"""Entry point for nnU-Net's trainer discovery (``nnUNet_extTrainer``).

nnU-Net imports every module in this folder under its top-level name, so the folder has no
``__init__.py`` and holds only this uniquely named module, which re-exports the installed trainers.
Set it up with:  export nnUNet_extTrainer="$(nnunetv2-allukan ext-path)"
"""
from nnunetv2_allukan.trainers import *  # noqa: F401,F403
