"""What is profiled, part 2: the networks (rows) and their gradient and memory modes.

Each ``Variant`` names a network class, constructor keywords on top of the plans, and a memory mode applied after
building it: the dense B-spline basis through plain autograd, ``torch.utils.checkpoint`` around every stage, or
unfused KA layers.
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field, replace

import torch
from torch import nn
import torch.nn.functional as F

from ...activation import SharedSplineActivation
from ...architectures.from_plans import ALLUKAN_CLASS_NAME as ALLUKAN
from ...spline import bspline_basis
from .configs import PLAIN_CONV_UNET, NetworkConfig, ProfileError

UKAN = "nnunetv2_allukan.architectures.comparators.UKAN"
STACKED_KAN = "nnunetv2_allukan.architectures.comparators.StackedKAN"


@dataclass
class Variant:
    key: str
    name: str
    network: str          # dotted class name
    description: str
    overrides: dict = field(default_factory=dict)   # constructor keywords on top of the plans
    dense_basis: bool = False
    checkpoint_stages: bool = False
    unfused: bool = False
    spline_backend: str | None = None  # None: "auto" (the kernels of the device: numba on CPU, Triton on CUDA)


VARIANTS = [
    Variant("cnn", "PlainConvUNet", PLAIN_CONV_UNET, "nnU-Net's CNN (stock nnUNetTrainer)"),
    Variant("free", "AllUKAN free", ALLUKAN, "Grad-Free Spline, basis recomputed in backward",
            {"spline_grad": "free"}),
    Variant("free-torch", "AllUKAN free, torch path", ALLUKAN,
            "as free, with the spline on the torch path instead of the device's kernels", {"spline_grad": "free"},
            spline_backend="torch"),
    Variant("exact", "AllUKAN exact", ALLUKAN, "exact spline gradient, basis recomputed in backward",
            {"spline_grad": "exact"}),
    Variant("dense", "AllUKAN dense basis", ALLUKAN, "exact gradient, plain autograd through the dense basis",
            {"spline_grad": "exact"}, dense_basis=True),
    Variant("dense-ckpt", "AllUKAN dense + checkpoint", ALLUKAN,
            "dense basis, torch.utils.checkpoint per stage", {"spline_grad": "exact"}, dense_basis=True,
            checkpoint_stages=True),
    Variant("exact-ckpt", "AllUKAN exact + checkpoint", ALLUKAN,
            "exact (recompute), torch.utils.checkpoint per stage", {"spline_grad": "exact"},
            checkpoint_stages=True),
    Variant("free-unfused", "AllUKAN free, unfused", ALLUKAN,
            "Grad-Free, phi(x) and the conv as two autograd ops (phi(x) kept)", {"spline_grad": "free"},
            unfused=True),
    Variant("ukan", "UKAN", UKAN, "partial KA: CNN stages, per-edge KANLinear in tokenised stages"),
    Variant("stacked", "StackedKAN", STACKED_KAN, "per-edge KAN everywhere (directly stacked KAN)"),
]
VARIANT_BY_KEY = {v.key: v for v in VARIANTS}
DEFAULT_ROWS = [v.key for v in VARIANTS]


def network_class_and_kwargs(variant: Variant, cfg: NetworkConfig, ka_kwargs: dict | None = None) -> tuple[str, dict]:
    """The dotted class the variant builds from these plans, and its constructor keywords."""
    from nnunetv2_allukan.architectures.from_plans import DEFAULT_KA_KWARGS, network_for_plans

    if variant.key == "cnn":
        # The CNN the plans train, unless they name one of ours (e.g. a 2d_allukan configuration).
        if cfg.network_class_name.startswith("dynamic_network_architectures."):
            return cfg.network_class_name, dict(cfg.arch_kwargs)
        return variant.network, dict(cfg.arch_kwargs)
    # As the trainers build it: ResEnc plans (-p nnUNetResEncUNetMPlans) give AllUKAN's residual encoder.
    class_name, kwargs, _ = network_for_plans(
        variant.network, cfg.network_class_name, cfg.arch_kwargs,
        {**DEFAULT_KA_KWARGS, **(ka_kwargs or {}), **variant.overrides})
    return class_name, kwargs


def named_for_plans(variant: Variant, cfg: NetworkConfig) -> Variant:
    """The variant with its row named after the class these plans build (ResidualEncoderUNet, AllUKANResEnc ...)."""
    if variant.network not in (PLAIN_CONV_UNET, ALLUKAN):
        return variant
    default_class = variant.network.rsplit(".", 1)[1]
    built_class = network_class_and_kwargs(variant, cfg)[0].rsplit(".", 1)[1]
    if built_class == default_class:
        return variant
    return replace(variant, name=built_class + variant.name[len(default_class):])


def build_network(variant: Variant, cfg: NetworkConfig, ka_kwargs: dict | None = None) -> nn.Module:
    """The variant's network from the configuration, with deep supervision on (as nnU-Net trains)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    class_name, kwargs = network_class_and_kwargs(variant, cfg, ka_kwargs)
    network_class = _locate_class(class_name)
    kwargs = _accepted_kwargs(network_class, kwargs)
    network = get_network_from_plans(class_name, kwargs, [k for k in cfg.req_import if k in kwargs],
                                     cfg.input_channels, cfg.num_classes, allow_init=True, deep_supervision=True)
    if variant.dense_basis:
        use_dense_basis(network)
    if variant.checkpoint_stages:
        checkpoint_every_stage(network)
    if variant.unfused:
        unfuse_ka_layers(network)
    if variant.spline_backend is not None:
        for module in network.modules():
            if isinstance(module, SharedSplineActivation):
                module.backend = variant.spline_backend
    return network


