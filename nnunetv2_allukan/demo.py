"""``nnunetv2-allukan demo``: real brain data -> nnU-Net -> ALL U-KAN -> Dice, on a CPU, in one command.

Steps (each visible as it runs, each skipped when its output is already there, so a rerun resumes):
1. build the ICBM152 2D tissue dataset from the installed nilearn wheel (+ the CAT12 cross-template test set
   from deepmriprep) under ``--workdir``;
2. ``nnUNetv2_plan_and_preprocess`` and a contiguous-slab ``splits_final.json``;
3. train nnUNetTrainerAllUKAN (and with ``--compare`` nnU-Net's own CNN and, when installed, UKAN) with the same
   CPU-sized budget through nnU-Net's own training loop;
4. ``nnUNetv2_predict`` on the held-out slab and on the cross-template set, ``nnUNetv2_evaluate_folder``;
5. a report folder: summary.json, report.md, example overlays, learned activations, nnU-Net's progress.png.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

TRAINER = "nnUNetTrainerAllUKAN"
COMPARATORS = ("nnUNetTrainer", "nnUNetTrainerUKAN")
CONFIGURATION = "2d"


def log(msg: str):
    print(f"[allukan demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[str], env: dict, quiet: bool = False):
    log("$ " + " ".join(cmd))
    out = subprocess.DEVNULL if quiet else None
    from .cli import nnunet_executable
    result = subprocess.run([nnunet_executable(cmd[0]), *cmd[1:]], env=env, stdout=out)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed with exit code {result.returncode}")


def setup_environment(workdir: str, device: str) -> dict:
    paths = {k: os.path.join(workdir, k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    from .cli import with_ext_trainer_path
    env = with_ext_trainer_path({**os.environ, **paths})
    env.setdefault("nnUNet_def_n_proc", "1")
    env.setdefault("nnUNet_n_proc_DA", "0" if device == "cpu" else "4")
    os.environ.update(env)
    return env


def train_in_process(trainer_name: str, dataset_name: str, fold: int, epochs: int, iterations: int,
                     val_iterations: int, device: str) -> str:
    """nnU-Net's own training loop and final validation with a shortened budget; returns the fold folder."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    from .checkpoints import trainer_class

    cls = trainer_class(trainer_name)
    pre = os.path.join(str(nnUNet_preprocessed), dataset_name)
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    trainer = cls(plans, CONFIGURATION, fold, load_json(os.path.join(pre, "dataset.json")),
                  device=torch.device(device))
    fold_folder = trainer.output_folder
    if os.path.isfile(os.path.join(fold_folder, "checkpoint_final.pth")) and \
            os.path.isfile(os.path.join(fold_folder, "validation", "summary.json")):
        log(f"{trainer_name}: finished run found in {fold_folder}, not retraining")
        return fold_folder
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    log(f"{trainer_name}: training {epochs} epochs x {iterations} iterations on {device}")
    trainer.run_training()
    trainer.perform_actual_validation(False)
    return fold_folder


def _foreground_dice(summary: dict) -> dict:
    per_class = {k: float(v["Dice"]) for k, v in summary["mean"].items()}
    return {"per_class": per_class, "foreground_mean": float(summary["foreground_mean"]["Dice"])}


