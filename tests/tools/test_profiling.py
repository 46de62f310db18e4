"""``nnunetv2-allukan profile`` on a tiny synthetic configuration, checked against independent counts."""
import csv
import json
import types

import pytest
import torch

from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_allukan import SharedSplineActivation
from nnunetv2_allukan.tools.profiling import command, configs, measure, sweep, variants
from nnunetv2_allukan.memory import saved_tensor_bytes
from nnunetv2_allukan.trainers.comparators import nnUNetTrainerStackedKAN
from nnunetv2_allukan.trainers.nnUNetTrainerAllUKAN import nnUNetTrainerAllUKAN

PATCH, BATCH = [16, 24], 2
WIDTHS = ["--base-features", "4", "--max-features", "8"]
ROWS = ["cnn", "free", "stacked"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks (conftest)


@pytest.fixture(scope="module")
def tiny_config():
    return configs.synthetic_plans(2, PATCH, BATCH, base_features=4, max_features=8)


@pytest.fixture(scope="module")
def profiled(tiny_config, tmp_path_factory):
    """One CLI run with a memory budget StackedKAN exceeds at batch 2 but not at batch 1 (computed here)."""
    counted = {}
    count = measure.count_on_fake_tensors

    def count_once(variant, cfg, patch, batch, ka_kwargs=None):
        # fake-tensor counts cost seconds: let the profiler reuse the one this fixture needs for the budget
        key = (variant.key, tuple(patch), batch)
        if key not in counted:
            counted[key] = count(variant, cfg, patch, batch, ka_kwargs)
        return counted[key]

    # The profiler needs 1.3 x saved + 16 x params bytes; saved bytes halve with the batch, so this budget lies
    # a quarter of the saved bytes away from both needs.
    params, _, saved = count_once(variants.VARIANT_BY_KEY["stacked"], tiny_config, PATCH, BATCH)
    budget_gb = (1.3 * saved + 16 * params - 1.3 * saved / 4) / 2 ** 30
    out = tmp_path_factory.mktemp("profile")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure, "count_on_fake_tensors", count_once)
        rc = command.main(["--dim", "2", "--patch", *map(str, PATCH), "--batch", str(BATCH), *WIDTHS,
                            "--rows", ",".join(ROWS), "--repeats", "1", "--device", "cpu",
                            "--max-memory-gb", f"{budget_gb:.9f}", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "profile.json").read_text())


def rows_by_key(rows):
    return {r["key"]: r for r in rows}


def cm_for(result):
    return types.SimpleNamespace(network_arch_class_name=configs.PLAIN_CONV_UNET,
                                 network_arch_init_kwargs=result["arch_kwargs"],
                                 network_arch_init_kwargs_req_import=list(configs.REQ_IMPORT))


def test_synthetic_topology_is_nnunets(tiny_config):
    _, strides, kernels, patch, _ = get_pool_and_conv_props([1.0, 1.0], PATCH, 4, 999999)
    assert [tuple(s) for s in tiny_config.arch_kwargs["strides"]] == [tuple(s) for s in strides]
    assert [tuple(k) for k in tiny_config.arch_kwargs["kernel_sizes"]] == [tuple(k) for k in kernels]
    assert list(tiny_config.patch) == list(patch) == PATCH
    assert tiny_config.arch_kwargs["features_per_stage"] == [4, 8, 8][:len(strides)]


