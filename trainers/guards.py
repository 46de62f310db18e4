"""Trainer mixins that make long runs fail loudly instead of silently (stock nnU-Net keeps training on NaN)."""
from __future__ import annotations

import os

import numpy as np
import torch


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteLossGuard:
    """Never write a checkpoint with NaN/Inf in it, and stop after ``max_consecutive_nonfinite`` non-finite
    training losses in a row.

    nnU-Net writes ``checkpoint_latest.pth`` every ``save_every`` epochs, ``checkpoint_best.pth`` on a new best
    pseudo Dice and ``checkpoint_final.pth`` at the end (then deletes latest). A non-finite loss in the last
    iterations of an epoch (fewer than ``max_consecutive_nonfinite``) would otherwise put NaN weights into those
    files, so ``save_checkpoint`` checks the weights and optimizer state first and stops training instead of
    writing (before nnU-Net's end of training could delete the last good ``checkpoint_latest.pth``). Raising from
    ``train_step`` leaves the loop before the end-of-epoch checkpointing. Under DDP (``-num_gpus N``) the ranks
    agree on every iteration (one tiny all-reduce): a non-finite loss on any rank has already spoilt everyone's
    averaged gradients, and a rank that stopped alone would leave the others waiting in the next all-reduce.
    The weights are identical on every rank, so every rank makes the same checkpoint decision.
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
            self._stop(f"the loss was NaN/Inf for {self._nonfinite_in_a_row} iterations in a row (epoch "
                       f"{self.current_epoch}, iteration {self._iteration_in_epoch - 1})")
        return result

    def save_checkpoint(self, filename: str) -> None:
        if not self._weights_and_optimizer_finite():
            self._stop(f"the network weights or optimizer state contain NaN/Inf at the end of epoch "
                       f"{self.current_epoch}, so {os.path.basename(filename)} was not written")
        super().save_checkpoint(filename)
        if not getattr(self, "disable_checkpointing", False):
            self._checkpoints_written = {**getattr(self, "_checkpoints_written", {}),
                                         os.path.basename(filename): self.current_epoch}

    def _stop(self, reason: str):
        message = (f"Training stopped: {reason}. No checkpoint with NaN/Inf weights is ever written; "
                   f"{self._checkpoints_report()}. Check the input data and intensities, or lower the learning "
                   f"rate, then continue with --c.")
        self.print_to_log_file(message)
        raise NonFiniteLossError(message)

    def _checkpoints_report(self) -> str:
        written = getattr(self, "_checkpoints_written", {})
        if written:
            return "this run wrote " + ", ".join(f"{name} (after epoch {epoch})" for name, epoch in written.items()) \
                + f" in {self.output_folder}, all with finite weights"
        earlier = sorted(f for f in os.listdir(self.output_folder) if f.startswith("checkpoint_")) \
            if os.path.isdir(self.output_folder) else []
        return "this run wrote no checkpoint" + (f" ({', '.join(earlier)} in {self.output_folder} are from an "
                                                 f"earlier run)" if earlier else "")

    def _weights_and_optimizer_finite(self) -> bool:
        tensors = list(self.network.state_dict().values())
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point() or t.is_complex())

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
    """Say *what* differs when a checkpoint does not fit the network built from the current plans, or its
    optimizer state does not fit this trainer's optimizer (a checkpoint of another training recipe)."""

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        try:
            super().load_checkpoint(filename_or_checkpoint)
        except (RuntimeError, ValueError, KeyError) as e:
            if not _is_checkpoint_mismatch(e) or getattr(self, "optimizer", None) is None:
                raise  # out of memory, a broken file, an initialisation that failed: the real cause, unchanged
            checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
                torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
            if isinstance(e, RuntimeError) and "state_dict" in str(e):
                raise RuntimeError(describe_state_dict_mismatch(checkpoint, self.network, self.label_manager)) from e
            saved, ours = optimizer_layout(checkpoint.get("optimizer_state")), optimizer_layout(self.optimizer.state_dict())
            if saved == ours:
                raise
            raise RuntimeError(describe_optimizer_mismatch(checkpoint, saved, ours, type(self).__name__,
                                                           self.output_folder)) from e


def _is_checkpoint_mismatch(error: BaseException) -> bool:
    """Whether ``error`` is what torch raises when a checkpoint's weights or optimizer state do not fit: a
    state_dict size/key mismatch (RuntimeError), an optimizer's parameter-group mismatch (ValueError) or a missing
    entry (KeyError). Anything else (out of memory above all) is not explained away as a mismatch."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    message = str(error)
    if isinstance(error, KeyError):
        return True
    if isinstance(error, ValueError):
        return any(s in message for s in ("parameter group", "state dict", "optimizer state"))
    return "state_dict" in message or "size mismatch" in message


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


def optimizer_layout(state_dict) -> tuple:
    """The parameter count of every group of an optimizer state dict (one tuple per part of a combined one)."""
    if not isinstance(state_dict, dict):
        return ()
    if "combined" in state_dict:
        return tuple(optimizer_layout(part) for part in state_dict["combined"])
    return tuple(len(group["params"]) for group in state_dict.get("param_groups", []))


def _describe_layout(layout: tuple) -> str:
    if layout and isinstance(layout[0], tuple):
        return " + ".join(_describe_layout(part) for part in layout) + " (one optimizer per part)"
    return f"{len(layout)} group(s) of {', '.join(map(str, layout))} parameters"


def describe_optimizer_mismatch(checkpoint: dict, saved: tuple, ours: tuple, trainer_name: str,
                                output_folder: str) -> str:
    written_by = checkpoint.get("trainer_name", "an unknown trainer")
    message = (f"This checkpoint's optimizer state does not fit {trainer_name}'s optimizer: it was written by "
               f"{written_by} with {_describe_layout(saved)}, this trainer has {_describe_layout(ours)}. "
               f"A run continues (--c) only with the training recipe that started it; the checkpoint is untouched.")
    if saved and not isinstance(saved[0], tuple) and trainer_name == "nnUNetTrainerAllUKAN":
        # One SGD group over every parameter: nnUNetTrainerAllUKAN's recipe before 0.2.0.
        old_folder = output_folder.replace(f"{trainer_name}__", "nnUNetTrainerAllUKAN_splineSGD__", 1)
        message += (" nnUNetTrainerAllUKAN trains the spline parameters with their own Adam since version 0.2.0; "
                    "checkpoints of the earlier recipe (one SGD group) continue with "
                    "-tr nnUNetTrainerAllUKAN_splineSGD: copy the training output folder "
                    f"{os.path.dirname(output_folder)} to {os.path.dirname(old_folder)} and run nnUNetv2_train "
                    "with -tr nnUNetTrainerAllUKAN_splineSGD --c. Or start again without --c to train with the "
                    "new recipe.")
    elif trainer_name.startswith("nnUNetTrainerAllUKAN"):
        message += (" nnUNetTrainerAllUKAN and its variants train the spline parameters with their own Adam since "
                    "version 0.2.0: continue a run of an earlier version with that version, or start again without "
                    "--c.")
    return message