def run_demo(workdir: str = "allukan_demo", epochs: int = 20, iterations: int = 25, val_iterations: int = 5,
             device: str = "cpu", downsample: int = 3, fold: int = 2, dataset_id: int = 501,
             compare: bool = False, overwrite_dataset: bool = False) -> dict:
    from .datasets import make_icbm152_2d, slab_splits, write_splits

    started = time.time()
    workdir = os.path.abspath(workdir)
    env = setup_environment(workdir, device)
    log(f"work folder {workdir}")

    log("step 1/5: building the ICBM152 2D tissue dataset from the installed nilearn/deepmriprep wheels")
    info = make_icbm152_2d(env["nnUNet_raw"], dataset_id, downsample=downsample, overwrite=overwrite_dataset,
                           cross_template=_has_package("deepmriprep"))
    if not info["test_cases"]:
        log("deepmriprep is not installed: no cross-template test set (pip install deepmriprep)")
    name = info["name"]
    log(f"{len(info['cases'])} training slices, {len(info['test_cases'])} cross-template test slices")

    log("step 2/5: nnU-Net planning and preprocessing")
    pre = os.path.join(env["nnUNet_preprocessed"], name)
    if not os.path.isfile(os.path.join(pre, "nnUNetPlans.json")) or \
            not os.path.isdir(os.path.join(pre, "nnUNetPlans_2d")):
        plan_env = {**env, "nnUNet_n_proc_DA": str(max(1, int(env["nnUNet_n_proc_DA"])))}
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", CONFIGURATION, "-np", "1", "-npfp", "1"],
             plan_env)
    splits = slab_splits(info["cases"])
    write_splits(pre, splits)
    heldout = splits[fold]["val"]
    log(f"contiguous slab folds written; fold {fold} holds out {heldout[0]} .. {heldout[-1]}")

    trainers = [TRAINER] + ([c for c in COMPARATORS if _trainer_available(c)] if compare else [])
    if compare and "nnUNetTrainerUKAN" not in trainers:
        log("UKAN comparator not available in this version: comparing with nnU-Net's CNN only")
    log(f"step 3/5: training {', '.join(trainers)}")
    folds = {}
    for trainer in trainers:
        folds[trainer] = train_in_process(trainer, name, fold, epochs, iterations, val_iterations, device)

    log("step 4/5: nnUNetv2_predict and nnUNetv2_evaluate_folder")
    raw = info["folder"]
    test_sets = {"heldout_slab": (heldout, "imagesTr", "labelsTr")}
    if info["test_cases"]:
        test_sets["cross_template"] = (info["test_cases"], "imagesTs", "labelsTs")
    results = {}
    for set_name, (cases, img_dir, lab_dir) in test_sets.items():
        inputs = os.path.join(workdir, "inputs", set_name)
        labels = os.path.join(workdir, "inputs", set_name + "_labels")
        _link_cases(cases, os.path.join(raw, img_dir), inputs, "_0000.nii.gz")
        _link_cases(cases, os.path.join(raw, lab_dir), labels, ".nii.gz")
        for trainer in trainers:
            out = os.path.join(workdir, "predictions", trainer, set_name)
            summary_file = os.path.join(out, "summary.json")
            if not os.path.isfile(summary_file):
                _run(["nnUNetv2_predict", "-i", inputs, "-o", out, "-d", str(dataset_id), "-c", CONFIGURATION,
                      "-f", str(fold), "-tr", trainer, "-device", device, "-npp", "0", "-nps", "0",
                      "--disable_progress_bar"], env, quiet=True)
                _run(["nnUNetv2_evaluate_folder", labels, out, "-djfile", os.path.join(out, "dataset.json"),
                      "-pfile", os.path.join(out, "plans.json"), "-np", "1"], env, quiet=True)
            with open(summary_file) as f:
                results.setdefault(trainer, {})[set_name] = _foreground_dice(json.load(f))

    log("step 5/5: report")
    report_dir = os.path.join(workdir, "report")
    summary = write_report(report_dir, results, folds, info, fold, epochs, iterations, device,
                           time.time() - started)
    print()
    print(summary["table"])
    print()
    log(f"report: {report_dir} (report.md, summary.json, PNGs); total {summary['seconds']:.0f} s")
    return summary


def _has_package(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _trainer_available(name: str) -> bool:
    from .checkpoints import trainer_class
    try:
        trainer_class(name)
        return True
    except RuntimeError:
        return False


def _link_cases(cases, source_dir, target_dir, suffix):
    os.makedirs(target_dir, exist_ok=True)
    for case in cases:
        target = os.path.join(target_dir, case + suffix)
        if not os.path.exists(target):
            shutil.copy2(os.path.join(source_dir, case + suffix), target)


def _read_slice(path):
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(path))[0]


