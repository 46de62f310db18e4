"""Rebuild a trained network from an nnU-Net checkpoint (for plots and analyses, not for inference).

nnU-Net stores the trainer's class name, its init arguments (plans, configuration, dataset.json) and the
weights. The network is rebuilt with that trainer's own ``build_network_architecture`` (our trainers, or
nnU-Net's for configurations that name AllUKAN in the plans).
"""
from __future__ import annotations

import os


class CheckpointError(Exception):
    pass


def find_checkpoint(path: str) -> str:
    """A checkpoint file, or the best one inside a fold folder / trainer folder."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist; pass a checkpoint .pth or an nnU-Net fold folder")
    for candidate in ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth"):
        for folder in (path, os.path.join(path, "fold_0")):
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
    raise CheckpointError(f"no checkpoint_final/best/latest.pth in {path} (or its fold_0)")


def trainer_class(name: str):
    import nnunetv2_allukan.trainers as ours
    if hasattr(ours, name):
        return getattr(ours, name)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    return recursive_find_trainer_class_by_name(name)


def load_network(path: str):
    """(network in eval mode on the CPU, checkpoint dict)."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoint_file = find_checkpoint(path)
    try:
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        init = checkpoint["init_args"]
        trainer_name = checkpoint["trainer_name"]
    except (KeyError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{checkpoint_file} is not an nnU-Net checkpoint ({e})") from None
    plans_manager = PlansManager(init["plans"])
    cm = plans_manager.get_configuration(init["configuration"])
    n_in = determine_num_input_channels(plans_manager, cm, init["dataset_json"])
    n_out = plans_manager.get_label_manager(init["dataset_json"]).num_segmentation_heads
    network = trainer_class(trainer_name).build_network_architecture(plans_manager, cm, n_in, n_out, False)
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v
               for k, v in checkpoint["network_weights"].items()}
    network.load_state_dict(weights)
    network.eval()
    checkpoint["checkpoint_file"] = checkpoint_file
    return network, checkpoint
