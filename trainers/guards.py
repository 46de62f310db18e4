"""Trainer mixins that make long runs fail loudly instead of silently (stock nnU-Net keeps training on NaN)."""
from __future__ import annotations

import os

import numpy as np
import torch


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteLossGuard:
    """Stop training after ``max_consecutive_nonfinite`` non-finite training losses in a row.

    Raising from ``train_step`` leaves the loop before nnU-Net's end-of-epoch checkpointing, so the last
    checkpoint on disk is the last good one; nothing is written over it. Under DDP (``-num_gpus N``) the ranks
    agree on every iteration (one tiny all-reduce): a non-finite loss on any rank has already spoilt everyone's
    averaged gradients, and a rank that stopped alone would leave the others waiting in the next all-reduce.
    """

    max_consecutive_nonfinite = 5

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._iteration_in_epoch = 0
        self._nonfinite_in_a_row = getattr(self, "_nonfinite_in_a_row", 0)

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self._iteration_in_epoch = getattr(self, "_iteration_in_epoch", 0) + 1
        if self._finite_on_every_rank(bool(np.all(np.isfinite(result["loss"])))):
            self._nonfinite_in_a_row = 0
            return result
        self._nonfinite_in_a_row = getattr(self, "_nonfinite_in_a_row", 0) + 1
        self.print_to_log_file(f"WARNING: non-finite training loss {result['loss']} at epoch {self.current_epoch}, "
                               f"iteration {self._iteration_in_epoch - 1} ({self._nonfinite_in_a_row} in a row)")
        if self._nonfinite_in_a_row >= self.max_consecutive_nonfinite:
            message = (f"Training stopped: the loss was NaN/Inf for {self._nonfinite_in_a_row} iterations in a row "
                       f"(epoch {self.current_epoch}, iteration {self._iteration_in_epoch - 1}). Nothing was saved "
                       f"after the last good checkpoint in {self.output_folder}; check the input data and "
                       f"intensities, or lower the learning rate, then continue with --c.")
            self.print_to_log_file(message)
            raise NonFiniteLossError(message)
        return result

    def _finite_on_every_rank(self, finite: bool) -> bool:
        if not (getattr(self, "is_ddp", False) and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)  # NCCL needs a CUDA tensor
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() == 0.0


class CompileOnlyWhenAsked:
    """nnU-Net compiles by default on CUDA. Compiling ALL U-KAN is verified here only on the CPU (the whole network
    with inductor and aot_eager, against eager), never on a GPU, so it stays off unless ``nnUNet_compile=1``."""

    def _do_i_compile(self):
        if "nnUNet_compile" not in os.environ and self.device.type == "cuda":
            if not getattr(self, "_compile_reason_logged", False):
                self.print_to_log_file("INFO: torch.compile is off for ALL U-KAN unless you set nnUNet_compile=1: "
                                       "compiling its spline layers is not yet verified on CUDA in this version.")
                self._compile_reason_logged = True
            return False
        return super()._do_i_compile()


class CheckpointMismatchMessage:
    """Say *what* differs when a checkpoint does not fit the network built from the current plans."""

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        try:
            super().load_checkpoint(filename_or_checkpoint)
        except RuntimeError as e:
            if "state_dict" not in str(e):
                raise
            checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
                torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
            raise RuntimeError(describe_state_dict_mismatch(checkpoint, self.network, self.label_manager)) from e


def describe_state_dict_mismatch(checkpoint: dict, network: torch.nn.Module, label_manager) -> str:
    def strip(k):
        return k.removeprefix("module.").removeprefix("_orig_mod.")

    saved = {strip(k): tuple(v.shape) for k, v in checkpoint["network_weights"].items()}
    current = {strip(k): tuple(v.shape) for k, v in network.state_dict().items()}
    reasons = []
    head_keys = [k for k in current if "seg_layers" in k and k.endswith(".weight") and ".activation." not in k]
    if head_keys and head_keys[-1] in saved and saved[head_keys[-1]][0] != current[head_keys[-1]][0]:
        reasons.append(f"the checkpoint predicts {saved[head_keys[-1]][0]} output channels but the dataset's labels "
                       f"need {label_manager.num_segmentation_heads} (different label count or region setup)")
    missing = sorted(set(current) - set(saved))
    extra = sorted(set(saved) - set(current))
    if missing or extra:
        reasons.append(f"the network architecture differs (plans/trainer): {len(missing)} layers missing from the "
                       f"checkpoint (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    shape_diff = [k for k in current if k in saved and saved[k] != current[k]]
    if shape_diff and not reasons:
        reasons.append(f"layer shapes differ (different plans: features, kernel sizes or KA settings such as "
                       f"share/grid_size), e.g. {shape_diff[0]}: checkpoint {saved[shape_diff[0]]} vs "
                       f"network {current[shape_diff[0]]}")
    checkpoint_cfg = checkpoint.get("init_args", {}).get("configuration")
    return ("The checkpoint does not fit the network built from the current plans: " + "; ".join(reasons or
            ["state_dict mismatch"]) + f". Checkpoint trainer: {checkpoint.get('trainer_name')}, configuration: "
            f"{checkpoint_cfg}.")
