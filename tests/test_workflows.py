"""nnU-Net workflows a user will try with ALL U-KAN, through nnU-Net's own commands (README: "nnU-Net workflows").

Sharing a model (export -> install into a fresh results folder -> predict), fine-tuning from a checkpoint of a
dataset with another label count, region-based training with an ignore label, --val --npz and ensembling with
nnU-Net's CNN followed by postprocessing, and the 3d_lowres -> 3d_cascade_fullres cascade. Tiny generated datasets
and the smoke-test trainers; every dataset and training is made once per session and shared by the tests.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_allukan.data.synthetic import make_2d_regions_dataset, make_3d_dataset

from conftest import D2, SMOKE, ext_path, run

pytestmark = pytest.mark.e2e

TEST_TRAINERS = str(Path(__file__).parent / "ext_trainers")
CNN = "nnUNetTrainerCNN_smokeTest"  # nnU-Net's own CNN with the smoke budget (tests/ext_trainers)
D_REGIONS, D_CASCADE = "992", "993"
NO_WORKERS = ["-device", "cpu", "-npp", "0", "-nps", "0"]  # predict on 2 cores


@pytest.fixture(scope="session")
def env(nnunet):
    """nnU-Net's folders of the session, with our trainers and the test trainers discoverable."""
    return {**nnunet["env"], "nnUNet_extTrainer": os.pathsep.join([ext_path(nnunet["env"]), TEST_TRAINERS])}


def _png(path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path))


def _validation_inputs(env, fold_folder, target):
    """The images of a fold's validation cases, as an nnU-Net input folder."""
    raw = Path(env["nnUNet_raw"]) / "Dataset990_KATest2D" / "imagesTr"
    cases = sorted(p.stem for p in (fold_folder / "validation").glob("*.png"))
    target.mkdir()
    for case in cases:
        shutil.copy(raw / f"{case}_0000.png", target / f"{case}_0000.png")
    return cases


# --- sharing a trained model -------------------------------------------------------------------------------------

