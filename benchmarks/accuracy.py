"""Accuracy experiments through nnU-Net's own training and validation (docs/accuracy.md).

Each run is one trainer x fold x budget x seed, trained in a fresh subprocess by nnU-Net's trainer (its loop,
augmentation, loss and final validation of the held-out slab), with the budget set on the trainer and every RNG
seeded. Results land in ``<workdir>/runs/<task>/<budget>/<trainer>/fold_<k>_seed<s>.json`` as soon as a run ends
(Dice per class, foreground mean, wall time, learning curves, the KA statistics of the last epoch), so an
interrupted batch keeps what finished and a rerun skips it.

    python benchmarks/accuracy.py run --task icbm --trainers nnUNetTrainer nnUNetTrainerAllUKAN --folds 1 \\
        --epochs 20 --iterations 25 --workdir /work/acc
    python benchmarks/accuracy.py report --workdir /work/acc --out docs/accuracy_results

Tasks (built from installed wheels on first use, planned with nnU-Net's default planner, slab folds):
  icbm          ICBM152 grey/white matter, 2D axial slices at --downsample mm (default 3, the demo's)
  parcellation  CAT12 template + neuromorphometrics atlas in 10 lobes/structures, 2D at --downsample mm
  icbm3d        ICBM152 grey/white matter as 3D axial slabs of 12 slices (3d_fullres), 3 slab folds with one
                slab left out on each side of the validation slabs
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

from nnunetv2_allukan.tools.crossval import fold_folder, label_order

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling report module, also when loaded by path
from accuracy_report import report  # noqa: E402
import accuracy_postprocessing as pp  # noqa: E402

PLANS = {"default": "nnUNetPlans", "resencm": "nnUNetResEncUNetMPlans"}  # --plans: nnU-Net's default or ResEnc M
TASKS = {"icbm": {"dataset_id": 511, "name": "Dataset511_ICBM152Tissue2D", "configuration": "2d"},
         "parcellation": {"dataset_id": 514, "name": "Dataset514_NMMParcellation2D", "configuration": "2d"},
         "icbm3d": {"dataset_id": 513, "name": "Dataset513_ICBM152Tissue3D", "configuration": "3d_fullres"}}
SLABS_3D = 12  # slices per 3D case: ~15 cases with tissue, enough for 3 folds with a one-slab gap


def results_root(workdir: str, budget_tag: str, seed: int = 0) -> str:
    """nnUNet_results of one budget and seed: nnU-Net names result folders by trainer and fold only, so two budgets
    or two seeds of one trainer would otherwise overwrite each other's checkpoints (seed 0 keeps the plain name)."""
    return os.path.join(workdir, "results", budget_tag if seed == 0 else f"{budget_tag}_seed{seed}")


def task_environment(workdir: str, budget_tag: str, seed: int = 0) -> dict:
    """nnU-Net folders: raw and preprocessed shared by all runs; one results root per budget and seed."""
    env = dict(os.environ)
    env.update(nnUNet_raw=os.path.join(workdir, "raw"), nnUNet_preprocessed=os.path.join(workdir, "preprocessed"),
               nnUNet_results=results_root(workdir, budget_tag, seed))
    env.setdefault("nnUNet_def_n_proc", "1")
    env.setdefault("nnUNet_n_proc_DA", "0")  # single process: seeded augmentation, no worker-pool overhead
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[key], exist_ok=True)
    return env


