"""AllUKANResEnc: the residual KA encoder built from REAL nnU-Net ResEnc M plans (2D and 3D).

The plans come from nnU-Net's own planner (``nnUNetv2_plan_experiment -pl nnUNetPlannerResEncM``) on the session's
tiny generated datasets. The references are independent of this package: nnU-Net's ``ResidualEncoderUNet`` built
from the same plans (block counts, strides, features, where the projections are, output shapes), nnU-Net's
``_get_deep_supervision_scales``, and each residual block recomputed with torch.nn.functional.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_allukan import KAModule
from nnunetv2_allukan.architectures import AllUKAN, AllUKANResEnc, TokenKABlock, UKAN
from nnunetv2_allukan.architectures.resenc import KAResidualBlock
from nnunetv2_allukan.tools.add_plans import add_allukan_configuration
from nnunetv2_allukan.trainers import nnUNetTrainerAllUKAN, nnUNetTrainerUKAN
from nnunetv2_allukan.architectures.from_plans import ALLUKAN_RESENC_CLASS_NAME

from conftest import D2, D3, SMOKE, count_ka_layers_fully_ka, ext_path, run

RESENC_PLANS = "nnUNetResEncUNetMPlans"
CASES = {"2d": ("Dataset990_KATest2D", "2d"), "3d": ("Dataset991_KATest3D", "3d_fullres")}


@pytest.fixture(scope="module")
def resenc_plans(nnunet):
    """README: nnUNetv2_plan_experiment -d DATASET -pl nnUNetPlannerResEncM  (-> -p nnUNetResEncUNetMPlans)."""
    # Planning needs nnUNet_n_proc_DA >= 1 (the session's env says 0, for training).
    run(["nnUNetv2_plan_experiment", "-d", D2, D3, "-pl", "nnUNetPlannerResEncM"],
        {**nnunet["env"], "nnUNet_n_proc_DA": "1"})
    return Path(nnunet["env"]["nnUNet_preprocessed"])


def load_configuration(preprocessed: Path, case: str, plans: str = RESENC_PLANS):
    dataset, configuration = CASES[case]
    plans_manager = PlansManager(json.loads((preprocessed / dataset / f"{plans}.json").read_text()))
    dataset_json = json.loads((preprocessed / dataset / "dataset.json").read_text())
    cm = plans_manager.get_configuration(configuration)
    in_channels = determine_num_input_channels(plans_manager, cm, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return types.SimpleNamespace(plans_manager=plans_manager, cm=cm, in_channels=in_channels, n_out=n_out,
                                 input_shape=(2, in_channels, *cm.patch_size))


def build(cfg, trainer=nnUNetTrainerAllUKAN, deep_supervision=True):
    """What nnU-Net's trainer and predictor call."""
    return trainer.build_network_architecture(cfg.plans_manager, cfg.cm, cfg.in_channels, cfg.n_out,
                                              deep_supervision)


def build_nnunet_resenc(cfg, deep_supervision=True):
    """nnU-Net's own ResidualEncoderUNet from the same plans: the reference topology."""
    return get_network_from_plans(cfg.cm.network_arch_class_name, cfg.cm.network_arch_init_kwargs,
                                  cfg.cm.network_arch_init_kwargs_req_import, cfg.in_channels, cfg.n_out,
                                  allow_init=True, deep_supervision=deep_supervision)


def residual_blocks(stage: nn.Module) -> list:
    return [m for m in stage if isinstance(m, KAResidualBlock)]


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_builds_the_residual_ka_encoder_from_resenc_plans(resenc_plans, case):
    cfg = load_configuration(resenc_plans, case)
    assert cfg.cm.network_arch_class_name.endswith("ResidualEncoderUNet")  # nnU-Net's planner wrote these plans
    assert type(build(cfg)) is AllUKANResEnc
    assert "AllUKANResEnc" in nnUNetTrainerAllUKAN.network_choice(cfg.cm).reason
    # The default plans of the same dataset still give the plain AllUKAN.
    assert type(build(load_configuration(resenc_plans, case, "nnUNetPlans"))) is AllUKAN


