"""The nnU-Net workflow of the README, run as real nnU-Net commands in subprocesses on the CPU.

Datasets are generated once per session (a non-square 2D PNG set with two foreground labels, an anisotropic
3D NIfTI set) and planned/preprocessed once; the tests then train with the smoke-test trainer, predict,
evaluate and find the best configuration exactly as the README shows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunetv2_allukan.trainers import TRAINER_NAMES

from conftest import D2, D3, SMOKE, ext_path, results_folder, run

pytestmark = pytest.mark.e2e

def test_train_2d_writes_nnunet_outputs(trained_2d):
    for name in ("checkpoint_final.pth", "progress.png", "validation/summary.json"):
        assert (trained_2d / name).is_file(), name
    assert list((trained_2d / "validation").glob("*.npz"))  # --npz kept the softmax outputs
    ckpt = torch.load(trained_2d / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == SMOKE
    assert any(k.endswith("activation.coef") for k in ckpt["network_weights"])
    summary = json.loads((trained_2d / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}


def test_predict_and_evaluate_2d(nnunet, trained_2d, tmp_path):
    env = {**nnunet["env"], "nnUNet_extTrainer": ext_path(nnunet["env"])}
    raw = Path(env["nnUNet_raw"]) / "Dataset990_KATest2D"
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", D2, "-c", "2d", "-f", "0",
         "-tr", SMOKE, "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in (raw / "labelsTs").glob("*.png"))
    run(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(out), "-djfile", str(out / "dataset.json"),
         "-pfile", str(out / "plans.json"), "-np", "1"], env)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def test_find_best_configuration_on_fold_0(nnunet, trained_2d):
    # find_best_configuration reads finished results only: it needs no trainer discovery.
    proc = run(["nnUNetv2_find_best_configuration", D2, "-c", "2d", "-tr", SMOKE, "-f", "0"], nnunet["env"])
    assert "nnUNetv2_predict" in proc.stdout
    assert (nnunet["root"] / "results" / "Dataset990_KATest2D" / "inference_instructions.txt").is_file()


def test_train_and_predict_3d_with_the_wrapper(nnunet, tmp_path):
    """nnunetv2-allukan train/predict need no variable: they hand their arguments to nnU-Net unchanged."""
    env = nnunet["env"]
    assert "nnUNet_extTrainer" not in env
    run(["nnunetv2-allukan", "train", D3, "3d_fullres", "0", "-tr", SMOKE, "-device", "cpu", "--npz"], env)
    fold = results_folder(nnunet, "Dataset991_KATest3D", SMOKE, "3d_fullres")
    assert (fold / "checkpoint_final.pth").is_file()
    raw = Path(env["nnUNet_raw"]) / "Dataset991_KATest3D"
    out = tmp_path / "pred3d"
    run(["nnunetv2-allukan", "predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", D3, "-c", "3d_fullres",
         "-f", "0", "-tr", SMOKE, "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    import SimpleITK as sitk
    pred = sitk.ReadImage(str(out / "vol006.nii.gz"))
    ref = sitk.ReadImage(str(raw / "labelsTs" / "vol006.nii.gz"))
    assert pred.GetSize() == ref.GetSize()
    assert pred.GetSpacing() == pytest.approx(ref.GetSpacing())


def test_stock_nnunet_without_the_variable_cannot_find_the_trainer(nnunet):
    proc = run(["nnUNetv2_train", D2, "2d", "1", "-tr", "nnUNetTrainerAllUKAN", "-device", "cpu"], nnunet["env"],
               expect_ok=False)
    assert proc.returncode != 0
    assert "nnUNet_extTrainer" in proc.stdout + proc.stderr


def test_add_plans_lets_the_stock_trainer_train_allukan(nnunet):
    """Zero-config route: a configuration naming AllUKAN, trained by nnU-Net's own nnUNetTrainer."""
    env = nnunet["env"]
    run(["nnunetv2-allukan", "add-plans", "-d", D2, "-c", "2d", "--share", "channel"], env)
    again = run(["nnunetv2-allukan", "add-plans", "-d", D2, "-c", "2d"], env, expect_ok=False)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    plans_file = Path(env["nnUNet_preprocessed"]) / "Dataset990_KATest2D" / "nnUNetPlans.json"
    assert (plans_file.parent / "nnUNetPlans.json.bak").is_file()
    code = r"""
import json, sys, torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_allukan.architectures import AllUKAN
plans = json.load(open(sys.argv[1])); plans["continue_training"] = False
dj = json.load(open(sys.argv[2]))
t = nnUNetTrainer(plans, "2d_allukan", 0, dj, device=torch.device("cpu"))
t.initialize()
assert isinstance(t.network, AllUKAN), type(t.network)
assert t.network.encoder.stages[0][0][0].activation.share == "channel"
dl_train, _ = t.get_dataloaders()
before = [p.detach().clone() for p in t.network.parameters()]
out = t.train_step(next(dl_train))
assert torch.isfinite(torch.as_tensor(out["loss"])), out
assert any(not torch.equal(b, p) for b, p in zip(before, t.network.parameters()))
print("OK", t.output_folder)
# our trainer on the same configuration: the plans' share wins over its default, and its log says so
from nnunetv2_allukan.trainers import nnUNetTrainerAllUKAN
plans["continue_training"] = False  # nnU-Net's __init__ pops it
ours = nnUNetTrainerAllUKAN(plans, "2d_allukan", 0, dj, device=torch.device("cpu"))
ours.initialize()
assert {m.share for m in ours.network.modules() if hasattr(m, "share")} == {"channel"}
print("LOG", open(ours.log_file).read())
"""
    proc = run([sys.executable, "-c", code, str(plans_file), str(plans_file.parent / "dataset.json")], env)
    assert "OK" in proc.stdout and "nnUNetTrainer__nnUNetPlans__2d_allukan" in proc.stdout
    assert "share='channel' (from the plans" in proc.stdout.split("LOG", 1)[1]