def test_all_output_files_are_written(profiled):
    out, result = profiled
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "profile.md").read_text()
    assert "| network |" in markdown and "StackedKAN" in markdown and "## All networks at 16x24 b1" in markdown
    with open(out / "profile.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(result["rows"]) + sum(len(t) for t in result["fallback"])
    assert [r["key"] for r in result["rows"]] == ROWS


def test_parameters_match_the_networks_nnunet_trainers_build(profiled):
    """Independent build path: the trainers' own build_network_architecture on the same plans block."""
    _, result = profiled
    rows = rows_by_key(result["rows"])
    cm = cm_for(result)
    builders = {"cnn": nnUNetTrainer, "free": nnUNetTrainerAllUKAN, "stacked": nnUNetTrainerStackedKAN}
    for key, trainer in builders.items():
        net = trainer.build_network_architecture(None, cm, 1, 3, True)
        assert rows[key]["params"] == sum(p.numel() for p in net.parameters()), key


def test_saved_bytes_agree_with_an_independent_forward(profiled):
    """The profiler counts forward + loss; a bare forward of the trainer-built network bounds it from below, and
    the loss can add at most a few copies of the logits."""
    _, result = profiled
    net = nnUNetTrainerAllUKAN.build_network_architecture(None, cm_for(result), 1, 3, True)
    x = torch.randn(BATCH, 1, *PATCH)
    forward_only, outputs = saved_tensor_bytes(lambda: net(x), exclude=net.parameters())
    logits = sum(o.numel() * 4 for o in outputs)
    reported = rows_by_key(result["rows"])["free"]["saved_bytes"]
    assert forward_only <= reported <= forward_only + 3 * logits


def test_allukan_saves_far_less_than_stacked_kan(profiled):
    _, result = profiled
    at_b1 = rows_by_key(result["fallback"][0])
    assert at_b1["free"]["saved_bytes_vs_stacked"] < 1 / 20
    assert at_b1["free"]["saved_bytes"] / at_b1["stacked"]["saved_bytes"] == \
        pytest.approx(at_b1["free"]["saved_bytes_vs_stacked"])


def test_a_network_that_does_not_fit_is_reported_and_measured_smaller(profiled):
    _, result = profiled
    stacked = rows_by_key(result["rows"])["stacked"]
    assert stacked["status"] == "did not fit" and stacked["saved_is_estimate"]
    assert stacked["stopped"][0][0] == "16x24 b2" and "16x24 b1" in stacked["note"]
    assert stacked["eager_s"] is None
    fallback = result["fallback"]
    assert len(fallback) == 1 and [r["key"] for r in fallback[0]] == ROWS
    assert all(r["status"] == "ok" and r["batch"] == 1 and r["eager_s"] > 0 for r in fallback[0])
    # Two independent counts: fake tensors at batch 2 (by tensor identity) and real storages at batch 1.
    measured_b1 = rows_by_key(fallback[0])["stacked"]["saved_bytes"]
    assert stacked["saved_bytes"] == pytest.approx(2 * measured_b1, rel=0.05)


def test_fake_tensor_count_matches_the_real_storage_count(tiny_config):
    variant = variants.VARIANT_BY_KEY["exact"]
    params, flops, estimate = measure.count_on_fake_tensors(variant, tiny_config, PATCH, 1)
    options = measure.Options(time_steps=False, log=lambda s: None)
    measured = measure.measure_at(variant, tiny_config, PATCH, 1, options, guard=False)
    assert measured.params == params and measured.flops == flops > 0
    assert estimate == pytest.approx(measured.saved_bytes, rel=0.02)
    # Grad-Free and exact gradients both keep only the layer input: the same memory.
    free = measure.measure_at(variants.VARIANT_BY_KEY["free"], tiny_config, PATCH, 1, options, guard=False)
    assert free.saved_bytes == pytest.approx(measured.saved_bytes, rel=0.01)
    # The dense basis keeps nb = 8 values (and more) for every spline input.
    dense = measure.measure_at(variants.VARIANT_BY_KEY["dense"], tiny_config, PATCH, 1, options, guard=False)
    assert dense.saved_bytes > 8 * free.saved_bytes
    # Unfused, phi(x) is kept for each conv's weight gradient as well: more memory, the same FLOPs.
    unfused = measure.measure_at(variants.VARIANT_BY_KEY["free-unfused"], tiny_config, PATCH, 1, options,
                                  guard=False)
    assert unfused.saved_bytes > 1.2 * free.saved_bytes
    assert unfused.flops == free.flops


def test_nothing_fits_is_a_table_entry_not_a_crash(tiny_config):
    options = measure.Options(time_steps=False, max_memory_bytes=1.0, log=lambda s: None)
    at_request, where_fit = sweep.profile_variant(variants.VARIANT_BY_KEY["cnn"], tiny_config, options)
    assert at_request is where_fit and at_request.status == "did not fit"
    # total stride 4x4, bottleneck edge >= 2: 16x24 b2 -> b1 -> 8x12 b1, and 12 cannot be halved again.
    assert [size for size, _ in at_request.stopped] == ["16x24 b2", "16x24 b1", "8x12 b1"]
    assert "did not fit down to 8x12 b1" in at_request.note
    assert at_request.saved_bytes > 0 and at_request.saved_is_estimate


def test_smaller_sizes_halve_batch_then_every_divisible_axis():
    cfg = types.SimpleNamespace(cumulative_stride=lambda: [2, 4, 4])
    sizes = list(sweep.smaller_sizes(cfg, [8, 16, 16], 4))
    assert sizes == [([8, 16, 16], 2), ([8, 16, 16], 1), ([4, 8, 8], 1)]


def test_dense_basis_row_computes_the_exact_mode_function_and_gradients():
    torch.manual_seed(0)
    exact = SharedSplineActivation(num_channels=3, share="channel", spline_grad="exact")
    dense = SharedSplineActivation(num_channels=3, share="channel", spline_grad="exact")
    dense.load_state_dict(exact.state_dict())
    holder = torch.nn.Sequential(dense)
    assert variants.use_dense_basis(holder) == 1
    x = (torch.randn(2, 3, 5, 4) * 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = exact(x), dense(x2)
    torch.testing.assert_close(y2, y)
    (y * y).sum().backward()
    (y2 * y2).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(dense.coef.grad, exact.coef.grad)


def test_missing_plans_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert command.main(["-d", "1", "-c", "2d"]) == 2
    assert "nnUNet_preprocessed" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert command.main(["-d", "7", "-c", "2d"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'7' was not found" in err
    (tmp_path / "Dataset007_X").mkdir()
    assert command.main(["-d", "7", "-c", "2d"]) == 2
    assert "nnUNetPlans.json not found" in capsys.readouterr().err
    assert command.main(["--dim", "2"]) == 2


def test_profiles_a_datasets_plans(tmp_path, monkeypatch, tiny_config):
    folder = tmp_path / "Dataset007_X"
    folder.mkdir()
    plans = {"dataset_name": "Dataset007_X", "plans_name": "nnUNetPlans", "label_manager": "LabelManager",
             "configurations": {"2d": {"patch_size": PATCH, "batch_size": 3, "architecture": {
                 "network_class_name": configs.PLAIN_CONV_UNET, "arch_kwargs": tiny_config.arch_kwargs,
                 "_kw_requires_import": list(configs.REQ_IMPORT)}}}}
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "a", "1": "b"},
                                                     "labels": {"background": 0, "x": 1, "y": 2, "z": 3}}))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert command.main(["-d", "7", "-c", "2d", "--rows", "cnn", "--no-time", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "profile.json").read_text())
    assert (result["input_channels"], result["num_classes"], result["batch"]) == (2, 4, 3)
    assert all(r["status"] == "ok" and r["saved_bytes"] > 0 and r["eager_s"] is None for r in result["rows"])