def nnunet_command(name: str) -> str:
    """nnU-Net's console script next to this interpreter (a venv that is not activated is not on PATH)."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.isfile(candidate) else name


def prepare_task(task: str, workdir: str, downsample: int, plans: str = "default") -> None:
    """Build, plan and preprocess the task's dataset once (and the ResEnc M plans when asked), write slab folds."""
    env = task_environment(workdir, "prepare")
    spec = TASKS[task]
    pre = os.path.join(env["nnUNet_preprocessed"], spec["name"])
    if plans == "resencm" and not os.path.isfile(os.path.join(pre, PLANS["resencm"] + ".json")):
        prepare_task(task, workdir, downsample)
        planning_env = {**env, "nnUNet_n_proc_DA": "1"}
        subprocess.run([nnunet_command("nnUNetv2_plan_experiment"), "-d", str(spec["dataset_id"]), "-pl",
                        "nnUNetPlannerResEncM"], check=True, env=planning_env)
        if not _shares_preprocessed_data(pre, PLANS["resencm"], PLANS["default"], spec["configuration"]):
            subprocess.run([nnunet_command("nnUNetv2_preprocess"), "-d", str(spec["dataset_id"]), "-plans_name",
                            PLANS["resencm"], "-c", spec["configuration"], "-np", "1"], check=True, env=planning_env)
    if os.path.isfile(os.path.join(pre, "splits_final.json")):
        return
    from nnunetv2_allukan.data.templates import slab_splits, write_splits
    folds = dict(n_folds=5, gap=3)  # 2D: neighbouring slices are near-duplicates; 3 slices either side are left out
    if task == "icbm3d":
        from nnunetv2_allukan.data.templates import make_icbm152_3d
        info = make_icbm152_3d(env["nnUNet_raw"], spec["dataset_id"], downsample=downsample, slab_thickness=SLABS_3D)
        folds = dict(n_folds=3, gap=1)  # 3D cases are disjoint slabs; the slab touching a validation slab is left out
    elif task == "icbm":
        from nnunetv2_allukan.data.templates import make_icbm152_2d
        info = make_icbm152_2d(env["nnUNet_raw"], spec["dataset_id"], downsample=downsample, cross_template=False)
    else:
        from nnunetv2_allukan.data.parcellation import make_parcellation_2d
        info = make_parcellation_2d(env["nnUNet_raw"], spec["dataset_id"], downsample=downsample)
    subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(spec["dataset_id"]), "-c",
                    spec["configuration"], "-np", "1", "-npfp", "1"],
                   check=True, env={**env, "nnUNet_n_proc_DA": "1"})  # preprocessing needs >= 1
    write_splits(pre, slab_splits(info["cases"], **folds))


def _shares_preprocessed_data(pre: str, plans: str, other: str, configuration: str) -> bool:
    """True when ``plans`` reads the data ``other`` already preprocessed (nnU-Net's ResEnc planners keep the default
    plans' data identifier). Preprocessing again would rewrite that folder under any training reading it."""
    def identifier(name):
        with open(os.path.join(pre, name + ".json")) as f:
            return json.load(f)["configurations"][configuration].get("data_identifier")

    folder = os.path.join(pre, identifier(other) or "")
    return identifier(plans) == identifier(other) and os.path.isdir(folder) and bool(os.listdir(folder))


def budget_tag(epochs: int, iterations: int, plans: str = "default", batch_size: int | None = None) -> str:
    return (f"e{epochs}x{iterations}" + ("" if plans == "default" else f"_{plans}")
            + ("" if batch_size is None else f"_bs{batch_size}"))


def result_path(workdir, task, tag, trainer, fold, seed) -> str:
    return os.path.join(workdir, "runs", task, tag, trainer, f"fold_{fold}_seed{seed}.json")


def seeded_trainer(task: str, trainer_name: str, fold: int, seed: int, preprocessed: str,
                   plans_name: str = "default", batch_size: int | None = None):
    """(trainer, the plans' own batch size): every RNG seeded, then nnU-Net's trainer built from the task's plans,
    with ``batch_size`` in place of the planned one when given (e.g. ResEnc M at the default plans' batch: its
    planner fills a GPU's memory). Runs build their trainer here, and ``initial_network`` rebuilds a run's starting
    point through the same steps."""
    import random

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunetv2_allukan.tools.checkpoints import trainer_class

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    pre = os.path.join(preprocessed, TASKS[task]["name"])
    plans = load_json(os.path.join(pre, PLANS[plans_name] + ".json"))
    configuration = TASKS[task]["configuration"]
    planned_batch = plans["configurations"][configuration]["batch_size"]
    if batch_size is not None:
        plans["configurations"][configuration]["batch_size"] = batch_size
    plans["continue_training"] = False
    trainer = trainer_class(trainer_name)(plans, configuration, fold, load_json(os.path.join(pre, "dataset.json")),
                                          device=torch.device("cpu"))
    return trainer, planned_batch


