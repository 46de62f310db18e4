"""``nnunetv2-allukan demo``: real brain data -> nnU-Net -> ALL U-KAN -> Dice, on a CPU, in one command.

Steps (each visible as it runs, each skipped when its output is already there and was made with the same
settings, so a rerun resumes; every step records its settings next to its output, ``demo_settings.json``):
1. build the ICBM152 2D tissue dataset from the installed nilearn wheel (+ the CAT12 cross-template test set
   from deepmriprep) under ``--workdir``;
2. ``nnUNetv2_plan_and_preprocess`` and a contiguous-slab ``splits_final.json``;
3. train nnUNetTrainerAllUKAN (and with ``--compare`` nnU-Net's own CNN and, when installed, UKAN) with the same
   CPU-sized budget through nnU-Net's own training loop;
4. held-out slab Dice from nnU-Net's own validation of each fold; ``nnUNetv2_predict`` (the ensemble of the
   trained folds) and ``nnUNetv2_evaluate_folder`` on the cross-template set;
5. a report folder: summary.json, report.md, example overlays, learned activations, nnU-Net's progress.png, and
   with several ``--folds`` a cross-validation table with paired Wilcoxon tests (``crossval/``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

TRAINER = "nnUNetTrainerAllUKAN"
SETTINGS_FILE = "demo_settings.json"
COMPARATORS = ("nnUNetTrainer", "nnUNetTrainerUKAN")
CONFIGURATION = "2d"


def log(msg: str):
    print(f"[allukan demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[str], env: dict, quiet: bool = False):
    log("$ " + " ".join(cmd))
    out = subprocess.DEVNULL if quiet else None
    from .nnunet_commands import nnunet_executable
    result = subprocess.run([nnunet_executable(cmd[0]), *cmd[1:]], env=env, stdout=out)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed with exit code {result.returncode}")


def setup_environment(workdir: str, device: str) -> dict:
    paths = {k: os.path.join(workdir, k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    from .nnunet_commands import with_ext_trainer_path
    env = with_ext_trainer_path({**os.environ, **paths})
    env.setdefault("nnUNet_def_n_proc", "1")
    env.setdefault("nnUNet_n_proc_DA", "0" if device == "cpu" else "4")
    os.environ.update(env)
    return env


def recorded_settings(folder: str) -> dict | None:
    path = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def record_settings(folder: str, settings: dict):
    with open(os.path.join(folder, SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=2)


def settings_difference(recorded: dict | None, wanted: dict) -> str | None:
    """None if ``recorded`` equals ``wanted``, else what differs, e.g. "epochs 20 -> 5, iterations 25 -> 10"."""
    if recorded is None:
        return "no record of its settings (made by an earlier version of the demo)"
    changed = [f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in wanted.items() if recorded.get(k) != v]
    return ", ".join(changed) or None


def training_settings(epochs: int, iterations: int, val_iterations: int, device: str, downsample: int) -> dict:
    """What a trained fold depends on, beyond the trainer and fold: recorded in the fold folder."""
    return {"epochs": epochs, "iterations": iterations, "val_iterations": val_iterations, "device": device,
            "downsample": downsample}


def train_in_process(trainer_name: str, dataset_name: str, fold: int, settings: dict, results_root: str) -> str:
    """nnU-Net's own training loop and final validation with a shortened budget; returns the fold folder.

    A finished fold is reused only if it was trained with the same ``settings`` (``training_settings``); one
    trained otherwise is never relabelled, nor silently deleted: the demo stops and says what differs.
    """
    from nnunetv2_allukan.trainers.recipes import spline_optimizer_of

    from . import crossval
    from .checkpoints import trainer_class
    from .nnunet_commands import UserError

    fold_folder = crossval.fold_folder(results_root, dataset_name, trainer_name, "nnUNetPlans", CONFIGURATION, fold)
    settings = {**settings, "spline_optimizer": spline_optimizer_of(trainer_class(trainer_name))}
    if crossval.fold_state(fold_folder) == "done":
        recorded = recorded_settings(fold_folder)
        if recorded is not None:
            # records before 0.2.0 have no spline_optimizer: every trainer then used nnU-Net's single SGD group
            recorded = {"spline_optimizer": "shared", **recorded}
        difference = settings_difference(recorded, settings)
        if difference:
            recipe_note = (" (nnUNetTrainerAllUKAN trains the spline parameters with their own Adam since 0.2.0)"
                           if "spline_optimizer" in difference else "")
            raise UserError(f"{trainer_name} fold {fold} in {fold_folder} was trained with other settings "
                            f"({difference}){recipe_note}. Rerun with the settings it was trained with, use another "
                            f"--workdir, or delete that folder to retrain it.")
        log(f"{trainer_name}: finished run with the same settings found in {fold_folder}, not retraining")
        return fold_folder
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    pre = os.path.join(str(nnUNet_preprocessed), dataset_name)
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    device = settings["device"]
    trainer = trainer_class(trainer_name)(plans, CONFIGURATION, fold, load_json(os.path.join(pre, "dataset.json")),
                                          device=torch.device(device))
    trainer.num_epochs = settings["epochs"]
    trainer.num_iterations_per_epoch = settings["iterations"]
    trainer.num_val_iterations_per_epoch = settings["val_iterations"]
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    log(f"{trainer_name}: training {settings['epochs']} epochs x {settings['iterations']} iterations on {device}")
    trainer.run_training()
    trainer.perform_actual_validation(False)
    record_settings(fold_folder, settings)  # last: a fold with a record is a finished fold of these settings
    return fold_folder


def _foreground_dice(summary: dict) -> dict:
    per_class = {k: float(v["Dice"]) for k, v in summary["mean"].items()}
    return {"per_class": per_class, "foreground_mean": float(summary["foreground_mean"]["Dice"])}


def _heldout_dice(cv_summary: dict, collected: dict) -> dict:
    """One trainer's held-out Dice (mean and std over folds) from crossval's summary of nnU-Net's fold validations."""
    stats = cv_summary["dice"]
    classes = [k for k in stats if k != "foreground_mean"]
    return {"per_class": {c: stats[c]["mean"] for c in classes},
            "per_class_std": {c: stats[c]["std"] for c in classes},
            "foreground_mean": stats["foreground_mean"]["mean"],
            "foreground_mean_std": stats["foreground_mean"]["std"],
            "per_fold": {str(f): r["foreground_mean"] for f, r in collected["folds"].items()}}


