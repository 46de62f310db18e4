"""Which KA settings a trainer builds with: variant's explicit choice > plans configuration > trainer default.

The plans side is what ``nnunetv2-allukan add-plans`` writes; the checks read the built layers themselves.
"""
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_allukan.activation import SharedSplineActivation
from nnunetv2_allukan.tools.add_plans import add_allukan_configuration
from nnunetv2_allukan.tools.profiling.configs import synthetic_plans
from nnunetv2_allukan.trainers import (nnUNetTrainerAllUKAN, nnUNetTrainerAllUKAN_exactGrad,
                                       nnUNetTrainerAllUKAN_noTokens, nnUNetTrainerAllUKAN_shareChannel,
                                       nnUNetTrainerAllUKAN_shareGroup)
from nnunetv2_allukan.architectures.from_plans import ALLUKAN_RESENC_CLASS_NAME

DEFAULTS = nnUNetTrainerAllUKAN.ka_kwargs


def _plans(**ka) -> PlansManager:
    """Stock-style plans with a 2d configuration, plus 2d_allukan (as add-plans writes it) with ``ka`` set."""
    cfg = synthetic_plans(2, [32, 32], 2, base_features=4, max_features=8)
    plans = {"configurations": {"2d": {"patch_size": list(cfg.patch), "architecture": {
        "network_class_name": cfg.network_class_name, "arch_kwargs": cfg.arch_kwargs,
        "_kw_requires_import": list(cfg.req_import)}}}}
    ka_kwargs = {**DEFAULTS, **ka, "grid_range": list(ka.get("grid_range", DEFAULTS["grid_range"]))}
    return PlansManager(add_allukan_configuration(plans, "2d", "2d_allukan", ka_kwargs)[0])


def _activations(trainer, plans_manager, configuration):
    network = trainer.build_network_architecture(plans_manager, plans_manager.get_configuration(configuration),
                                                 1, 3, False)
    return [m for m in network.modules() if isinstance(m, SharedSplineActivation)]


def test_the_plans_configuration_wins_over_the_trainers_defaults():
    pm = _plans(share="channel", grid_size=7)
    activations = _activations(nnUNetTrainerAllUKAN, pm, "2d_allukan")
    assert activations and all(a.share == "channel" and a.grid_size == 7 for a in activations)
    reason = nnUNetTrainerAllUKAN.network_choice(pm.get_configuration("2d_allukan")).reason
    assert "share='channel' (from the plans; the trainer's default: 'layer')" in reason
    assert "grid_size=7 (from the plans" in reason


def test_stock_plans_give_the_trainers_settings_without_a_note():
    pm = _plans()
    assert all(a.share == "layer" and a.spline_grad == "free" for a in _activations(nnUNetTrainerAllUKAN, pm, "2d"))
    assert "KA settings" not in nnUNetTrainerAllUKAN.network_choice(pm.get_configuration("2d")).reason
    channel = _activations(nnUNetTrainerAllUKAN_shareChannel, pm, "2d")
    assert all(a.share == "channel" for a in channel)
    assert "share='channel' (the trainer's choice)" in \
        nnUNetTrainerAllUKAN_shareChannel.network_choice(pm.get_configuration("2d")).reason


def test_share_group_variant_gives_every_ka_layer_gcd_of_its_channels_and_8_splines():
    import math

    pm = _plans()
    network = nnUNetTrainerAllUKAN_shareGroup.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, True)
    activations = [m for m in network.modules() if isinstance(m, SharedSplineActivation)]
    assert activations and all(a.share == "group" for a in activations)
    assert all(a.coef.shape[0] == math.gcd(a.num_channels, 8) for a in activations)
    assert {a.coef.shape[0] for a in activations} > {1}  # the 1-channel input layer has one, wider layers more
    out = network(torch.randn(2, 1, 32, 32))
    sum(o.square().mean() for o in out).backward()
    assert all(a.coef.grad is not None and a.coef.grad.abs().sum() > 0 for a in activations)


def test_no_tokens_variant_has_the_plain_unet_topology_with_ka_layers():
    from nnunetv2_allukan.architectures.allukan import TokenKABlock
    from nnunetv2_allukan.layers import KAModule

    pm = _plans()
    cfg = pm.get_configuration("2d")
    default = nnUNetTrainerAllUKAN.build_network_architecture(pm, cfg, 1, 3, True)
    plain = nnUNetTrainerAllUKAN_noTokens.build_network_architecture(pm, cfg, 1, 3, True)
    assert any(isinstance(m, TokenKABlock) for m in default.modules())
    assert not any(isinstance(m, TokenKABlock) for m in plain.modules())
    # one KAonv per conv of the plans: encoder n_conv_per_stage, decoder transposed convs, convs and the heads
    arch = cfg.network_arch_init_kwargs
    n_ka = sum(isinstance(m, KAModule) for m in plain.modules())
    n_stages = arch["n_stages"]
    assert n_ka == sum(arch["n_conv_per_stage"]) + 2 * (n_stages - 1) + sum(arch["n_conv_per_stage_decoder"])
    assert "token_stages=0 (the trainer's choice)" in nnUNetTrainerAllUKAN_noTokens.network_choice(cfg).reason
    # the combined recipe builds the same network and keeps the splines' own optimizer group
    from nnunetv2_allukan.trainers import nnUNetTrainerAllUKAN_noTokensSplineAdam as combined
    from nnunetv2_allukan.trainers.recipes import SplineParameterGroup
    assert issubclass(combined, SplineParameterGroup) and combined.spline_optimizer == "adam"
    both = combined.build_network_architecture(pm, cfg, 1, 3, True)
    assert [type(m) for m in both.modules()] == [type(m) for m in plain.modules()]


def test_a_variants_explicit_choice_wins_over_the_plans_and_is_logged():
    pm = _plans(share="channel", spline_grad="free")
    activations = _activations(nnUNetTrainerAllUKAN_exactGrad, pm, "2d_allukan")
    # the variant's own choice (exact) wins; what it does not choose (share) still comes from the plans
    assert all(a.spline_grad == "exact" and a.share == "channel" for a in activations)
    reason = nnUNetTrainerAllUKAN_exactGrad.network_choice(pm.get_configuration("2d_allukan")).reason
    assert "spline_grad='exact' (the trainer's choice, over the plans' 'free')" in reason


@pytest.mark.parametrize("trainer", [nnUNetTrainerAllUKAN, nnUNetTrainerAllUKAN_exactGrad])
def test_the_residual_encoder_builder_gets_the_same_settings(trainer):
    """ResEnc plans (n_blocks_per_stage) build AllUKANResEnc: the KA settings are resolved the same way."""
    pm = _plans(share="channel")
    cm = pm.get_configuration("2d_allukan")
    arch = cm.network_arch_init_kwargs
    arch["n_blocks_per_stage"] = arch.pop("n_conv_per_stage")
    choice = trainer.network_choice(cm)
    assert choice.class_name == ALLUKAN_RESENC_CLASS_NAME
    assert choice.arch_kwargs["share"] == "channel"
    assert choice.arch_kwargs["spline_grad"] == trainer.ka_kwargs["spline_grad"]
