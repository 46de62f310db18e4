"""demo, crossval and plot-activations as a user runs them (real nnU-Net underneath, tiny budgets)."""
import csv
import json
import os

import pytest
import torch

from conftest import D2, SMOKE, run

pytestmark = pytest.mark.e2e


def test_plot_activations_from_a_real_checkpoint(trained_2d, nnunet, tmp_path):
    out = tmp_path / "act.png"
    proc = run(["nnunetv2-allukan", "plot-activations", str(trained_2d), "-o", str(out)], nnunet["env"])
    assert out.is_file() and out.stat().st_size > 10_000
    # one panel per KA layer: count the activations in the checkpoint independently
    ckpt = torch.load(trained_2d / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    n_layers = sum(k.endswith("activation.coef") for k in ckpt["network_weights"])
    assert f"({n_layers} KA layers)" in proc.stdout
    bad = run(["nnunetv2-allukan", "plot-activations", str(tmp_path / "nope")], nnunet["env"], expect_ok=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_crossval_trains_missing_folds_and_reports(trained_2d, nnunet, tmp_path):
    env = nnunet["env"]
    out = tmp_path / "cv"
    dry = run(["nnunetv2-allukan", "crossval", "-d", D2, "-c", "2d", "-tr", SMOKE, "-f", "0", "1", "--dry-run",
               "-device", "cpu"], env)
    planned = [l for l in dry.stdout.splitlines() if "nnUNetv2_train" in l]
    assert len(planned) == 1 and f"{D2} 2d 1 -tr {SMOKE}" in planned[0]  # fold 0 is already finished
    run(["nnunetv2-allukan", "crossval", "-d", D2, "-c", "2d", "-tr", SMOKE, "-f", "0", "1", "-device", "cpu",
         "--out", str(out)], env)
    for name in ("crossval.md", "crossval.json", "crossval_folds.csv", "crossval_boxplot.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "crossval_folds.csv")))
    assert [r["fold"] for r in rows] == ["0", "1"]
    for r in rows:  # compare with nnU-Net's own per-fold summary
        summary = json.load(open(trained_2d.parent / f"fold_{r['fold']}" / "validation" / "summary.json"))
        assert float(r["foreground_mean"]) == pytest.approx(summary["foreground_mean"]["Dice"])
    data = json.load(open(out / "crossval.json"))
    s = data["summary"][SMOKE]
    assert s["n_folds"] == 2 and s["params"] > 1000 and s["seconds_per_epoch"] > 0
    # collect-only with a fold that does not exist: listed as missing, not dropped
    proc = run(["nnunetv2-allukan", "crossval", "-d", D2, "-c", "2d", "-tr", SMOKE, "-f", "0", "1", "2",
                "--collect-only", "--out", str(tmp_path / "cv2")], env)
    assert "missing [2]" in proc.stdout


def test_demo_end_to_end_with_a_tiny_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")
    work = tmp_path / "demo"
    # a different dataset already holds the requested id: the demo must refuse and leave it alone
    other = work / "nnUNet_raw" / "Dataset501_Other"
    other.mkdir(parents=True)
    (other / "keep.txt").write_text("mine")
    bad = run(["nnunetv2-allukan", "demo", "--workdir", str(work), "--epochs", "1"], env, expect_ok=False)
    assert bad.returncode == 2 and "Dataset501_Other" in bad.stderr and (other / "keep.txt").read_text() == "mine"
    run(["nnunetv2-allukan", "demo", "--workdir", str(work), "--dataset-id", "502", "--epochs", "1",
         "--iterations", "2", "--val-iterations", "1", "--downsample", "4", "--folds", "0", "3"], env)
    report = work / "report"
    for name in ("summary.json", "report.md", "examples.png", "activations.png", "progress.png",
                 "crossval/crossval.md", "crossval/crossval_folds.csv", "crossval/crossval_boxplot.png"):
        assert (report / name).is_file(), name
    summary = json.load(open(report / "summary.json"))
    dice = summary["dice"]["nnUNetTrainerAllUKAN"]
    assert set(dice) == {"heldout_slab", "cross_template"}
    for test_set in dice.values():
        assert set(test_set["per_class"]) == {"1", "2"}
        assert 0.0 <= test_set["foreground_mean"] <= 1.0
    # held-out = mean over the two folds of nnU-Net's own validation summaries
    results = work / "nnUNet_results" / "Dataset502_ICBM152Tissue2D" / "nnUNetTrainerAllUKAN__nnUNetPlans__2d"
    per_fold = [json.load(open(results / f"fold_{f}" / "validation" / "summary.json"))["foreground_mean"]["Dice"]
                for f in (0, 3)]
    assert dice["heldout_slab"]["foreground_mean"] == pytest.approx(sum(per_fold) / 2)
    # cross-template: nnU-Net's ensemble of both folds, evaluated by nnU-Net
    ensemble = work / "predictions" / "nnUNetTrainerAllUKAN" / "cross_template" / "fold_0_3"
    assert dice["cross_template"]["foreground_mean"] == pytest.approx(
        json.load(open(ensemble / "summary.json"))["foreground_mean"]["Dice"])
    assert summary["downsample"] == 4 and summary["spacing_mm"] == [4.0, 4.0]
    # a rerun with another budget must not reuse (and relabel) the models trained with this one
    again = run(["nnunetv2-allukan", "demo", "--workdir", str(work), "--dataset-id", "502", "--epochs", "2",
                 "--iterations", "2", "--val-iterations", "1", "--downsample", "4", "--folds", "0", "3"], env,
                expect_ok=False)
    assert again.returncode == 2 and "epochs 1 -> 2" in again.stderr and "Traceback" not in again.stderr
    assert json.load(open(report / "summary.json")) == summary