def test_a_network_without_a_residual_encoder_gets_plain_blocks(resenc_plans):
    """network_class_name stays overridable: UKAN has no residual counterpart, so its stages are plain."""
    cfg = load_configuration(resenc_plans, "2d")
    net = build(cfg, nnUNetTrainerUKAN)
    assert type(net) is UKAN
    blocks = cfg.cm.network_arch_init_kwargs["n_blocks_per_stage"]
    assert [len(stage[0].convs) for stage in net.encoder.stages] == list(blocks)
    assert "plain" in nnUNetTrainerUKAN.network_choice(cfg.cm).reason


def test_add_plans_on_resenc_plans_names_the_residual_ka_encoder(resenc_plans):
    """``add-plans`` writes the network nnUNetTrainerAllUKAN builds from the same plans, so nnU-Net's stock trainer
    on the added configuration trains the residual KA encoder, not plain KA blocks."""
    cfg = load_configuration(resenc_plans, "2d")
    plans = json.loads(json.dumps(cfg.plans_manager.plans))
    ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "grid_range": list(nnUNetTrainerAllUKAN.ka_kwargs["grid_range"])}
    new_plans, reason = add_allukan_configuration(plans, "2d", "2d_allukan", ka_kwargs)
    assert "AllUKANResEnc" in reason
    added = PlansManager(new_plans).get_configuration("2d_allukan")
    assert added.network_arch_class_name == ALLUKAN_RESENC_CLASS_NAME
    stock = nnUNetTrainer.build_network_architecture(cfg.plans_manager, added, cfg.in_channels, cfg.n_out, True)
    ours = build(cfg)
    assert type(stock) is AllUKANResEnc
    assert {k: v.shape for k, v in stock.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def _conv_shapes(module: nn.Module) -> list:
    return [m.weight.shape for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]


@pytest.mark.parametrize("case", list(CASES))
def test_block_by_block_as_nnunet_resencunet(resenc_plans, case):
    """Block counts, strides, features, kernel shapes and projections equal nnU-Net's ResidualEncoderUNet."""
    cfg = load_configuration(resenc_plans, case)
    ours, ref = build(cfg), build_nnunet_resenc(cfg)
    arch = cfg.cm.network_arch_init_kwargs
    assert ours.encoder.stem[0].weight.shape == ref.encoder.stem.convs[0].conv.weight.shape
    assert len(ours.encoder.stages) == len(ref.encoder.stages) == arch["n_stages"]
    for s, (stage, ref_stage) in enumerate(zip(ours.encoder.stages, ref.encoder.stages)):
        blocks = residual_blocks(stage)
        assert len(blocks) == len(ref_stage.blocks) == arch["n_blocks_per_stage"][s]
        for b, (block, ref_block) in enumerate(zip(blocks, ref_stage.blocks)):
            where = f"stage {s} block {b}"
            assert block.conv1[0].out_channels == arch["features_per_stage"][s], where
            assert list(block.conv1[0].stride) == (list(arch["strides"][s]) if b == 0 else [1] * len(ref_block.stride))
            assert list(block.conv1[0].stride) == list(ref_block.stride), where
            assert block.conv1[0].weight.shape == ref_block.conv1.conv.weight.shape, where
            assert block.conv2[0].weight.shape == ref_block.conv2.conv.weight.shape, where
            assert (block.conv1[0].bias is None) == (ref_block.conv1.conv.bias is None), where
            # A projection (pooling and/or 1x1 KAonv) exactly where nnU-Net has one, with the same shapes.
            assert isinstance(block.skip, nn.Identity) == (not isinstance(ref_block.skip, nn.Sequential)), where
            if isinstance(ref_block.skip, nn.Sequential):
                assert [type(m).__name__ for m in ref_block.skip if isinstance(m, nn.modules.pooling._AvgPoolNd)] \
                    == [type(m).__name__ for m in block.skip if isinstance(m, nn.modules.pooling._AvgPoolNd)], where
                assert _conv_shapes(block.skip) == _conv_shapes(ref_block.skip), where
                assert all(m.bias is None for m in block.skip.modules() if isinstance(m, KAModule)), where
        # Every stage after the first doubles the features: its first block projects.
        assert any(not isinstance(block.skip, nn.Identity) for block in blocks) == (s > 0)
    # The decoder: the same up-sampling, stage and head convolutions (plus the tokenised blocks).
    for ups, ref_ups in zip(ours.decoder.upsamplers, ref.decoder.transpconvs):
        assert ups.weight.shape == ref_ups.weight.shape and ups.stride == ref_ups.stride
    for stage, ref_stage in zip(ours.decoder.stages, ref.decoder.stages):
        plain = [m for m in stage if not isinstance(m, TokenKABlock)]
        assert [_conv_shapes(m) for m in plain] == [_conv_shapes(m) for m in ref_stage.convs]
    assert [h.weight.shape for h in ours.decoder.seg_layers] == [h.weight.shape for h in ref.decoder.seg_layers]


@pytest.mark.parametrize("case", list(CASES))
def test_tokenised_blocks_stay_at_the_deepest_stages(resenc_plans, case):
    cfg = load_configuration(resenc_plans, case)
    net = build(cfg)
    n_stages, token_stages = len(net.encoder.stages), nnUNetTrainerAllUKAN.ka_kwargs["token_stages"]
    with_tokens = [isinstance(stage[-1], TokenKABlock) for stage in net.encoder.stages]
    assert with_tokens == [s >= n_stages - token_stages for s in range(n_stages)]
    # decoder stage i works at encoder resolution n_stages - 2 - i
    with_tokens = [isinstance(stage[-1], TokenKABlock) for stage in net.decoder.stages]
    assert with_tokens == [n_stages - 2 - i >= n_stages - token_stages for i in range(n_stages - 1)]


@pytest.mark.parametrize("case", list(CASES))
def test_deep_supervision_outputs_match_nnunet(resenc_plans, case):
    cfg = load_configuration(resenc_plans, case)
    net, ref = build(cfg), build_nnunet_resenc(cfg)
    stand_in = types.SimpleNamespace(enable_deep_supervision=True, configuration_manager=cfg.cm)
    scales = nnUNetTrainer._get_deep_supervision_scales(stand_in)
    x = torch.randn(cfg.input_shape)
    with torch.no_grad():
        outs, ref_outs = net(x), ref(x)
        assert len(outs) == len(scales) == len(ref_outs)
        for out, ref_out, scale in zip(outs, ref_outs, scales):
            expected = tuple(int(round(p * f)) for p, f in zip(cfg.cm.patch_size, scale))
            assert out.shape == ref_out.shape == (x.shape[0], cfg.n_out) + expected
        net.decoder.deep_supervision = False
        single = net(x)
    assert torch.is_tensor(single)
    torch.testing.assert_close(single, outs[0])


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_is_the_same_with_and_without_deep_supervision(resenc_plans, case):
    cfg = load_configuration(resenc_plans, case)
    on, off = build(cfg, deep_supervision=True), build(cfg, deep_supervision=False)
    assert list(on.state_dict()) == list(off.state_dict())
    off.load_state_dict(on.state_dict(), strict=True)  # what nnU-Net's predictor does




@pytest.mark.parametrize("case", list(CASES))
def test_fully_ka(resenc_plans, case):
    """No plain convolution or linear layer outside KA layers; only norms own other parameters."""
    net = build(load_configuration(resenc_plans, case))
    n_ka = count_ka_layers_fully_ka(net)
    n_residual = sum(isinstance(m, KAResidualBlock) for m in net.modules())
    assert n_ka > 2 * n_residual > 0


# --- the residual adds, recomputed independently ---

def _ka(layer, z):
    """A KA layer with torch.nn.functional: conv(phi(z)) with the layer's own weights."""
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[z.dim()]
    return conv(layer.activation(z), layer.weight, layer.bias, layer.stride, layer.padding)


def _norm(norm, z):
    return F.instance_norm(z, weight=norm.weight, bias=norm.bias, eps=norm.eps)


def _conv_path(block, x):
    return _norm(block.conv2[1], _ka(block.conv2[0], _norm(block.conv1[1], _ka(block.conv1[0], x))))


def _skip_path(block, x):
    """Identity, or [AvgPool(stride)] -> 1x1 KAonv -> norm (ResNet-D, as nnU-Net's BasicBlockD)."""
    stride = list(block.conv1[0].stride)
    if isinstance(block.skip, nn.Identity):
        return x
    pool = {4: F.avg_pool2d, 5: F.avg_pool3d}[x.dim()]
    y = pool(x, stride, stride) if any(s != 1 for s in stride) else x
    projection = [m for m in block.skip if not isinstance(m, nn.modules.pooling._AvgPoolNd)]
    if projection:
        y = _norm(projection[0][1], _ka(projection[0][0], y))
    return y


# The blocks probed: stage 0 block 0 (identity: the stem is as wide as stage 0), stage 1 block 0 (pooling and
# projection), stage 1 block 1 (identity).
PROBES = {(0, 0): "identity after the stem", (1, 0): "projection", (1, 1): "identity"}


def _block_inputs(net, x) -> dict:
    """The input each probed block sees in a forward pass of the whole network."""
    inputs, handles = {}, []
    for s, b in PROBES:
        def keep(module, args, key=(s, b)):
            inputs[key] = args[0].detach()
        handles.append(residual_blocks(net.encoder.stages[s])[b].register_forward_pre_hook(keep))
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()
    return inputs


@pytest.mark.parametrize("case", list(CASES))
def test_residual_blocks_add_their_skip_path(resenc_plans, case):
    """block(x) == conv path + skip path (identity or projection); fails if a skip is dropped or changed."""
    cfg = load_configuration(resenc_plans, case)
    net = build(cfg, deep_supervision=False)
    inputs = _block_inputs(net, torch.randn(cfg.input_shape))
    for (s, b), what in PROBES.items():
        block, x = residual_blocks(net.encoder.stages[s])[b], inputs[(s, b)]
        assert isinstance(block.skip, nn.Identity) == (what != "projection"), what
        with torch.no_grad():
            # nnU-Net's initialisation zeroes the last norm of a block: it starts as its skip path exactly.
            torch.testing.assert_close(block(x), _skip_path(block, x), msg=what)
            if what != "projection":
                torch.testing.assert_close(block(x), x, msg=what)
            for norm in (block.conv2[1], block.conv1[1]):
                norm.weight.normal_(1.0, 0.3)
                norm.bias.normal_(0.0, 0.3)
            out = block(x)
            conv_path = _conv_path(block, x)
            assert conv_path.abs().mean() > 0.1  # the conv path is live, so the comparison below means something
            torch.testing.assert_close(out, conv_path + _skip_path(block, x), rtol=1e-4, atol=1e-4, msg=what)


def test_extra_ka_keywords_reach_every_ka_layer(resenc_plans):
    """AllUKAN's KA keywords pass through unchanged (and are validated as AllUKAN validates them)."""
    cfg = load_configuration(resenc_plans, "2d")

    class ChannelSplines(nnUNetTrainerAllUKAN):
        ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "share": "channel", "spline_grad": "exact",
                     "activation": "fixed-leakyrelu"}

    net = build(cfg, ChannelSplines)
    assert type(net) is AllUKANResEnc
    activations = [m.activation for m in net.modules() if isinstance(m, KAModule)]
    assert activations and all(a.share == "channel" and a.spline_grad == "exact" and a.kind == "fixed-leakyrelu"
                               for a in activations)

    class BadGrad(nnUNetTrainerAllUKAN):
        ka_kwargs = {**nnUNetTrainerAllUKAN.ka_kwargs, "spline_grad": "approx"}

    with pytest.raises(ValueError, match="spline_grad"):
        build(cfg, BadGrad)


