"""``nnunetv2-allukan add-plans``: add a plans configuration (e.g. ``2d_allukan``) that names AllUKAN.

The new configuration inherits an existing one and only swaps the network, so nnU-Net's stock ``nnUNetTrainer``
trains ALL U-KAN without ``nnUNet_extTrainer``. The network is the one ``nnUNetTrainerAllUKAN`` would build from
the source configuration (``network_for_plans``): AllUKAN from plain plans, the residual KA encoder
(AllUKANResEnc) from nnU-Net's ResEnc presets, so both routes train the same network.
"""
from __future__ import annotations

import json
import os
import shutil

from .nnunet_commands import UserError, dataset_name, require_env


def add_allukan_configuration(plans: dict, source: str, target: str, ka_kwargs: dict) -> tuple[dict, str]:
    """Plans with a configuration ``target`` that inherits ``source`` and names AllUKAN (or, for residual-encoder
    plans, AllUKANResEnc), and one line saying which network and why."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_allukan.architectures.from_plans import ALLUKAN_CLASS_NAME, network_for_plans

    if source not in plans["configurations"]:
        raise UserError(f"configuration {source!r} is not in the plans; available: "
                        f"{', '.join(plans['configurations'])}")
    resolved = PlansManager(plans).get_configuration(source)  # nnU-Net resolves the source's own inheritance
    choice = network_for_plans(ALLUKAN_CLASS_NAME, resolved.network_arch_class_name,
                               resolved.network_arch_init_kwargs, ka_kwargs)
    new_plans = json.loads(json.dumps(plans))
    new_plans["configurations"][target] = {
        "inherits_from": source,
        "architecture": {
            "network_class_name": choice.class_name,
            "arch_kwargs": choice.arch_kwargs,
            "_kw_requires_import": list(resolved.network_arch_init_kwargs_req_import),
        },
    }
    return new_plans, choice.reason


def _check_builds(plans: dict, configuration: str):
    """Build the network once so that bad KA arguments fail now, naming the argument, not at training time."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    try:
        get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                               cm.network_arch_init_kwargs_req_import, 1, 2, allow_init=False)
    except ValueError as e:
        raise UserError(str(e)) from None


def add_plans(args) -> int:
    """The command, from the CLI's parsed arguments."""
    from nnunetv2_allukan.architectures.from_plans import DEFAULT_KA_KWARGS

    preprocessed = require_env("nnUNet_preprocessed")
    name = dataset_name(args.dataset)
    plans_file = os.path.join(preprocessed, name, args.plans + ".json")
    if not os.path.isfile(plans_file):
        raise UserError(f"plans file {plans_file} not found; run nnUNetv2_plan_and_preprocess -d {args.dataset} "
                        f"first, or pass -p with the plans identifier")
    target = args.name or f"{args.configuration}_allukan"
    ka_kwargs = dict(DEFAULT_KA_KWARGS)
    for key in ("spline_grad", "share", "grid_size", "skip_mode", "token_stages"):
        if getattr(args, key) is not None:
            ka_kwargs[key] = getattr(args, key)
    if args.grid_range is not None:
        ka_kwargs["grid_range"] = tuple(args.grid_range)
    with open(plans_file) as f:
        plans = json.load(f)
    if target in plans["configurations"] and not args.overwrite:
        raise UserError(f"configuration {target!r} already exists in {plans_file}; pass --overwrite to replace it")
    ka_kwargs["grid_range"] = list(ka_kwargs["grid_range"])
    new_plans, network = add_allukan_configuration(plans, args.configuration, target, ka_kwargs)
    _check_builds(new_plans, target)
    backup = plans_file + ".bak"
    if not os.path.exists(backup):
        shutil.copy2(plans_file, backup)
    tmp = plans_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new_plans, f, indent=4, sort_keys=False)
    os.replace(tmp, plans_file)
    print(f"Added configuration {target!r} (inherits {args.configuration!r}; network {network}) to {plans_file}")
    print(f"Train it with the stock trainer:  nnUNetv2_train {args.dataset} {target} FOLD")
    return 0
