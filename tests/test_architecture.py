"""AllUKAN built from nnU-Net plans: fully KA, 2D/3D, deep supervision, zero-config plans route."""
import types

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_allukan.architectures import AllUKAN
from nnunetv2_allukan.trainers import nnUNetTrainerAllUKAN
from nnunetv2_allukan.architectures.from_plans import allukan_arch_kwargs
from nnunetv2_allukan.trainers.recipes import EpochCosineLRScheduler, split_spline_parameters

from conftest import count_ka_layers_fully_ka


def plans_arch(dim, n_stages, strides, kernels=None, features=None):
    """An architecture block as nnU-Net 2.8's planner writes it for PlainConvUNet."""
    return {
        "n_stages": n_stages,
        "features_per_stage": features or [8 * 2 ** s for s in range(n_stages)],
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": kernels or [[3] * dim] * n_stages,
        "strides": strides,
        "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
CASES = {
    "2d_nonsquare": (plans_arch(2, 4, [[1, 1], [2, 2], [2, 2], [2, 2]]), (2, 1, 48, 80)),
    "2d_aniso_strides": (plans_arch(2, 3, [[1, 1], [1, 2], [2, 2]]), (2, 2, 16, 40)),
    "3d_aniso": (plans_arch(3, 4, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
                            kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]), (1, 1, 8, 32, 24)),
    "2d_six_stages": (plans_arch(2, 6, [[1, 1]] + [[2, 2]] * 5, features=[4, 8, 8, 8, 8, 8]), (1, 1, 64, 64)),
}


def build(arch, in_ch, n_classes, ds, **ka):
    kwargs = allukan_arch_kwargs(arch, {**nnUNetTrainerAllUKAN.ka_kwargs, **ka})
    return get_network_from_plans("nnunetv2_allukan.architectures.AllUKAN", kwargs, REQ_IMPORT, in_ch, n_classes,
                                  allow_init=True, deep_supervision=ds)


def ds_scales(arch):
    """nnU-Net's own _get_deep_supervision_scales, on a stand-in trainer."""
    fake = types.SimpleNamespace(enable_deep_supervision=True,
                                 configuration_manager=types.SimpleNamespace(pool_op_kernel_sizes=arch["strides"]))
    return nnUNetTrainer._get_deep_supervision_scales(fake)


@pytest.mark.parametrize("case", list(CASES))
def test_deep_supervision_outputs_match_nnunet_scales(case):
    arch, shape = CASES[case]
    net = build(arch, shape[1], 3, ds=True)
    x = torch.randn(shape)
    outs = net(x)
    scales = ds_scales(arch)
    assert isinstance(outs, list) and len(outs) == len(scales)
    for out, scale in zip(outs, scales):
        expected = tuple(int(round(s * f)) for s, f in zip(shape[2:], scale))
        assert out.shape == (shape[0], 3) + expected
    net.decoder.deep_supervision = False
    single = net(x)
    assert torch.is_tensor(single) and single.shape == (shape[0], 3) + tuple(shape[2:])
    torch.testing.assert_close(single, outs[0])


def test_state_dict_keys_do_not_depend_on_deep_supervision():
    arch, _ = CASES["3d_aniso"]
    torch.manual_seed(0)
    on = build(arch, 1, 2, ds=True)
    off = build(arch, 1, 2, ds=False)
    assert list(on.state_dict()) == list(off.state_dict())
    off.load_state_dict(on.state_dict(), strict=True)




@pytest.mark.parametrize("case", ["2d_nonsquare", "3d_aniso"])
def test_network_is_fully_ka(case):
    arch, shape = CASES[case]
    net = build(arch, shape[1], 2, ds=True)
    assert count_ka_layers_fully_ka(net) > 10
    assert any(isinstance(m, nn.LayerNorm) for m in net.modules())  # the tokenised blocks are there


