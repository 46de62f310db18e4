"""Test-only trainers, discovered by nnU-Net through nnUNet_extTrainer (this folder has no __init__.py)."""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_allukan.trainers import nnUNetTrainerAllUKAN
from nnunetv2_allukan.trainers.variants import SMOKE_TEST_BUDGET, with_budget


class nnUNetTrainerAllUKAN_resumeTest(nnUNetTrainerAllUKAN):
    """3 epochs of 2 iterations, a checkpoint every epoch, and a simulated crash on request."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1

    def on_train_epoch_start(self):
        if str(self.current_epoch) == os.environ.get("ALLUKAN_TEST_CRASH_AT_EPOCH"):
            raise RuntimeError(f"simulated crash at the start of epoch {self.current_epoch}")
        super().on_train_epoch_start()


# nnU-Net's own CNN with the smoke-test budget: the ensemble partner of nnUNetTrainerAllUKAN_smokeTest in tests.
nnUNetTrainerCNN_smokeTest = with_budget(nnUNetTrainer, "nnUNetTrainerCNN_smokeTest",
                                         "nnU-Net's CNN for tests only: 1 epoch of 2 iterations.", __name__,
                                         **SMOKE_TEST_BUDGET)
