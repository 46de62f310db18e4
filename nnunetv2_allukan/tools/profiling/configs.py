"""What is profiled, part 1: the nnU-Net plans configuration and the input size to profile it at.

Either a dataset's planned configuration (``plans_config``) or one synthesised by nnU-Net's own planner rules
(``synthetic_plans``). The bottom of the profiler: imports none of its other modules.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
REQ_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")


class ProfileError(Exception):
    """A mistake in what the user asked for: reported in one line, without a traceback."""


@dataclass
class NetworkConfig:
    """One plans configuration plus the input size to profile it at."""

    source: str                 # human-readable origin (plans file or "synthetic ...")
    dim: int
    network_class_name: str     # what the plans train (the CNN row uses it if it is a d-n-a class)
    arch_kwargs: dict           # plans' arch_kwargs, ops as dotted strings
    req_import: tuple
    input_channels: int
    num_classes: int
    patch: tuple
    batch: int

    @property
    def strides(self) -> list:
        return [list(s) if isinstance(s, (list, tuple)) else [s] * self.dim
                for s in self.arch_kwargs["strides"]]

    def cumulative_stride(self) -> list:
        total = [1] * self.dim
        for s in self.strides:
            total = [t * v for t, v in zip(total, s)]
        return total


def synthetic_plans(dim: int, patch, batch: int, input_channels: int = 1, num_classes: int = 3,
                    spacing=None, base_features: int = 32, max_features: int | None = None) -> NetworkConfig:
    """A configuration as nnU-Net 2.8's default ExperimentPlanner would write it for this patch and spacing.

    Stages, strides, conv kernels and the padded patch come from nnU-Net's own ``get_pool_and_conv_props`` (min
    bottleneck edge 4). Widths and block counts are the planner's defaults, which it sets in ``__init__`` (so they
    cannot be read without a dataset): 32 base features doubled per stage up to 512 (2D) / 320 (3D), two convs
    per encoder and decoder stage, instance norm, LeakyReLU. ``base_features``/``max_features`` override the widths
    (for small test networks).
    """
    from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op, get_matching_instancenorm
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    if dim not in (2, 3):
        raise ProfileError(f"--dim must be 2 or 3, got {dim}")
    patch = _expand(patch, dim, "--patch")
    spacing = _expand(spacing or [1.0], dim, "--spacing")
    if batch < 1 or min(patch) < 1:
        raise ProfileError(f"--batch and --patch must be positive, got batch {batch}, patch {patch}")
    _, strides, kernels, planned_patch, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    n_stages = len(strides)
    conv_op = convert_dim_to_conv_op(dim)
    norm = get_matching_instancenorm(conv_op)
    if max_features is None:
        max_features = 512 if dim == 2 else 320
    if base_features < 1 or max_features < 1:
        raise ProfileError(f"--base-features and --max-features must be positive, got {base_features}, "
                           f"{max_features}")
    arch = {
        "n_stages": n_stages,
        "features_per_stage": [min(max_features, base_features * 2 ** s) for s in range(n_stages)],
        "conv_op": f"{conv_op.__module__}.{conv_op.__name__}",
        "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides],
        "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": f"{norm.__module__}.{norm.__name__}",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    planned_patch = tuple(int(p) for p in planned_patch)
    source = f"synthetic {dim}D plans (nnU-Net planner rules), spacing {list(spacing)}"
    if planned_patch != tuple(patch):
        source += f"; patch {list(patch)} padded to {list(planned_patch)} by nnU-Net's planner"
    return NetworkConfig(source, dim, PLAIN_CONV_UNET, arch, REQ_IMPORT, input_channels, num_classes,
                         planned_patch, batch)


def plans_config(dataset: str, configuration: str, plans_identifier: str = "nnUNetPlans", patch=None,
                 batch: int | None = None) -> NetworkConfig:
    """The configuration nnU-Net planned for a dataset in ``$nnUNet_preprocessed``."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed or not os.path.isdir(preprocessed):
        raise ProfileError("nnUNet_preprocessed is not set or not a folder: export it as for any nnU-Net command, "
                           "or profile a synthetic configuration with --dim/--patch")
    name = _dataset_folder(preprocessed, dataset)
    plans_file = os.path.join(preprocessed, name, plans_identifier + ".json")
    dataset_file = os.path.join(preprocessed, name, "dataset.json")
    for path in (plans_file, dataset_file):
        if not os.path.isfile(path):
            raise ProfileError(f"{path} not found; run nnUNetv2_plan_and_preprocess -d {dataset} first, or pass -p "
                               f"with the plans identifier")
    with open(plans_file) as f:
        plans = json.load(f)
    with open(dataset_file) as f:
        dataset_json = json.load(f)
    if configuration not in plans.get("configurations", {}):
        raise ProfileError(f"configuration {configuration!r} is not in {plans_file}; available: "
                           f"{', '.join(plans.get('configurations', {}))}")
    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    dim = len(cm.patch_size)
    cfg = NetworkConfig(
        source=f"{plans_file} [{configuration}]", dim=dim, network_class_name=cm.network_arch_class_name,
        arch_kwargs=dict(cm.network_arch_init_kwargs), req_import=tuple(cm.network_arch_init_kwargs_req_import),
        input_channels=determine_num_input_channels(plans_manager, cm, dataset_json),
        num_classes=plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        patch=tuple(int(p) for p in cm.patch_size), batch=int(cm.batch_size))
    if patch is not None:
        cfg.patch = tuple(_expand(patch, dim, "--patch"))
    if batch is not None:
        cfg.batch = batch
    bad = [p for p, c in zip(cfg.patch, cfg.cumulative_stride()) if p % c]
    if bad:
        raise ProfileError(f"patch {list(cfg.patch)} is not divisible by the network's total stride "
                           f"{cfg.cumulative_stride()}")
    return cfg


def _dataset_folder(preprocessed: str, dataset: str) -> str:
    if os.path.isdir(os.path.join(preprocessed, dataset)):
        return dataset
    if dataset.isdigit():
        prefix = f"Dataset{int(dataset):03d}_"
        matches = sorted(d for d in os.listdir(preprocessed) if d.startswith(prefix))
        if len(matches) == 1:
            return matches[0]
    raise ProfileError(f"dataset {dataset!r} was not found in nnUNet_preprocessed={preprocessed}; check the id or "
                       f"run nnUNetv2_plan_and_preprocess first")


def _expand(values, dim: int, name: str) -> list:
    values = list(values)
    if len(values) == 1:
        values = values * dim
    if len(values) != dim:
        raise ProfileError(f"{name} needs 1 or {dim} values, got {values}")
    return values