def fold_dice(summary: dict) -> dict:
    """The Dice fields of a run record from nnU-Net's validation ``summary.json``.

    ``foreground_mean`` is the mean over the foreground classes **present in the held-out fold's reference** (in at
    least one case), each class's Dice as nnU-Net computes it (per case, then the mean over the cases where it is
    defined). A slab fold can lack a structure altogether (the inferior slab of the parcellation task has no
    frontal, parietal or occipital cortex and no deep grey matter); nnU-Net's ``foreground_mean`` then scores such a
    class 0 if any voxel of it was predicted anywhere and NaN (so NaN overall) if none was, which measures stray
    voxels rather than segmentation. Those classes are listed instead (``absent_classes_predicted``), and nnU-Net's
    own number is kept as ``nnunet_foreground_mean``."""
    dice = {k: float(v["Dice"]) for k, v in summary["mean"].items()}
    cases = [c["metrics"] for c in summary["metric_per_case"]]
    present = [k for k in dice if any(c[k]["n_ref"] > 0 for c in cases)]
    absent_predicted = [k for k in dice if k not in present and any(c[k]["n_pred"] > 0 for c in cases)]
    return {"dice": dice,
            "foreground_mean": sum(dice[k] for k in present) / len(present) if present else float("nan"),
            "classes_present": sorted(present, key=label_order),
            "absent_classes_predicted": sorted(absent_predicted, key=label_order),
            "nnunet_foreground_mean": float(summary["foreground_mean"]["Dice"])}


def resume_cut_run(trainer) -> int | None:
    """Continue a run that was cut off (a session ended) from its ``checkpoint_latest.pth``, as nnU-Net's ``--c``
    does; returns the epoch it resumes at, or None for a fresh start.

    nnU-Net deletes ``checkpoint_latest.pth`` when a run finishes, so its presence means a cut run (``train_one``
    saves it every 5 epochs). nnU-Net does not save the RNG streams: a resumed run continues the same optimisation
    but draws different batches and augmentations than an uninterrupted one would, and its record says so."""
    latest = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    if not os.path.isfile(latest) or os.path.isfile(os.path.join(trainer.output_folder, "checkpoint_final.pth")):
        return None
    trainer.load_checkpoint(latest)
    return trainer.current_epoch


def train_one(task: str, trainer_name: str, fold: int, epochs: int, iterations: int, seed: int, workdir: str,
              threads: int, plans_name: str = "default", batch_size: int | None = None) -> dict:
    """One run in this process (called in a subprocess by ``run``): nnU-Net's training + final validation."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunetv2_allukan.trainers.recipes import spline_optimizer_of

    torch.set_num_threads(threads)
    trainer, planned_batch = seeded_trainer(task, trainer_name, fold, seed, str(nnUNet_preprocessed), plans_name,
                                            batch_size)
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = 5
    trainer.save_every = 5
    resumed_at = resume_cut_run(trainer)
    if resumed_at is not None:
        print(f"[accuracy] resuming the cut run at epoch {resumed_at}", flush=True)
    started = time.time()
    trainer.run_training()
    train_seconds = time.time() - started
    trainer.perform_actual_validation(False)
    summary = load_json(os.path.join(trainer.output_folder, "validation", "summary.json"))
    log = trainer.logger.my_fantastic_logging if hasattr(trainer.logger, "my_fantastic_logging") else \
        trainer.logger.local_logger.my_fantastic_logging
    ka_stats = ka_statistics_of(os.path.join(trainer.output_folder, "ka_statistics.jsonl"))
    epoch_seconds = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    if resumed_at is not None:  # this process trained only the last epochs: count every epoch's own time
        train_seconds = sum(epoch_seconds)
    return {"task": task, "trainer": trainer_name, "fold": fold, "seed": seed, "epochs": epochs,
            "iterations_per_epoch": iterations, "iterations": epochs * iterations,
            **fold_dice(summary),
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "train_seconds": train_seconds, "median_epoch_seconds": statistics.median(epoch_seconds),
            "curves": {"train_loss": [float(v) for v in log["train_losses"]],
                       "val_loss": [float(v) for v in log["val_losses"]],
                       "ema_pseudo_dice": [float(v) for v in log["ema_fg_dice"]],
                       "epoch_seconds": epoch_seconds},
            "ka_statistics": ka_stats, "threads": threads, "torch": torch.__version__,
            "batch_size": trainer.configuration_manager.batch_size, "planned_batch_size": planned_batch,
            "resumed_at_epoch": resumed_at, "spline_optimizer": spline_optimizer_of(trainer),
            "date": time.strftime("%Y-%m-%d"), "machine": machine()}


def machine() -> dict:
    """Where a run trained: wall times are comparable only between runs of one machine (the CPU machines of
    different sessions differ in speed)."""
    import platform

    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    boot = None  # the project's machines share one host name; the boot id tells one machine (session) from another
    if os.path.isfile("/proc/sys/kernel/random/boot_id"):
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    return {"boot_id": boot or platform.node(), "host": platform.node(), "cpu": cpu, "cores": os.cpu_count()}


def _stats_summary(entry: dict) -> dict:
    """One line of ``ka_statistics.jsonl`` as a run record keeps it: medians over the KA layers, the largest spline
    motion (the layer whose phi moved most), the gradient-norm statistics and, where that epoch measured it, the
    Grad-Free Spline's gradient fidelity."""
    layers = list(entry["layers"].values())

    def median(key):
        values = [l[key] for l in layers if l.get(key) is not None]
        return statistics.median(values) if values else None

    moved = [l["spline_change"] for l in layers if l.get("spline_change") is not None]
    fidelity = entry.get("gradient_fidelity") or {}
    return {"epoch": entry["epoch"], "median_coef_norm": median("coef_norm"), "median_base_weight": median("base_weight"),
            "median_max_spline_slope": median("max_spline_slope"), "median_outside_grid": median("outside_grid"),
            "median_spline_change": median("spline_change"), "max_spline_change": max(moved) if moved else None,
            "median_base_weight_change": median("base_weight_change"),
            "fidelity_overall": fidelity.get("overall"),
            "grad_norm_mean": entry["grad_norm"]["mean"], "clipped_fraction": entry["grad_norm"]["clipped_fraction"],
            "share_of_squared_norm": entry["grad_norm"]["share_of_squared_norm"]}


