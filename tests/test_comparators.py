"""UKAN and StackedKAN built from nnU-Net plans, their per-edge transposed op, and their thin trainers."""
import types

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_allukan import KAModule, SharedSplineActivation
from nnunetv2_allukan.architectures.comparators import KANConvTransposeByStride, StackedKAN, TokenBlock, UKAN
from nnunetv2_allukan.reference import KANConv2d, KANConv3d, KANLinear
from nnunetv2_allukan.trainers.comparators import (nnUNetTrainerStackedKAN, nnUNetTrainerStackedKAN_smokeTest,
                                                   nnUNetTrainerUKAN, nnUNetTrainerUKAN_smokeTest)

REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks (conftest)

NETWORKS = {"UKAN": "nnunetv2_allukan.architectures.comparators.UKAN",
            "StackedKAN": "nnunetv2_allukan.architectures.comparators.StackedKAN"}
PLAIN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d)


def plans_arch(dim, strides, features, kernels=None):
    """A tiny architecture block in the form nnU-Net 2.8's planner writes for PlainConvUNet."""
    n = len(strides)
    return {
        "n_stages": n, "features_per_stage": features, "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": kernels or [[3] * dim] * n, "strides": strides, "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


CASES = {  # (architecture, input shape); tiny because StackedKAN is slow by design
    "2d_nonsquare": (plans_arch(2, [[1, 1], [2, 2], [1, 2]], [4, 6, 8]), (2, 1, 16, 24)),
    "3d_aniso": (plans_arch(3, [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [3, 4, 6],
                            kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3]]), (1, 2, 4, 8, 12)),
}


def build(network, case, n_classes=3, ds=True, **kwargs):
    arch, shape = CASES[case]
    return get_network_from_plans(NETWORKS[network], {**arch, **kwargs}, REQ_IMPORT, shape[1], n_classes,
                                  allow_init=True, deep_supervision=ds)


def nnunet_scales(strides):
    """nnU-Net's own _get_deep_supervision_scales, on a stand-in trainer."""
    fake = types.SimpleNamespace(enable_deep_supervision=True,
                                 configuration_manager=types.SimpleNamespace(pool_op_kernel_sizes=strides))
    return nnUNetTrainer._get_deep_supervision_scales(fake)


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("case", list(CASES))
def test_deep_supervision_outputs_match_nnunet_scales(network, case):
    arch, shape = CASES[case]
    net = build(network, case)
    x = torch.randn(shape)
    outs = net(x)
    scales = nnunet_scales(arch["strides"])
    assert isinstance(outs, list) and len(outs) == len(scales)
    for out, scale in zip(outs, scales):
        assert out.shape == (shape[0], 3) + tuple(int(round(s * f)) for s, f in zip(shape[2:], scale))
    net.decoder.deep_supervision = False
    single = net(x)
    assert torch.is_tensor(single)
    torch.testing.assert_close(single, outs[0])


@pytest.mark.parametrize("network", list(NETWORKS))
def test_state_dict_does_not_depend_on_deep_supervision(network):
    torch.manual_seed(0)
    on = build(network, "3d_aniso", ds=True)
    off = build(network, "3d_aniso", ds=False)
    assert list(on.state_dict()) == list(off.state_dict())
    off.load_state_dict(on.state_dict(), strict=True)
    x = torch.randn(CASES["3d_aniso"][1])
    torch.testing.assert_close(off(x), on(x)[0])


def _own_parameter_owners(net):
    return [m for m in net.modules() if list(m.parameters(recurse=False))]