def test_add_plans_user_errors_are_one_line(nnunet, tmp_path):
    env = nnunet["env"]
    bad = run(["nnunetv2-allukan", "add-plans", "-d", "777", "-c", "2d"], env, expect_ok=False)
    assert bad.returncode == 2 and "777" in bad.stderr and "Traceback" not in bad.stderr
    bad = run(["nnunetv2-allukan", "add-plans", "-d", D2, "-c", "3d_fullres", "--name", "x"], env, expect_ok=False)
    assert bad.returncode == 2 and "3d_fullres" in bad.stderr
    bad = run(["nnunetv2-allukan", "add-plans", "-d", D2, "-c", "2d", "--name", "y", "--token-stages", "99"], env,
              expect_ok=False)
    assert bad.returncode == 2 and "token_stages" in bad.stderr
    plans = json.loads((Path(env["nnUNet_preprocessed"]) / "Dataset990_KATest2D" / "nnUNetPlans.json").read_text())
    assert "x" not in plans["configurations"] and "y" not in plans["configurations"]  # nothing half-written
    unset = {k: v for k, v in env.items() if k != "nnUNet_preprocessed"}
    bad = run(["nnunetv2-allukan", "add-plans", "-d", D2, "-c", "2d"], unset, expect_ok=False)
    assert bad.returncode == 2 and "nnUNet_preprocessed" in bad.stderr


RESOLVE_ALL = """
import sys
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
for name in sys.argv[2:]:
    cls = recursive_find_trainer_class_by_name(name)
    assert cls.__name__ == name, (name, cls)
    assert cls.build_network_architecture is not None
import nnunetv2_allukan
assert nnunetv2_allukan.__file__.startswith(sys.argv[1]), nnunetv2_allukan.__file__
print("RESOLVED", len(sys.argv) - 2)
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def test_discovery_with_editable_install():
    import nnunetv2_allukan
    env = _clean_env()
    env["nnUNet_extTrainer"] = run(["nnunetv2-allukan", "ext-path"], env).stdout.strip()
    proc = run([sys.executable, "-c", RESOLVE_ALL, os.path.dirname(nnunetv2_allukan.__file__), *TRAINER_NAMES],
               env)
    assert f"RESOLVED {len(TRAINER_NAMES)}" in proc.stdout


def test_discovery_with_wheel_install(wheel_install, tmp_path):
    # cwd away from the checkout: "python -m/-c" put the working directory first on sys.path.
    env = _clean_env(PYTHONPATH=str(wheel_install))
    path = run([sys.executable, "-m", "nnunetv2_allukan.tools.cli", "ext-path"], env, cwd=tmp_path).stdout.strip()
    assert path.startswith(str(wheel_install))
    env["nnUNet_extTrainer"] = path
    proc = run([sys.executable, "-c", RESOLVE_ALL, str(wheel_install), *TRAINER_NAMES], env, cwd=tmp_path)
    assert f"RESOLVED {len(TRAINER_NAMES)}" in proc.stdout


@pytest.mark.parametrize("trainer,network_class", [("nnUNetTrainerUKAN_smokeTest", "UKAN"),
                                                   ("nnUNetTrainerStackedKAN_smokeTest", "StackedKAN")])
def test_comparator_trainers_train_and_predict(nnunet, tmp_path, trainer, network_class):
    """The comparators run the same nnU-Net pipeline: train (with deep supervision), validate, predict."""
    env = nnunet["env"]
    run(["nnunetv2-allukan", "train", D2, "2d", "0", "-tr", trainer, "-device", "cpu"], env)
    fold = results_folder(nnunet, "Dataset990_KATest2D", trainer, "2d")
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["init_args"]["plans"]["configurations"]["2d"]["architecture"]["network_class_name"] \
        .endswith("PlainConvUNet")  # the stock plans: the trainer alone picks the network
    from nnunetv2_allukan.tools.checkpoints import load_network
    network, _ = load_network(str(fold))
    assert type(network).__name__ == network_class
    raw = Path(env["nnUNet_raw"]) / "Dataset990_KATest2D"
    out = tmp_path / "pred"
    run(["nnunetv2-allukan", "predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", D2, "-c", "2d",
         "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in (raw / "labelsTs").glob("*.png"))