def ka_statistics_of(stats_file: str) -> dict | None:
    """The first and last epoch's summary (``_stats_summary``) of a fold's ``ka_statistics.jsonl``, if any."""
    if not os.path.isfile(stats_file):
        return None
    with open(stats_file) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return {"first": _stats_summary(lines[0]), "last": _stats_summary(lines[-1])} if lines else None


def run(args) -> int:
    workdir = os.path.abspath(args.workdir)
    prepare_task(args.task, workdir, args.downsample, args.plans)
    tag = budget_tag(args.epochs, args.iterations, args.plans, args.batch_size)
    failed = []
    for seed in args.seeds:
        env = task_environment(workdir, tag, seed)
        for fold in args.folds:
            for trainer in args.trainers:
                out = result_path(workdir, args.task, tag, trainer, fold, seed)
                if os.path.isfile(out):
                    print(f"[accuracy] done already: {out}", flush=True)
                    continue
                print(f"[accuracy {time.strftime('%H:%M:%S')}] {args.task} {trainer} fold {fold} seed {seed} "
                      f"{tag}", flush=True)
                cmd = [sys.executable, os.path.abspath(__file__), "train-one", "--task", args.task, "--trainer",
                       trainer, "--fold", str(fold), "--epochs", str(args.epochs), "--iterations",
                       str(args.iterations), "--seed", str(seed), "--workdir", workdir, "--threads",
                       str(args.threads), "--plans", args.plans, "--out", out]
                if args.batch_size is not None:
                    cmd += ["--batch-size", str(args.batch_size)]
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with open(out.replace(".json", ".log"), "w") as log:
                    code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if code != 0:
                    failed.append((trainer, fold, seed))
                    print(f"[accuracy] FAILED ({code}): see {out.replace('.json', '.log')}", flush=True)
                else:
                    with open(out) as f:
                        r = json.load(f)
                    print(f"[accuracy] {trainer} fold {fold}: foreground Dice {r['foreground_mean']:.4f} "
                          f"({r['train_seconds']:.0f} s)", flush=True)
    if failed:
        print(f"[accuracy] {len(failed)} run(s) failed: {failed}", flush=True)
    return 1 if failed else 0