def _folds_tag(folds) -> str:
    return "fold_" + "_".join(str(f) for f in folds)


def run_demo(workdir: str = "allukan_demo", epochs: int = 20, iterations: int = 25, val_iterations: int = 5,
             device: str = "cpu", downsample: int = 3, folds=(2,), dataset_id: int = 501,
             compare: bool = False, overwrite_dataset: bool = False) -> dict:
    from ..data.templates import make_icbm152_2d, slab_splits, write_splits

    started = time.time()
    folds = sorted(set(int(f) for f in folds))
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
    preprocessing = {"downsample": info["downsample"], "cases": len(info["cases"])}
    if not os.path.isfile(os.path.join(pre, "nnUNetPlans.json")) or \
            not os.path.isdir(os.path.join(pre, "nnUNetPlans_2d")) or \
            settings_difference(recorded_settings(pre), preprocessing):
        plan_env = {**env, "nnUNet_n_proc_DA": str(max(1, int(env["nnUNet_n_proc_DA"])))}
        shutil.rmtree(os.path.join(pre, "nnUNetPlans_2d"), ignore_errors=True)  # no stale cases from other data
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", CONFIGURATION, "-np", "1", "-npfp", "1"],
             plan_env)
        record_settings(pre, preprocessing)
    splits = slab_splits(info["cases"])
    write_splits(pre, splits)
    for fold in folds:
        heldout = splits[fold]["val"]
        log(f"contiguous slab folds written; fold {fold} holds out {heldout[0]} .. {heldout[-1]}")

    trainers = [TRAINER] + ([c for c in COMPARATORS if _trainer_available(c)] if compare else [])
    if compare and "nnUNetTrainerUKAN" not in trainers:
        log("UKAN comparator not available in this version: comparing with nnU-Net's CNN only")
    log(f"step 3/5: training {', '.join(trainers)} on fold(s) {folds}")
    fold_folders = {t: {} for t in trainers}
    training = training_settings(epochs, iterations, val_iterations, device, info["downsample"])
    # Fold by fold, so that an interrupted comparison still has every trainer on the finished folds.
    for fold in folds:
        for trainer in trainers:
            fold_folders[trainer][fold] = train_in_process(trainer, name, fold, training, env["nnUNet_results"])

    log("step 4/5: held-out slabs from nnU-Net's own fold validation; nnUNetv2_predict + nnUNetv2_evaluate_folder "
        "on the cross-template set" + (f" (ensemble of folds {folds})" if len(folds) > 1 else ""))
    from . import crossval
    collected = crossval.collect(env["nnUNet_results"], name, trainers, "nnUNetPlans", CONFIGURATION, folds)
    cv_summary = crossval.summarise(collected, TRAINER)
    results = {t: {"heldout_slab": _heldout_dice(cv_summary[t], collected[t])} for t in trainers}
    if info["test_cases"]:
        raw = info["folder"]
        inputs = os.path.join(workdir, "inputs", "cross_template")
        labels = os.path.join(workdir, "inputs", "cross_template_labels")
        _link_cases(info["test_cases"], os.path.join(raw, "imagesTs"), inputs, "_0000.nii.gz")
        _link_cases(info["test_cases"], os.path.join(raw, "labelsTs"), labels, ".nii.gz")
        for trainer in trainers:
            out = cross_template_folder(workdir, trainer, folds)
            summary_file = os.path.join(out, "summary.json")
            # the ensemble of exactly these models: redone when a fold was retrained since
            prediction = {"folds": folds, "models": {str(f): recorded_settings(fold_folders[trainer][f])
                                                     for f in folds}}
            if not os.path.isfile(summary_file) or settings_difference(recorded_settings(out), prediction):
                shutil.rmtree(out, ignore_errors=True)
                _run(["nnUNetv2_predict", "-i", inputs, "-o", out, "-d", str(dataset_id), "-c", CONFIGURATION,
                      "-f", *[str(f) for f in folds], "-tr", trainer, "-device", device, "-npp", "0", "-nps", "0",
                      "--disable_progress_bar"], env, quiet=True)
                _run(["nnUNetv2_evaluate_folder", labels, out, "-djfile", os.path.join(out, "dataset.json"),
                      "-pfile", os.path.join(out, "plans.json"), "-np", "1"], env, quiet=True)
                record_settings(out, prediction)
            with open(summary_file) as f:
                results[trainer]["cross_template"] = _foreground_dice(json.load(f))

    log("step 5/5: report")
    report_dir = os.path.join(workdir, "report")
    if len(folds) > 1:
        for path in crossval.write_outputs(os.path.join(report_dir, "crossval"), cv_summary, collected):
            log(f"wrote {path}")
    summary = write_report(report_dir, results, fold_folders, info, folds, training, time.time() - started)
    print()
    print(summary["table"])
    print()
    log(f"report: {report_dir} (report.md, summary.json, PNGs); total {summary['seconds']:.0f} s")
    return summary