def test_token_stages_and_skip_mode_change_the_network():
    arch, shape = CASES["2d_nonsquare"]
    x = torch.randn(shape)
    base = build(arch, 1, 2, ds=False)
    none = build(arch, 1, 2, ds=False, token_stages=0)
    add = build(arch, 1, 2, ds=False, skip_mode="add")
    assert not any(isinstance(m, nn.LayerNorm) for m in none.modules())
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(add) < n(base)  # concatenation doubles the decoder's input channels
    for net in (none, add):
        assert net(x).shape == (2, 2, 48, 80)


def test_every_parameter_gets_a_gradient_with_deep_supervision():
    """DDP-safe: no parameter unused in forward (with deep supervision on, as nnU-Net trains)."""
    arch, shape = CASES["2d_aniso_strides"]
    net = build(arch, shape[1], 2, ds=True)
    loss = sum(o.square().mean() for o in net(torch.randn(shape)))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("wrap", ["plain", "compiled", "ddp_like"])
def test_nnunet_set_deep_supervision_enabled_works(wrap):
    """nnU-Net's own set_deep_supervision_enabled switches this network, also through wrappers."""
    arch, shape = CASES["2d_aniso_strides"]
    net = build(arch, shape[1], 2, ds=True)
    wrapped = torch.compile(net) if wrap == "compiled" else net
    if wrap == "ddp_like":
        wrapped = types.SimpleNamespace(module=net)
    fake = types.SimpleNamespace(is_ddp=wrap == "ddp_like", network=wrapped)
    nnUNetTrainer.set_deep_supervision_enabled(fake, False)
    assert net.decoder.deep_supervision is False
    assert torch.is_tensor(net(torch.randn(shape)))
    nnUNetTrainer.set_deep_supervision_enabled(fake, True)
    assert isinstance(net(torch.randn(shape)), list)


@pytest.mark.parametrize("bad,match", [
    (dict(spline_grad="approx"), "spline_grad"),
    (dict(share="voxel"), "share"),
    (dict(grid_range=(3.0, -3.0)), "grid_range"),
    (dict(grid_size=0), "grid_size"),
    (dict(token_stages=9), "token_stages"),
    (dict(skip_mode="mul"), "skip_mode"),
])
def test_invalid_ka_arguments_fail_at_build_time(bad, match):
    arch, _ = CASES["2d_nonsquare"]
    with pytest.raises(ValueError, match=match):
        build(arch, 1, 2, ds=True, **bad)


def test_plans_lists_of_wrong_length_are_reported():
    arch = dict(CASES["2d_nonsquare"][0], n_conv_per_stage=[2, 2])
    with pytest.raises(ValueError, match="n_conv_per_stage"):
        build(arch, 1, 2, ds=True)


def test_residual_encoder_plans_are_accepted():
    arch = dict(CASES["2d_nonsquare"][0])
    arch["n_blocks_per_stage"] = arch.pop("n_conv_per_stage")
    arch["block"] = "dynamic_network_architectures.building_blocks.residual.BasicBlockD"
    net = get_network_from_plans("nnunetv2_allukan.architectures.AllUKAN",
                                 allukan_arch_kwargs(arch, {}), REQ_IMPORT, 1, 2, deep_supervision=False)
    assert net(torch.randn(1, 1, 48, 80)).shape == (1, 2, 48, 80)


def test_trainer_builder_is_callable_on_the_class():
    """nnU-Net's predictor calls build_network_architecture on the class, with the 2.8 signature."""
    arch, shape = CASES["2d_nonsquare"]
    cm = types.SimpleNamespace(network_arch_class_name=PLAIN_CONV_UNET, network_arch_init_kwargs=arch,
                               network_arch_init_kwargs_req_import=REQ_IMPORT)
    net = nnUNetTrainerAllUKAN.build_network_architecture(None, cm, 1, 4, False)
    assert isinstance(net, AllUKAN) and net(torch.randn(shape)).shape == (2, 4, 48, 80)


