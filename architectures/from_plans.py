"""Which network a plans configuration builds, and with which keywords: the mapping from nnU-Net plans (plain or
residual-encoder presets) to our architectures. Used by the trainers, ``add-plans`` and the profiler alike; it
imports neither nnU-Net's trainer nor any tool, so the profiler runs where only torch and the network libraries
are installed (e.g. the GPU machine).
"""
from __future__ import annotations

from typing import NamedTuple

# The KA choices nnUNetTrainerAllUKAN builds with; trainer variants override single entries.
DEFAULT_KA_KWARGS: dict = {"spline_grad": "free", "share": "layer", "grid_size": 5, "grid_range": (-3.0, 3.0),
                           "token_stages": 2, "skip_mode": "concat"}

ALLUKAN_CLASS_NAME = "nnunetv2_allukan.architectures.AllUKAN"


def allukan_arch_kwargs(plans_arch_kwargs: dict, ka_kwargs: dict) -> dict:
    """The plans' architecture keywords, adapted to AllUKAN's plain stages, plus the KA choices.

    For a network without a residual encoder (the comparators; see ``network_for_plans``), residual-encoder
    plans' ``n_blocks_per_stage`` becomes ``n_conv_per_stage``: that many single KAonv blocks, no skip path.
    """
    kwargs = dict(plans_arch_kwargs)
    if "n_conv_per_stage" not in kwargs and "n_blocks_per_stage" in kwargs:
        kwargs["n_conv_per_stage"] = kwargs.pop("n_blocks_per_stage")
    kwargs.pop("n_blocks_per_stage", None)
    kwargs.pop("block", None)
    kwargs.pop("bottleneck_channels", None)
    kwargs.pop("stem_channels", None)
    kwargs.update(ka_kwargs)
    return kwargs


ALLUKAN_RESENC_CLASS_NAME = "nnunetv2_allukan.architectures.AllUKANResEnc"
# A network's residual-encoder counterpart, built instead of it from plans with a residual encoder.
RESIDUAL_ENCODER_COUNTERPART = {ALLUKAN_CLASS_NAME: ALLUKAN_RESENC_CLASS_NAME}


class NetworkChoice(NamedTuple):
    class_name: str
    arch_kwargs: dict
    reason: str  # one line for the training log


def plans_have_residual_encoder(plans_network_class_name: str, plans_arch_kwargs: dict) -> bool:
    """nnU-Net's ResEnc presets: the plans train d-n-a's ResidualEncoderUNet, or name ``n_blocks_per_stage``."""
    return (plans_network_class_name.rsplit(".", 1)[-1] == "ResidualEncoderUNet"
            or "n_blocks_per_stage" in plans_arch_kwargs)


def network_for_plans(network_class_name: str, plans_network_class_name: str, plans_arch_kwargs: dict,
                      ka_kwargs: dict) -> NetworkChoice:
    """The network a trainer whose network is ``network_class_name`` builds from a plans configuration.

    Plans with a residual encoder (``-p nnUNetResEncUNet{M,L,XL}Plans``) get the residual counterpart (AllUKAN ->
    AllUKANResEnc, the residual KA encoder) with the plans' keywords unchanged; a network without one (UKAN,
    StackedKAN) gets them as plain stages (``allukan_arch_kwargs``), and so do plain plans.
    """
    if not plans_have_residual_encoder(plans_network_class_name, plans_arch_kwargs):
        return NetworkChoice(network_class_name, allukan_arch_kwargs(plans_arch_kwargs, ka_kwargs),
                             f"{network_class_name} (plain plans: {plans_network_class_name})")
    blocks = plans_arch_kwargs.get("n_blocks_per_stage")
    if network_class_name in RESIDUAL_ENCODER_COUNTERPART:
        residual = RESIDUAL_ENCODER_COUNTERPART[network_class_name]
        return NetworkChoice(residual, {**plans_arch_kwargs, **ka_kwargs},
                             f"{residual}: residual KA encoder, n_blocks_per_stage {blocks} (the plans train "
                             f"{plans_network_class_name})")
    return NetworkChoice(network_class_name, allukan_arch_kwargs(plans_arch_kwargs, ka_kwargs),
                         f"{network_class_name} has no residual encoder: n_blocks_per_stage {blocks} of the "
                         f"residual-encoder plans ({plans_network_class_name}) become plain KA blocks")