def cross_template_folder(workdir: str, trainer: str, folds) -> str:
    """One prediction folder per set of folds, so a rerun with other folds never reuses a stale ensemble."""
    return os.path.join(workdir, "predictions", trainer, "cross_template", _folds_tag(folds))


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


def write_report(report_dir, results, fold_folders, info, folds, training: dict, seconds) -> dict:
    from .checkpoints import load_network
    from ..data.templates import TISSUE_LABELS
    from .plots import plot_activations, plot_examples

    os.makedirs(report_dir, exist_ok=True)
    class_names = {str(v): k for k, v in TISSUE_LABELS.items() if v}
    multi = len(folds) > 1

    def cell(d, key, std_key):
        value = f"{d[key]:.3f}"
        return value + (f" ± {d[std_key]:.3f}" if multi and std_key in d else "")

    lines = ["| trainer | test set | " + " | ".join(f"Dice {n}" for n in class_names.values()) + " | mean |",
             "|---|---|" + "---|" * (len(class_names) + 1)]
    for trainer, sets in results.items():
        for set_name, d in sets.items():
            cells = " | ".join(
                f"{d['per_class'][k]:.3f}" + (f" ± {d['per_class_std'][k]:.3f}" if multi and "per_class_std" in d
                                              else "") for k in class_names)
            lines.append(f"| {trainer} | {set_name} | {cells} | {cell(d, 'foreground_mean', 'foreground_mean_std')} |")
    table = "\n".join(lines)
    epochs, iterations, device = training["epochs"], training["iterations"], training["device"]
    summary = {"dataset": info["name"], "folds": folds, "epochs": epochs, "iterations_per_epoch": iterations,
               "val_iterations_per_epoch": training["val_iterations"], "downsample": training["downsample"],
               "spacing_mm": info["spacing"], "device": device, "seconds": seconds, "dice": results,
               "labels": class_names, "table": table}
    with open(os.path.join(report_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    first = fold_folders[TRAINER][folds[0]]
    network, _ = load_network(first)
    plot_activations(network, os.path.join(report_dir, "activations.png"))
    shutil.copy2(os.path.join(first, "progress.png"), os.path.join(report_dir, "progress.png"))
    workdir = os.path.dirname(report_dir)
    raw = info["folder"]
    heldout = sorted(f.removesuffix(".nii.gz") for f in os.listdir(os.path.join(first, "validation"))
                     if f.endswith(".nii.gz"))
    sources = {"heldout_slab": (heldout, os.path.join(raw, "imagesTr"), os.path.join(raw, "labelsTr"),
                                os.path.join(first, "validation"))}
    if "cross_template" in results[TRAINER]:
        sources["cross_template"] = (sorted(info["test_cases"]), os.path.join(raw, "imagesTs"),
                                     os.path.join(raw, "labelsTs"), cross_template_folder(workdir, TRAINER, folds))
    examples = []
    for set_name, (cases, images, labels, predictions) in sources.items():
        case = cases[len(cases) // 2]
        examples.append({
            "title": f"{set_name} {case}",
            "image": _read_slice(os.path.join(images, case + "_0000.nii.gz")),
            "gt": _read_slice(os.path.join(labels, case + ".nii.gz")),
            "pred": _read_slice(os.path.join(predictions, case + ".nii.gz")),
        })
    plot_examples(examples, os.path.join(report_dir, "examples.png"), len(class_names) + 1)
    fold_text = (f"Fold {folds[0]} of contiguous slab cross-validation" if not multi else
                 f"Folds {folds} of contiguous slab cross-validation (held-out: mean ± std over folds; "
                 f"cross-template: nnU-Net's ensemble of these folds; per-fold table and Wilcoxon tests in "
                 f"crossval/crossval.md)")
    with open(os.path.join(report_dir, "report.md"), "w") as f:
        f.write(f"# ALL U-KAN demo: {info['name']}\n\n"
                f"{fold_text}, {epochs} epochs x {iterations} iterations on {device}, slices downsampled "
                f"{training['downsample']}x in plane ({' x '.join(f'{v:g}' for v in info['spacing'])} mm), "
                f"{seconds / 60:.1f} min in total. Held-out slab: nnU-Net's own validation of each fold (slices never trained on, with a gap "
                f"to the training slabs); cross-template: the CAT12 template, an independently made brain, "
                f"predicted with nnUNetv2_predict.\n\n{table}\n\n"
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
    parser.add_argument("--folds", type=int, nargs="+", default=[2], choices=range(5), metavar="FOLD",
                        help="slab fold(s) to train/hold out (default 2: the middle slab, typical axial slices); "
                             "several folds give a slab cross-validation report with per-fold Wilcoxon tests")
    parser.add_argument("--dataset-id", type=int, default=501)
    parser.add_argument("--compare", action="store_true",
                        help="also train nnU-Net's CNN (nnUNetTrainer) and UKAN with the same budget")
    parser.add_argument("--overwrite-dataset", action="store_true",
                        help="rebuild the demo dataset if one with other settings exists")
    args = parser.parse_args(argv)
    run_demo(args.workdir, args.epochs, args.iterations, args.val_iterations, args.device, args.downsample,
             args.folds, args.dataset_id, args.compare, args.overwrite_dataset)
    return 0