def test_shared_model_predicts_as_before_the_export(env, trained_2d, tmp_path):
    """export -> install into an empty results folder (another machine) -> predict, two ways: same segmentation
    as nnU-Net's own validation of the fold before the export."""
    archive = tmp_path / "allukan_model.zip"
    run(["nnUNetv2_export_model_to_zip", "-d", D2, "-o", str(archive), "-c", "2d", "-tr", SMOKE, "-f", "0"], env)
    receiving = {**env, "nnUNet_results": str(tmp_path / "fresh_results")}
    os.makedirs(receiving["nnUNet_results"])
    run(["nnUNetv2_install_pretrained_model_from_zip", str(archive)], receiving)
    model = Path(receiving["nnUNet_results"]) / "Dataset990_KATest2D" / f"{SMOKE}__nnUNetPlans__2d"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    cases = _validation_inputs(env, trained_2d, tmp_path / "in")
    run(["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "by_id"), "-d", D2, "-c", "2d",
         "-f", "0", "-tr", SMOKE, *NO_WORKERS], receiving)
    run(["nnUNetv2_predict_from_modelfolder", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "by_folder"),
         "-m", str(model), "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], receiving)  # needs >= 1 worker
    for case in cases:
        before = _png(trained_2d / "validation" / f"{case}.png")
        np.testing.assert_array_equal(_png(tmp_path / "by_id" / f"{case}.png"), before)
        np.testing.assert_array_equal(_png(tmp_path / "by_folder" / f"{case}.png"), before)


# --- fine-tuning on a region-based dataset with an ignore label ---------------------------------------------------

SOURCE_PLANS = "nnUNetPlans_from990"  # the 2D dataset's plans, moved to the fine-tuning dataset


@pytest.fixture(scope="session")
def regions_finetuned(env, trained_2d):
    """Dataset 992 (2 region outputs, ignore label) planned with the 2D dataset's plans (nnU-Net's pretraining
    route), trained from the 3-label checkpoint of the session's 2D model with -pretrained_weights."""
    make_2d_regions_dataset(env["nnUNet_raw"], int(D_REGIONS))
    plan_env = {**env, "nnUNet_n_proc_DA": "1"}
    run(["nnUNetv2_plan_and_preprocess", "-d", D_REGIONS, "-c", "2d", "-np", "1", "-npfp", "1", "--no_pp"], plan_env)
    run(["nnUNetv2_move_plans_between_datasets", "-s", D2, "-t", D_REGIONS, "-sp", "nnUNetPlans", "-tp",
         SOURCE_PLANS], env)
    run(["nnUNetv2_preprocess", "-d", D_REGIONS, "-plans_name", SOURCE_PLANS, "-c", "2d", "-np", "1"], plan_env)
    source = trained_2d / "checkpoint_final.pth"
    proc = run(["nnUNetv2_train", D_REGIONS, "2d", "0", "-p", SOURCE_PLANS, "-tr", SMOKE, "-device", "cpu",
                "-pretrained_weights", str(source)], env)
    fold = Path(env["nnUNet_results"]) / "Dataset992_KATestRegions2D" / f"{SMOKE}__{SOURCE_PLANS}__2d" / "fold_0"
    return {"fold": fold, "source": source, "stdout": proc.stdout}


def test_fine_tuning_loads_everything_but_the_heads(regions_finetuned):
    stdout = regions_finetuned["stdout"]
    listed = stdout.split("Below is the list of overlapping blocks", 1)[1].split("###################", 1)[0]
    loaded = {line.split(" shape ")[0] for line in listed.splitlines() if " shape " in line}
    source = torch.load(regions_finetuned["source"], map_location="cpu", weights_only=False)["network_weights"]
    target = torch.load(regions_finetuned["fold"] / "checkpoint_final.pth", map_location="cpu",
                        weights_only=False)["network_weights"]
    heads = {k for k in target if ".seg_layers." in k}
    assert heads and any(k.endswith("activation.coef") for k in heads)
    assert loaded == set(target) - heads  # every KA layer (weights and splines) but the heads' own
    head = sorted(k for k in heads if k.endswith(".weight"))[-1]
    assert source[head].shape[0] == 3 and target[head].shape[0] == 2  # 3 labels -> 2 region outputs


def test_region_based_training_with_ignore_label_predicts_and_evaluates(env, regions_finetuned, tmp_path):
    fold = regions_finetuned["fold"]
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"(1, 2)", "(2,)"}  # nnU-Net evaluated the regions, not the labels
    raw = Path(env["nnUNet_raw"]) / "Dataset992_KATestRegions2D"
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", D_REGIONS, "-c", "2d", "-f", "0",
         "-p", SOURCE_PLANS, "-tr", SMOKE, *NO_WORKERS], env)
    for case in raw.joinpath("labelsTs").glob("*.png"):
        predicted = _png(out / case.name)
        assert predicted.shape == _png(case).shape
        assert set(np.unique(predicted)) <= {0, 1, 2}  # regions_class_order [1, 2]: labels, never "ignore"
    run(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(out), "-djfile", str(out / "dataset.json"),
         "-pfile", str(out / "plans.json"), "-np", "1"], env)
    assert set(json.loads((out / "summary.json").read_text())["mean"]) == {"(1, 2)", "(2,)"}
    # the project's cross-validation report reads region keys too
    proc = run(["nnunetv2-allukan", "crossval", "-d", D_REGIONS, "-c", "2d", "-p", SOURCE_PLANS, "-tr", SMOKE,
                "-f", "0", "--collect-only", "--out", str(tmp_path / "cv")], env)
    assert "Dice (1, 2) | Dice (2,)" in proc.stdout


# --- --val --npz, ensembling with nnU-Net's CNN, postprocessing ---------------------------------------------------

def test_ensemble_with_the_cnn_and_postprocessing(env, trained_2d, tmp_path):
    before = json.loads((trained_2d / "validation" / "summary.json").read_text())
    # --val --npz: nnU-Net's validation again from checkpoint_final, keeping the softmax outputs
    run(["nnUNetv2_train", D2, "2d", "0", "-tr", SMOKE, "-device", "cpu", "--val", "--npz"], env)
    assert json.loads((trained_2d / "validation" / "summary.json").read_text())["mean"] == before["mean"]
    run(["nnUNetv2_train", D2, "2d", "0", "-tr", CNN, "-device", "cpu", "--npz"], env)
    # nnU-Net ensembles the two validations, compares and picks postprocessing from them
    run(["nnUNetv2_find_best_configuration", D2, "-c", "2d", "-tr", SMOKE, CNN, "-f", "0", "-np", "1"], env)
    results = Path(env["nnUNet_results"]) / "Dataset990_KATest2D"
    assert list((results / "ensembles").glob(f"ensemble___{SMOKE}__nnUNetPlans__2d___{CNN}__*"))
    best = json.loads((results / "inference_information.json").read_text())["best_model_or_ensemble"]
    # test data: both models with probabilities, nnU-Net's ensemble, the chosen postprocessing
    raw = Path(env["nnUNet_raw"]) / "Dataset990_KATest2D"
    for trainer in (SMOKE, CNN):
        run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / trainer), "-d", D2, "-c", "2d",
             "-f", "0", "-tr", trainer, "--save_probabilities", *NO_WORKERS], env)
    ensemble, final = tmp_path / "ensemble", tmp_path / "ensemble_pp"
    run(["nnUNetv2_ensemble", "-i", str(tmp_path / SMOKE), str(tmp_path / CNN), "-o", str(ensemble), "-np", "1"],
        env)
    run(["nnUNetv2_apply_postprocessing", "-i", str(ensemble), "-o", str(final), "-pp_pkl_file",
         best["postprocessing_file"], "-plans_json", best["some_plans_file"], "-np", "1"], env)
    for label in (raw / "labelsTs").glob("*.png"):
        # the ensemble is the argmax of the two models' mean class probabilities (checked independently)
        mean = sum(np.load(tmp_path / t / f"{label.stem}.npz")["probabilities"] for t in (SMOKE, CNN)) / 2
        np.testing.assert_array_equal(_png(ensemble / label.name), mean.argmax(0)[0])
        assert _png(final / label.name).shape == _png(label).shape