def train_one_command(args) -> int:
    result = train_one(args.task, args.trainer, args.fold, args.epochs, args.iterations, args.seed,
                       os.path.abspath(args.workdir), args.threads, args.plans, args.batch_size)
    result["plans"] = PLANS[args.plans]
    result["configuration"] = TASKS[args.task]["configuration"]
    result["command"] = (f"python benchmarks/accuracy.py run --task {args.task} --trainers {args.trainer} "
                         f"--folds {args.fold} --epochs {args.epochs} --iterations {args.iterations} "
                         f"--seeds {args.seed} --plans {args.plans}"
                         + ("" if args.batch_size is None else f" --batch-size {args.batch_size}"))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def rescore(args) -> int:
    """Rewrite the Dice fields of every run record from its fold's ``validation/summary.json`` (``fold_dice``), and
    its KA statistics from the fold's ``ka_statistics.jsonl`` (``ka_statistics_of``), for records written before
    the present definitions; nothing is retrained."""
    workdir = os.path.abspath(args.workdir)
    changed = 0
    for path in sorted(glob.glob(os.path.join(workdir, "runs", "*", "*", "*", "*.json"))):
        with open(path) as f:
            r = json.load(f)
        tag = os.path.basename(os.path.dirname(os.path.dirname(path)))
        configuration = r.get("configuration", TASKS[r["task"]]["configuration"])
        summary_file = os.path.join(fold_folder(results_root(workdir, tag, r["seed"]), TASKS[r["task"]]["name"],
                                                r["trainer"], r.get("plans", PLANS["default"]), configuration,
                                                r["fold"]), "validation", "summary.json")
        if not os.path.isfile(summary_file):
            print(f"[accuracy] kept as recorded (no {summary_file}): {path}", flush=True)
            continue
        with open(summary_file) as f:
            fields = fold_dice(json.load(f))
        if json.dumps(fields["dice"], sort_keys=True) != json.dumps(r["dice"], sort_keys=True):
            # a later run of the same trainer, fold and budget wrote that folder (e.g. another thread count)
            print(f"[accuracy] kept as recorded (the summary belongs to another run): {path}", flush=True)
            continue
        stats = ka_statistics_of(os.path.join(os.path.dirname(os.path.dirname(summary_file)), "ka_statistics.jsonl"))
        if stats is not None and r.get("ka_statistics") is not None:  # the summary's fields may have grown since
            fields["ka_statistics"] = stats
        if any(json.dumps(r.get(k)) != json.dumps(v) for k, v in fields.items()):  # NaN-safe
            old = r["foreground_mean"]
            r.update(fields)
            with open(path, "w") as f:
                json.dump(r, f, indent=1)
            changed += 1
            print(f"[accuracy] {path}: foreground Dice {old:.4f} -> {r['foreground_mean']:.4f}"
                  + (" (and its KA statistics)" if "ka_statistics" in fields else ""), flush=True)
    print(f"[accuracy] {changed} record(s) rescored", flush=True)
    return 0


def class_sizes(workdir: str) -> dict:
    """Per task whose raw dataset is in the work folder: each foreground label's name and share of the labelled
    foreground voxels over all its cases (the size of a structure, for the report's per-class table)."""
    import nibabel
    import numpy as np
    sizes = {}
    for task, spec in TASKS.items():
        folder = os.path.join(workdir, "raw", spec["name"])
        if not os.path.isfile(os.path.join(folder, "dataset.json")):
            continue
        with open(os.path.join(folder, "dataset.json")) as f:
            dataset = json.load(f)
        # labels only (regions, given as lists, overlap; the ignore label is no class)
        names = {str(v): k for k, v in dataset["labels"].items() if isinstance(v, int) and v != 0 and k != "ignore"}
        counts = dict.fromkeys(names, 0)
        for path in sorted(glob.glob(os.path.join(folder, "labelsTr", "*" + dataset["file_ending"]))):
            values, n = np.unique(np.asarray(nibabel.load(path).dataobj), return_counts=True)
            for v, c in zip(values.tolist(), n.tolist()):
                if str(int(v)) in counts:
                    counts[str(int(v))] += c
        total = sum(counts.values())
        if total:
            sizes[task] = {k: {"name": names[k], "share": c / total} for k, c in counts.items()}
    return sizes


def report_command(args) -> int:
    return report(args, class_sizes(os.path.abspath(args.workdir)))