def test_ukan_is_a_cnn_with_per_edge_kan_linears_in_the_token_stages():
    net = build("UKAN", "2d_nonsquare")
    kan_linears = [m for m in net.modules() if isinstance(m, KANLinear)]
    # two tokenised stages (encoder) + one (decoder; the deepest has no decoder stage), 3 maps each
    assert len(kan_linears) == 3 * 3
    assert any(isinstance(m, nn.Conv2d) and m.groups == 1 for m in net.modules())
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in net.modules())  # depthwise
    assert any(isinstance(m, nn.LeakyReLU) for m in net.modules())
    assert any(isinstance(m, nn.ConvTranspose2d) for m in net.modules())
    assert not any(isinstance(m, (KAModule, SharedSplineActivation)) for m in net.modules())
    # the encoder's first stage has no token block: U-KAN keeps convolutions at high resolution
    assert not any(isinstance(m, KANLinear) for m in net.encoder.stages[0].modules())


@pytest.mark.parametrize("case", list(CASES))
def test_stacked_kan_has_only_per_edge_kan_layers(case):
    net = build("StackedKAN", case)
    kan_conv = KANConv2d if case.startswith("2d") else KANConv3d
    assert not any(isinstance(m, (KAModule, SharedSplineActivation)) for m in net.modules())
    plain = [name for name, m in net.named_modules() if isinstance(m, PLAIN_LAYERS)]
    assert not plain
    assert any(isinstance(m, kan_conv) for m in net.modules())
    assert any(isinstance(m, KANLinear) for m in net.modules())
    for module in _own_parameter_owners(net):
        # Per-edge KAN maps and normalisation only (efficient-kan's base/spline weights live in _PerEdgeKAN).
        assert type(module).__name__ == "_PerEdgeKAN" or isinstance(
            module, (nn.modules.batchnorm._NormBase, nn.LayerNorm)), type(module)


@pytest.mark.parametrize("case", list(CASES))
def test_stacked_kan_has_the_allukan_topology_with_per_edge_parameters(case):
    """Every AllUKAN KA weight (C_in x C_out x taps) becomes G + k + 2 = 10 parameters per edge in StackedKAN."""
    arch, shape = CASES[case]
    allukan = get_network_from_plans("nnunetv2_allukan.architectures.AllUKAN", arch, REQ_IMPORT, shape[1], 3,
                                     deep_supervision=True)
    stacked = build("StackedKAN", case)
    edges = sum(m.weight.numel() for m in allukan.modules() if isinstance(m, KAModule))
    per_edge = sum(p.numel() for m in stacked.modules() if type(m).__name__ == "_PerEdgeKAN"
                   for p in m.parameters())
    assert per_edge == edges * (5 + 3 + 2)
    norms = lambda net: sum(p.numel() for m in net.modules()
                            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm)) for p in m.parameters())
    assert norms(stacked) == norms(allukan)


@pytest.mark.parametrize("dim,stride", [(2, (1, 2)), (3, (2, 1, 2))])
def test_per_edge_transposed_conv_is_conv_transpose_of_silu_when_splines_vanish(dim, stride):
    """Reference: F.conv_transpose with kernel == stride on silu(x), the weights mapped edge by edge."""
    c_in, c_out = 3, 2
    up = KANConvTransposeByStride(c_in, c_out, stride)
    with torch.no_grad():
        up.linear.kan.spline_weight.zero_()
    x = torch.randn(2, c_in, *([3] * dim))
    base = up.linear.kan.base_weight[0]  # (c_out * prod(stride), c_in), output index = (c_out, offsets...)
    weight = base.t().reshape(c_in, c_out, *stride)
    conv_transpose = F.conv_transpose2d if dim == 2 else F.conv_transpose3d
    expected = conv_transpose(F.silu(x), weight, stride=stride)
    torch.testing.assert_close(up(x), expected)


def test_per_edge_transposed_conv_gives_every_output_voxel_its_own_spline():
    up = KANConvTransposeByStride(1, 1, (2, 2))
    x = torch.full((1, 1, 1, 1), 0.7)
    out = up(x)
    assert out.shape == (1, 1, 2, 2) and out.flatten().unique().numel() == 4


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("bad,match", [(dict(skip_mode="mul"), "skip_mode"), (dict(token_stages=7), "token_stages"),
                                       (dict(grid_size=0), "grid_size"), (dict(n_conv_per_stage=[2]), "n_conv")])