def test_bottleneck_blocks_and_bad_block_counts_are_refused(resenc_plans):
    cfg = load_configuration(resenc_plans, "2d")
    kwargs = dict(cfg.cm.network_arch_init_kwargs)
    req = cfg.cm.network_arch_init_kwargs_req_import
    name = "nnunetv2_allukan.architectures.AllUKANResEnc"
    bottleneck = {**kwargs, "block": "dynamic_network_architectures.building_blocks.residual.BottleneckD"}
    with pytest.raises(ValueError, match="BasicBlockD"):
        get_network_from_plans(name, bottleneck, req, 1, 3)
    short = {**kwargs, "n_blocks_per_stage": list(kwargs["n_blocks_per_stage"])[:-1]}
    with pytest.raises(ValueError, match="n_blocks_per_stage"):
        get_network_from_plans(name, short, req, 1, 3)
    basic = {**kwargs, "block": "dynamic_network_architectures.building_blocks.residual.BasicBlockD"}
    assert type(get_network_from_plans(name, basic, req, 1, 3)) is AllUKANResEnc


def test_profiler_reads_resenc_plans(resenc_plans, tmp_path, monkeypatch):
    """README: nnunetv2-allukan profile -d DATASET -c 2d -p nnUNetResEncUNetMPlans: the networks the trainers build."""
    from nnunetv2_allukan.tools.profiling import command

    monkeypatch.setenv("nnUNet_preprocessed", str(resenc_plans))
    assert command.main(["-d", D2, "-c", "2d", "-p", RESENC_PLANS, "--rows", "cnn,free", "--no-time",
                         "--batch", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = {r["key"]: r for r in json.loads((tmp_path / "profile.json").read_text())["rows"]}
    cfg = load_configuration(resenc_plans, "2d")
    n_params = lambda net: sum(p.numel() for p in net.parameters())
    assert rows["cnn"]["params"] == n_params(build_nnunet_resenc(cfg))  # nnU-Net's ResidualEncoderUNet
    assert rows["free"]["params"] == n_params(build(cfg))  # AllUKANResEnc
    assert all(r["status"] == "ok" and r["saved_bytes"] > 0 for r in rows.values())
    # The rows are named after what they build, not after the plain-plans networks.
    assert (rows["cnn"]["name"], rows["free"]["name"]) == ("ResidualEncoderUNet", "AllUKANResEnc free")
    assert "ResidualEncoderUNet" in (tmp_path / "profile.md").read_text()


@pytest.mark.e2e
def test_resenc_plans_train_predict_evaluate(nnunet, resenc_plans, tmp_path):
    """README: nnUNetv2_train DATASET 2d 0 -p nnUNetResEncUNetMPlans -tr nnUNetTrainerAllUKAN (here: smoke test)."""
    env = {**nnunet["env"], "nnUNet_extTrainer": ext_path(nnunet["env"])}
    run(["nnUNetv2_preprocess", "-d", D2, "-plans_name", RESENC_PLANS, "-c", "2d", "-np", "1"],
        {**env, "nnUNet_n_proc_DA": "1"})
    run(["nnUNetv2_train", D2, "2d", "0", "-p", RESENC_PLANS, "-tr", SMOKE, "-device", "cpu"], env)
    fold = nnunet["root"] / "results" / "Dataset990_KATest2D" / f"{SMOKE}__{RESENC_PLANS}__2d" / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = ckpt["network_weights"]
    assert any(k.startswith("encoder.stem.") for k in weights)
    assert any(".skip.1.0.weight" in k for k in weights)  # a 1x1 KAonv projection was trained and saved
    assert "AllUKANResEnc" in "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}

    raw = Path(env["nnUNet_raw"]) / "Dataset990_KATest2D"
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", D2, "-c", "2d", "-f", "0",
         "-p", RESENC_PLANS, "-tr", SMOKE, "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in (raw / "labelsTs").glob("*.png"))
    run(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(out), "-djfile", str(out / "dataset.json"),
         "-pfile", str(out / "plans.json"), "-np", "1"], env)
    assert 0.0 <= json.loads((out / "summary.json").read_text())["foreground_mean"]["Dice"] <= 1.0