# --- cascade: 3d_lowres -> 3d_cascade_fullres ----------------------------------------------------------------------

def _add_cascade(plans_file: Path):
    """A 3d_lowres configuration (half the in-plane resolution) and 3d_cascade_fullres, as nnU-Net's planner writes
    them for large images; the tiny test volumes would not get them from the planner."""
    plans = json.loads(plans_file.read_text())
    fullres = plans["configurations"]["3d_fullres"]
    factors = [1, 2, 2]  # the first axis is already the thick-slice axis
    plans["configurations"]["3d_lowres"] = {
        "inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
        "spacing": [s * f for s, f in zip(fullres["spacing"], factors)],
        "median_image_size_in_voxels": [round(v / f) for v, f in zip(fullres["median_image_size_in_voxels"], factors)],
        "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    plans_file.write_text(json.dumps(plans, indent=2))


@pytest.fixture(scope="session")
def cascade(env):
    make_3d_dataset(env["nnUNet_raw"], int(D_CASCADE), name="KATestCascade3D")
    plan_env = {**env, "nnUNet_n_proc_DA": "1"}
    run(["nnUNetv2_plan_and_preprocess", "-d", D_CASCADE, "-c", "3d_fullres", "-np", "1", "-npfp", "1"], plan_env)
    pre = Path(env["nnUNet_preprocessed"]) / "Dataset993_KATestCascade3D"
    _add_cascade(pre / "nnUNetPlans.json")
    run(["nnUNetv2_preprocess", "-d", D_CASCADE, "-c", "3d_lowres", "-np", "1"], plan_env)
    # One fold that validates on every case: its lowres validation then writes the previous-stage segmentation of
    # every training case, which the cascade needs (with nnU-Net's 5 folds, all 5 lowres folds would be needed).
    labels = Path(env["nnUNet_raw"]) / pre.name / "labelsTr"
    cases = sorted(p.name.removesuffix(".nii.gz") for p in labels.glob("*.nii.gz"))
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases, "val": cases}]))
    for configuration in ("3d_lowres", "3d_cascade_fullres"):
        run(["nnUNetv2_train", D_CASCADE, configuration, "0", "-tr", SMOKE, "-device", "cpu"], env)
    return Path(env["nnUNet_results"]) / pre.name


def test_cascade_lowres_then_fullres_with_allukan(env, cascade, tmp_path):
    lowres = cascade / f"{SMOKE}__nnUNetPlans__3d_lowres"
    fullres = cascade / f"{SMOKE}__nnUNetPlans__3d_cascade_fullres" / "fold_0"
    # the lowres validation wrote its segmentations for the next stage, one per case
    assert len(list((lowres / "predicted_next_stage" / "3d_cascade_fullres").iterdir())) >= 6
    ckpt = torch.load(fullres / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    first = ckpt["network_weights"]["encoder.stages.0.0.0.weight"]
    assert first.shape[1] == 1 + 1  # the image plus the one-hot lowres segmentation (nnU-Net: foreground labels)
    lowres_first = torch.load(lowres / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                              weights_only=False)["network_weights"]["encoder.stages.0.0.0.weight"]
    assert lowres_first.shape[1] == 1
    raw = Path(env["nnUNet_raw"]) / "Dataset993_KATestCascade3D"
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "low"), "-d", D_CASCADE,
         "-c", "3d_lowres", "-f", "0", "-tr", SMOKE, *NO_WORKERS], env)
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "full"), "-d", D_CASCADE,
         "-c", "3d_cascade_fullres", "-f", "0", "-tr", SMOKE, "-prev_stage_predictions", str(tmp_path / "low"),
         *NO_WORKERS], env)
    import SimpleITK as sitk
    for label in (raw / "labelsTs").glob("*.nii.gz"):
        assert sitk.ReadImage(str(tmp_path / "full" / label.name)).GetSize() == sitk.ReadImage(str(label)).GetSize()