def test_cosine_schedule_is_a_function_of_the_epoch_with_per_group_lrs():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.Adam([{"params": [params[0]], "lr": 1e-4}, {"params": [params[1]], "lr": 1e-2}])
    sched = EpochCosineLRScheduler(opt, max_epochs=100)
    sched.step(50)
    mid = [g["lr"] for g in opt.param_groups]
    np.testing.assert_allclose(mid, [1e-4 * (0.01 + 0.99 * 0.5), 1e-2 * (0.01 + 0.99 * 0.5)])
    sched.step(0)
    np.testing.assert_allclose([g["lr"] for g in opt.param_groups], [1e-4, 1e-2])
    fresh = EpochCosineLRScheduler(torch.optim.Adam([{"params": [params[0]], "lr": 1e-4}]), max_epochs=100)
    fresh.step(50)  # a resumed run that never saw epochs 0..49 gets the same lr
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(mid[0])


def test_spline_parameters_are_split_out():
    net = build(CASES["2d_aniso_strides"][0], 2, 2, ds=True)
    spline, other = split_spline_parameters(net)
    assert spline and other
    assert all(p.numel() in (1, 8) for p in spline)  # base weight (1) and coefficients (G + 3 = 8)
    assert len(spline) + len(other) == len(list(net.parameters()))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_allukan_matches_eager(backend):
    """nnU-Net compiles by default on CUDA: the whole network, KA Functions included, compiles without breaks.

    ``aot_eager`` checks dynamo + AOT autograd tracing; ``inductor`` (torch.compile's default) also generates
    and runs C++ kernels, which takes a few minutes on 2 cores even for this tiny network.
    """
    torch._dynamo.reset()
    arch = plans_arch(2, 3, [[1, 1], [2, 2], [2, 2]], features=[4, 8, 8])
    net = build(arch, 1, 2, ds=True, spline_grad="exact", share="channel")
    x = torch.randn(2, 1, 16, 24)
    eager = net(x)
    eager_grads = torch.autograd.grad(sum(o.square().mean() for o in eager), list(net.parameters()))
    compiled = torch.compile(net, backend=backend, fullgraph=True)(x)
    grads = torch.autograd.grad(sum(o.square().mean() for o in compiled), list(net.parameters()))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, atol=1e-4, rtol=1e-3)


def test_trainer_compiles_on_cuda_only_when_asked(monkeypatch):
    """No GPU here: check the decision and its log line on a bare trainer object."""
    trainer = object.__new__(nnUNetTrainerAllUKAN)
    logged = []
    trainer.print_to_log_file = lambda *msg, **kw: logged.append(" ".join(map(str, msg)))
    trainer.device = torch.device("cuda", 0)
    monkeypatch.delenv("nnUNet_compile", raising=False)
    assert trainer._do_i_compile() is False and trainer._do_i_compile() is False
    assert len(logged) == 1 and "nnUNet_compile=1" in logged[0]
    monkeypatch.setenv("nnUNet_compile", "1")
    assert trainer._do_i_compile() is True  # nnU-Net's own rule once the user asks
    trainer.device = torch.device("cpu")
    assert trainer._do_i_compile() is False  # nnU-Net never compiles on the CPU


@pytest.mark.parametrize("network", ["AllUKAN", "AllUKANResEnc", "comparators.UKAN", "comparators.StackedKAN"])
def test_one_stage_plans_are_refused_with_a_clear_message(network):
    """nnU-Net plans a single stage for patches too small to down-sample; no U-Net can be built from that."""
    arch = plans_arch(2, 1, [[1, 1]])
    ka = dict(nnUNetTrainerAllUKAN.ka_kwargs)
    if network == "AllUKANResEnc":
        arch["n_blocks_per_stage"] = arch.pop("n_conv_per_stage")
    if network.startswith("comparators."):  # per-edge KAN layers: no share / spline_grad
        ka = {k: ka[k] for k in ("grid_size", "grid_range", "token_stages", "skip_mode")}
    kwargs = {**arch, **ka}
    with pytest.raises(ValueError, match=r"n_stages must be ≥ 2 .*got n_stages=1"):
        get_network_from_plans(f"nnunetv2_allukan.architectures.{network}", kwargs, REQ_IMPORT, 1, 3,
                               allow_init=True, deep_supervision=False)
