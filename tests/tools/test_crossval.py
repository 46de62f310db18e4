"""crossval: region-based summaries are reported, and a failed training run gives a non-zero exit code."""
import json
import os

import pytest
import torch

from nnunetv2_allukan.tools import crossval

from conftest import run

# nnU-Net's summary.json keys for a region-based dataset (regions_class_order): str() of the region tuple.
REGION_DICE = {"(1, 2)": 0.9, "(2,)": 0.5}


def _record(dice: dict) -> dict:
    return {"dice": dict(dice), "foreground_mean": sum(dice.values()) / len(dice), "params": 1000,
            "seconds_per_epoch": 2.0, "epochs": 1}


def test_labels_and_regions_are_ordered_labels_first():
    keys = ["(1, 2)", "10", "2", "(2,)", "(1, 2, 3)", "1"]
    assert sorted(keys, key=crossval.label_order) == ["1", "2", "10", "(1, 2)", "(1, 2, 3)", "(2,)"]


def test_region_based_folds_are_summarised_and_written(tmp_path):
    collected = {"A": {"folds": {0: _record(REGION_DICE), 1: _record({"(1, 2)": 0.7, "(2,)": 0.3})},
                       "missing_folds": [2]},
                 "B": {"folds": {0: _record({"(1, 2)": 0.8, "(2,)": 0.6})}, "missing_folds": [1, 2]}}
    summary = crossval.summarise(collected, "A")
    assert summary["A"]["dice"]["(1, 2)"]["mean"] == pytest.approx(0.8)
    assert summary["A"]["dice"]["(2,)"]["mean"] == pytest.approx(0.4)
    table = crossval.markdown(summary, collected)
    assert "Dice (1, 2) | Dice (2,)" in table and "0.800 ± 0.141" in table
    crossval.write_outputs(str(tmp_path), summary, collected)
    header = (tmp_path / "crossval_folds.csv").read_text().splitlines()[0]
    assert header.startswith("trainer,fold,\"dice_(1, 2)\",\"dice_(2,)\",foreground_mean")


def _finished_fold(folder, dice: dict):
    os.makedirs(folder / "validation")
    (folder / "validation" / "summary.json").write_text(json.dumps(
        {"mean": {k: {"Dice": v} for k, v in dice.items()},
         "foreground_mean": {"Dice": sum(dice.values()) / len(dice)}}))
    torch.save({"network_weights": {"w": torch.zeros(3, 4)},
                "logging": {"epoch_start_timestamps": [0.0], "epoch_end_timestamps": [2.0]}},
               folder / "checkpoint_final.pth")


@pytest.mark.e2e
def test_a_failed_fold_reports_what_finished_then_exits_non_zero(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[key] = str(tmp_path / key)
        os.makedirs(env[key])
    trainer_folder = tmp_path / "nnUNet_results" / "Dataset987_Regions" / "nnUNetTrainerDone__nnUNetPlans__2d"
    _finished_fold(trainer_folder / "fold_0", REGION_DICE)
    # fold 1 must be trained, and nnUNetv2_train fails (no plans were ever made for this dataset)
    proc = run(["nnunetv2-allukan", "crossval", "-d", "987", "-c", "2d", "-tr", "nnUNetTrainerDone", "-f", "0", "1",
                "-device", "cpu", "--out", str(tmp_path / "cv")], env, expect_ok=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Dice (1, 2)" in proc.stdout and "0.900" in proc.stdout  # the finished fold is reported
    assert "missing [1]" in proc.stdout
    assert "1 training run(s) failed" in proc.stderr and "nnUNetv2_train 987 2d 1" in proc.stderr
    data = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert data["summary"]["nnUNetTrainerDone"]["dice"]["(1, 2)"]["mean"] == pytest.approx(0.9)


def test_parameter_count_counts_each_shared_tensor_once(tmp_path):
    """nnU-Net's PlainConvUNet names its encoder twice in its state dict (``decoder.encoder``) and every conv again
    under ``all_modules``: the count from a saved checkpoint must equal ``network.parameters()`` (which torch
    deduplicates), not the sum over the state dict's entries."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunetv2_allukan.tools.crossval import parameter_count

    net = PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv2d, 3, (1, 2, 2), 2, 3, 2, conv_bias=True,
                        norm_op=torch.nn.InstanceNorm2d, nonlin=torch.nn.LeakyReLU)
    path = tmp_path / "checkpoint.pth"
    torch.save({"network_weights": net.state_dict()}, path)
    weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    expected = sum(p.numel() for p in net.parameters())
    assert sum(v.numel() for v in weights.values() if v.is_floating_point()) > expected  # the naive sum overcounts
    assert parameter_count(weights) == expected