def postprocessing(args) -> int:
    """nnU-Net's own postprocessing decided on the finished folds of each trainer (``find_best_configuration``,
    ensembling off) and the false positives before and after it (accuracy_postprocessing.py); writes
    ``postprocessing_<task>_<budget>.json/.md`` to ``--out``. Every fold must have finished for every trainer."""
    workdir = os.path.abspath(args.workdir)
    task = TASKS[args.task]
    tag = budget_tag(args.epochs, args.iterations, args.plans, args.batch_size)
    env = task_environment(workdir, tag, args.seed)
    plans = PLANS[args.plans]
    for trainer in args.trainers:
        for fold in args.folds:
            summary = os.path.join(fold_folder(env["nnUNet_results"], task["name"], trainer, plans,
                                               task["configuration"], fold), "validation", "summary.json")
            if not os.path.isfile(summary):
                raise SystemExit(f"[accuracy] {trainer} fold {fold} has no finished validation ({summary}); run "
                                 f"it first: python benchmarks/accuracy.py run --task {args.task} --trainers "
                                 f"{trainer} --folds {fold} --epochs {args.epochs} --iterations {args.iterations} "
                                 f"--seeds {args.seed} --workdir {args.workdir}")
    pre = os.path.join(env["nnUNet_preprocessed"], task["name"])
    with open(os.path.join(pre, "splits_final.json")) as f:
        splits = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        dataset = json.load(f)
    file_ending = dataset["file_ending"]
    fold_cases = pp.with_file_ending(pp.fold_cases_from_splits(splits, args.folds), file_ending)
    table = {"task": args.task, "budget": tag, "folds": args.folds, "seed": args.seed,
             "labels": {k: v for k, v in dataset["labels"].items() if v != 0},
             "command": (f"python benchmarks/accuracy.py postprocessing --task {args.task} --trainers "
                         f"{' '.join(args.trainers)} --folds {' '.join(map(str, args.folds))} --epochs {args.epochs} "
                         f"--iterations {args.iterations} --seed {args.seed} --plans {args.plans}"
                         + ("" if args.batch_size is None else f" --batch-size {args.batch_size}")
                         + " --workdir W --out docs/accuracy_results"),
             "trainers": {}}
    for trainer in args.trainers:
        print(f"[accuracy] {trainer}: nnU-Net's find_best_configuration on folds {args.folds}", flush=True)
        pp.run_find_best_configuration(nnunet_command("nnUNetv2_find_best_configuration"), task["dataset_id"],
                                       task["configuration"], trainer, plans, args.folds, env)
        folder = pp.crossval_folder(env["nnUNet_results"], task["name"], trainer, plans, task["configuration"],
                                    args.folds)
        table["trainers"][trainer] = pp.trainer_record(folder, fold_cases)
    markdown = pp.markdown(table)
    print(markdown, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"postprocessing_{args.task}_{tag}")
        with open(stem + ".json", "w") as f:
            json.dump(table, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown)
    return 0


def initial_network(task: str, trainer_name: str, fold: int, seed: int, workdir: str, plans_name: str = "default",
                    batch_size: int | None = None):
    """The network a run of ``train_one`` started from: the same ``seeded_trainer``, then nnU-Net's ``initialize``
    (which builds the network), without training; results go to a scratch folder."""
    import tempfile

    os.environ["nnUNet_results"] = tempfile.mkdtemp()
    trainer, _ = seeded_trainer(task, trainer_name, fold, seed, os.path.join(workdir, "preprocessed"), plans_name,
                                batch_size)
    trainer.initialize()
    return trainer.network