def test_invalid_arguments_fail_at_build_time_naming_the_network(network, bad, match):
    with pytest.raises(ValueError, match=f"{network}: .*{match}"):
        build(network, "2d_nonsquare", **bad)


def test_one_dimensional_plans_are_rejected():
    arch = dict(CASES["2d_nonsquare"][0], conv_op="torch.nn.Conv1d")
    with pytest.raises(ValueError, match="UKAN: conv_op"):
        get_network_from_plans(NETWORKS["UKAN"], arch, REQ_IMPORT, 1, 2)


def test_skip_add_and_no_token_stages():
    add = build("UKAN", "2d_nonsquare", ds=False, skip_mode="add")
    none = build("StackedKAN", "2d_nonsquare", ds=False, token_stages=0)
    assert not any(isinstance(m, TokenBlock) for m in none.modules())
    shape = CASES["2d_nonsquare"][1]
    for net in (add, none):
        assert net(torch.randn(shape)).shape == (shape[0], 3) + shape[2:]


@pytest.mark.parametrize("trainer,network_class", [(nnUNetTrainerUKAN, UKAN), (nnUNetTrainerStackedKAN, StackedKAN),
                                                   (nnUNetTrainerUKAN_smokeTest, UKAN),
                                                   (nnUNetTrainerStackedKAN_smokeTest, StackedKAN)])
def test_trainer_builds_from_the_plans_on_the_class(trainer, network_class):
    """nnU-Net's predictor calls build_network_architecture on the class (2.8 signature), with DS off."""
    arch, shape = CASES["2d_nonsquare"]
    cm = types.SimpleNamespace(network_arch_class_name="dynamic_network_architectures.architectures.unet.PlainConvUNet",
                               network_arch_init_kwargs=arch, network_arch_init_kwargs_req_import=REQ_IMPORT)
    net = trainer.build_network_architecture(None, cm, shape[1], 4, False)
    assert type(net) is network_class and net.decoder.deep_supervision is False
    assert net(torch.randn(shape)).shape == (shape[0], 4) + shape[2:]
    assert issubclass(trainer, nnUNetTrainer) and "__" not in trainer.__name__


def test_trainers_accept_residual_encoder_plans():
    arch = dict(CASES["2d_nonsquare"][0])
    arch["n_blocks_per_stage"] = arch.pop("n_conv_per_stage")
    arch["block"] = "dynamic_network_architectures.building_blocks.residual.BasicBlockD"
    cm = types.SimpleNamespace(network_arch_class_name="dynamic_network_architectures.architectures.unet."
                                                       "ResidualEncoderUNet",
                               network_arch_init_kwargs=arch, network_arch_init_kwargs_req_import=REQ_IMPORT)
    assert isinstance(nnUNetTrainerUKAN.build_network_architecture(None, cm, 1, 2, True), UKAN)


def test_every_parameter_gets_a_gradient_with_deep_supervision():
    for network in NETWORKS:
        net = build(network, "2d_nonsquare")
        sum(o.square().mean() for o in net(torch.randn(CASES["2d_nonsquare"][1]))).backward()
        assert not [n for n, p in net.named_parameters() if p.grad is None], network


@pytest.mark.parametrize("network", list(NETWORKS))
def test_nnunet_set_deep_supervision_enabled_switches_the_comparators(network):
    net = build(network, "2d_nonsquare", ds=True)
    fake = types.SimpleNamespace(is_ddp=False, network=net)
    nnUNetTrainer.set_deep_supervision_enabled(fake, False)
    assert torch.is_tensor(net(torch.randn(CASES["2d_nonsquare"][1])))
    nnUNetTrainer.set_deep_supervision_enabled(fake, True)
    assert isinstance(net(torch.randn(CASES["2d_nonsquare"][1])), list)