def write_report(report_dir, results, folds, info, fold, epochs, iterations, device, seconds) -> dict:
    from .checkpoints import load_network
    from .datasets import TISSUE_LABELS
    from .plots import plot_activations, plot_examples

    os.makedirs(report_dir, exist_ok=True)
    class_names = {str(v): k for k, v in TISSUE_LABELS.items() if v}
    lines = ["| trainer | test set | " + " | ".join(f"Dice {n}" for n in class_names.values()) + " | mean |",
             "|---|---|" + "---|" * (len(class_names) + 1)]
    for trainer, sets in results.items():
        for set_name, d in sets.items():
            cells = " | ".join(f"{d['per_class'][k]:.3f}" for k in class_names)
            lines.append(f"| {trainer} | {set_name} | {cells} | {d['foreground_mean']:.3f} |")
    table = "\n".join(lines)
    summary = {"dataset": info["name"], "fold": fold, "epochs": epochs, "iterations_per_epoch": iterations,
               "device": device, "seconds": seconds, "dice": results, "labels": class_names, "table": table}
    with open(os.path.join(report_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    network, _ = load_network(folds[TRAINER])
    plot_activations(network, os.path.join(report_dir, "activations.png"))
    shutil.copy2(os.path.join(folds[TRAINER], "progress.png"), os.path.join(report_dir, "progress.png"))
    examples = []
    workdir = os.path.dirname(report_dir)
    for set_name in results[TRAINER]:
        inputs = os.path.join(workdir, "inputs", set_name)
        cases = sorted(c.removesuffix("_0000.nii.gz") for c in os.listdir(inputs))
        case = cases[len(cases) // 2]
        examples.append({
            "title": f"{set_name} {case}",
            "image": _read_slice(os.path.join(inputs, case + "_0000.nii.gz")),
            "gt": _read_slice(os.path.join(workdir, "inputs", set_name + "_labels", case + ".nii.gz")),
            "pred": _read_slice(os.path.join(workdir, "predictions", TRAINER, set_name, case + ".nii.gz")),
        })
    plot_examples(examples, os.path.join(report_dir, "examples.png"), len(class_names) + 1)
    with open(os.path.join(report_dir, "report.md"), "w") as f:
        f.write(f"# ALL U-KAN demo: {info['name']}\n\n"
                f"Fold {fold} of contiguous slab cross-validation, {epochs} epochs x {iterations} iterations on "
                f"{device}, {seconds / 60:.1f} min in total. Held-out slab: validation slices of fold {fold} "
                f"(never trained on, with a gap to the training slabs); cross-template: the CAT12 template, an "
                f"independently made brain.\n\n{table}\n\n"
                "![examples](examples.png)\n\n![activations](activations.png)\n\n![progress](progress.png)\n")
    return summary


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="nnunetv2-allukan demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="allukan_demo", help="work folder (default ./allukan_demo)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--val-iterations", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--downsample", type=int, default=3,
                        help="in-plane downsampling (default 3 -> 3 mm slices, sized for a 2-core CPU)")
    parser.add_argument("--fold", type=int, default=2, choices=range(5),
                        help="slab fold to train/hold out (default 2: the middle slab, typical axial slices)")
    parser.add_argument("--dataset-id", type=int, default=501)
    parser.add_argument("--compare", action="store_true",
                        help="also train nnU-Net's CNN (nnUNetTrainer) and UKAN with the same budget")
    parser.add_argument("--overwrite-dataset", action="store_true",
                        help="rebuild the demo dataset if one with other settings exists")
    args = parser.parse_args(argv)
    run_demo(args.workdir, args.epochs, args.iterations, args.val_iterations, args.device, args.downsample,
             args.fold, args.dataset_id, args.compare, args.overwrite_dataset)
    return 0
