"""Rebuild a trained network from an nnU-Net checkpoint (for plots and analyses, not for inference).

nnU-Net stores the trainer's class name, its init arguments (plans, configuration, dataset.json) and the
weights. The network is rebuilt with that trainer's own ``build_network_architecture`` (our trainers, or
nnU-Net's for configurations that name AllUKAN in the plans).
"""
from __future__ import annotations

import os


class CheckpointError(Exception):
    pass


CHECKPOINT_PREFERENCE = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")


def find_checkpoint(path: str, fold: str | int | None = None, checkpoint_name: str | None = None) -> str:
    """A checkpoint file, or one inside an nnU-Net model folder, chosen as nnU-Net's commands choose it.

    ``path`` is a .pth file, a fold folder, or a trainer folder (``<Trainer>__<Plans>__<config>``). In a trainer
    folder, ``fold`` (nnU-Net's ``-f``; a number or "all") picks ``fold_<fold>``; without it the only fold is
    taken. ``checkpoint_name`` (nnU-Net's ``-chk``) picks the file; without it the first of final, best, latest.
    """
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist; pass a checkpoint .pth or an nnU-Net model folder")
    folder = _fold_folder(path, fold)
    names = [checkpoint_name] if checkpoint_name else list(CHECKPOINT_PREFERENCE)
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CheckpointError(f"no {' / '.join(names)} in {folder}")


def _fold_folder(path: str, fold) -> str:
    folds = sorted(d for d in os.listdir(path) if d.startswith("fold_") and os.path.isdir(os.path.join(path, d)))
    if fold is not None:
        if os.path.basename(os.path.normpath(path)) == f"fold_{fold}":
            return path
        if f"fold_{fold}" not in folds:
            raise CheckpointError(f"{path} has no fold_{fold}" + (f" (it has {', '.join(folds)})" if folds else ""))
        return os.path.join(path, f"fold_{fold}")
    if not folds or any(f.startswith("checkpoint_") and f.endswith(".pth") for f in os.listdir(path)):
        return path  # a fold folder itself
    if len(folds) > 1:
        raise CheckpointError(f"{path} holds {', '.join(folds)}: choose one with -f FOLD")
    return os.path.join(path, folds[0])


def trainer_class(name: str):
    import nnunetv2_allukan.trainers as ours
    if hasattr(ours, name):
        return getattr(ours, name)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    return recursive_find_trainer_class_by_name(name)


def checkpoint_configuration(checkpoint: dict):
    """(PlansManager, ConfigurationManager, input channels, output channels) of an nnU-Net checkpoint.

    Read through nnU-Net's own plans classes, so a configuration that inherits (``2d_allukan`` from ``2d``,
    ``3d_cascade_fullres`` from ``3d_fullres``) gets its parent's patch size, spacing and network keywords.
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    init = checkpoint["init_args"]
    plans_manager = PlansManager(init["plans"])
    configuration_manager = plans_manager.get_configuration(init["configuration"])
    n_in = determine_num_input_channels(plans_manager, configuration_manager, init["dataset_json"])
    n_out = plans_manager.get_label_manager(init["dataset_json"]).num_segmentation_heads
    return plans_manager, configuration_manager, n_in, n_out


def load_network(path: str, fold: str | int | None = None, checkpoint_name: str | None = None):
    """(network in eval mode on the CPU, checkpoint dict); ``fold``/``checkpoint_name`` as in find_checkpoint."""
    import torch

    checkpoint_file = find_checkpoint(path, fold, checkpoint_name)
    try:
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        trainer_name = checkpoint["trainer_name"]
        plans_manager, cm, n_in, n_out = checkpoint_configuration(checkpoint)
    except (KeyError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{checkpoint_file} is not an nnU-Net checkpoint ({e})") from None
    network = trainer_class(trainer_name).build_network_architecture(plans_manager, cm, n_in, n_out, False)
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v
               for k, v in checkpoint["network_weights"].items()}
    network.load_state_dict(weights)
    network.eval()
    checkpoint["checkpoint_file"] = checkpoint_file
    return network, checkpoint