def _locate_class(class_name: str):
    import pydoc
    located = pydoc.locate(class_name)
    if located is None:
        raise ProfileError(f"network class {class_name} cannot be imported")
    return located


def _accepted_kwargs(network_class, kwargs: dict) -> dict:
    """Drop the plans keywords a class does not take (e.g. AllUKAN's spline keywords for the CNN)."""
    parameters = inspect.signature(network_class.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in parameters}


def _dense_basis_forward(self: SharedSplineActivation, x: torch.Tensor) -> torch.Tensor:
    """phi(x) through the dense (..., nb) basis and plain autograd: saves the basis and its intermediates."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        basis = bspline_basis(x32, self.grid_size, self.grid_range)
        coef = self.coef.to(x32.dtype)
        base_weight = self.base_weight.to(x32.dtype)
        if self.share == "layer":
            out = base_weight[0] * F.silu(x32) + basis @ coef[0]
        else:
            channel_dim = self.channel_dim % x.dim()
            shape = [1] * x.dim()
            shape[channel_dim] = -1
            out = base_weight.reshape(shape) * F.silu(x32) + (basis * coef.reshape(*shape, coef.shape[1])).sum(-1)
        return out.to(x.dtype)


def use_dense_basis(network: nn.Module) -> int:
    """Make every shared spline activation differentiate through the dense basis; returns how many changed."""
    unfuse_ka_layers(network)  # the fused layers would not call the activation's (patched) forward
    changed = 0
    for module in network.modules():
        if isinstance(module, SharedSplineActivation):
            module.forward = types.MethodType(_dense_basis_forward, module)
            changed += 1
    return changed


class CheckpointedStage(nn.Module):
    """Runs a stage under torch.utils.checkpoint: only its input is kept, the rest is recomputed in backward."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.stage, x, use_reentrant=False)
        return self.stage(x)


def checkpoint_every_stage(network: nn.Module) -> int:
    """Wrap each ``encoder.stages[i]`` and ``decoder.stages[i]``; returns how many were wrapped."""
    wrapped = 0
    for stages in (network.encoder.stages, network.decoder.stages):
        for i in range(len(stages)):
            stages[i] = CheckpointedStage(stages[i])
            wrapped += 1
    return wrapped


def unfuse_ka_layers(network: nn.Module) -> int:
    """Run phi and the linear map of every KA layer as two autograd ops; returns how many layers changed."""
    from ...layers import KAModule

    changed = 0
    for module in network.modules():
        if isinstance(module, KAModule):
            module.fuse_activation = False
            changed += 1
    return changed