def spline_motion(args) -> int:
    """How far every KA layer's phi moved from its initialisation to the end of finished runs (per layer max over
    the grid of |S(x) - S_0(x)| and |w_b - w_b0|), from each run's ``checkpoint_final.pth``."""
    from nnunetv2_allukan.tools.checkpoints import load_network
    from nnunetv2_allukan.trainers.statistics import initial_splines, ka_layer_snapshot

    workdir = os.path.abspath(args.workdir)
    os.environ.setdefault("nnUNet_preprocessed", os.path.join(workdir, "preprocessed"))
    os.environ.setdefault("nnUNet_raw", os.path.join(workdir, "raw"))
    tag = budget_tag(args.epochs, args.iterations, args.plans, args.batch_size)
    spec = TASKS[args.task]
    table = {}
    for trainer_name in args.trainers:
        folder = fold_folder(results_root(workdir, tag, args.seed), spec["name"], trainer_name, PLANS[args.plans],
                             spec["configuration"], args.fold)
        final, _ = load_network(os.path.join(folder, "checkpoint_final.pth"))
        start = initial_splines(initial_network(args.task, trainer_name, args.fold, args.seed, workdir, args.plans,
                                                args.batch_size))
        table[trainer_name] = ka_layer_snapshot(final, start)
    layers = list(next(iter(table.values())))
    lines = [f"Spline motion, {args.task} fold {args.fold} seed {args.seed}, {tag}: max over the grid of "
             "|S(x) - S_0(x)| per KA layer (|w_b - w_b0| in brackets)", "",
             "| KA layer | " + " | ".join(args.trainers) + " |", "|---|" + "---|" * len(args.trainers)]
    for name in layers + ["median", "max"]:
        cells = []
        for t in args.trainers:
            if name in ("median", "max"):
                f = statistics.median if name == "median" else max
                cells.append(f"{f(v['spline_change'] for v in table[t].values()):.3f} "
                             f"({f(v['base_weight_change'] for v in table[t].values()):.3f})")
            else:
                v = table[t][name]
                cells.append(f"{v['spline_change']:.3f} ({v['base_weight_change']:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"spline_motion_{args.task}_{tag}_fold{args.fold}")
        with open(stem + ".md", "w") as f:
            f.write(text)
        with open(stem + ".json", "w") as f:
            json.dump(table, f, indent=1)
    return 0


def _finished_run_arguments(p, out_stem: str) -> None:
    """The options that find finished runs (seed, budget, plans, work folder) and where their tables go, for the
    commands that read runs (spline-motion, postprocessing)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--iterations", type=int, default=25)
    p.add_argument("--plans", choices=sorted(PLANS), default="default")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None, help=f"folder for {out_stem}_*.md/.json (default: print only)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train (trainer x fold x seed) runs that are not finished yet")
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--trainers", nargs="+", required=True)
    p.add_argument("--folds", type=int, nargs="+", default=[1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    p.add_argument("--downsample", type=int, default=3, help="in-plane voxel size in mm (the dataset is built "
                                                                  "once, at the first run's value)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plans", choices=sorted(PLANS), default="default",
                   help="nnU-Net's default plans or the ResEnc M preset (planned on first use)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="replace the plans' batch size (recorded in each run and in the budget folder's name)")
    p.add_argument("--workdir", required=True)
    p.set_defaults(func=run)
    p = sub.add_parser("train-one", help=argparse.SUPPRESS)
    for name, kind in (("--task", str), ("--trainer", str), ("--fold", int), ("--epochs", int),
                       ("--iterations", int), ("--seed", int), ("--workdir", str), ("--threads", int), ("--out", str)):
        p.add_argument(name, type=kind, required=True)
    p.add_argument("--plans", choices=sorted(PLANS), default="default")
    p.add_argument("--batch-size", type=int, default=None)
    p.set_defaults(func=train_one_command)
    p = sub.add_parser("spline-motion", help="how far each KA layer's phi moved from its initialisation in "
                                             "finished runs (from checkpoint_final.pth)")
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--trainers", nargs="+", required=True)
    p.add_argument("--fold", type=int, required=True)
    _finished_run_arguments(p, "spline_motion")
    p.set_defaults(func=spline_motion)
    p = sub.add_parser("rescore", help="recompute the Dice fields of the run records from nnU-Net's validation "
                                       "summaries (after a change of definition; no training)")
    p.add_argument("--workdir", required=True)
    p.set_defaults(func=rescore)
    p = sub.add_parser("postprocessing", help="nnU-Net's postprocessing on finished folds, and the false "
                                              "positives (absent classes predicted) before and after it")
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--trainers", nargs="+", required=True)
    p.add_argument("--folds", type=int, nargs="+", required=True)
    _finished_run_arguments(p, "postprocessing")
    p.set_defaults(func=postprocessing)
    p = sub.add_parser("report", help="tables and plots of every finished run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default="docs/accuracy_results")
    p.set_defaults(func=report_command)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
