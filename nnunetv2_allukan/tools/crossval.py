"""``nnunetv2-allukan crossval``: run and compare nnU-Net cross-validations of several trainers.

Trains (``nnUNetv2_train``) every trainer x fold that is not finished yet, resuming interrupted folds with
``--c``; ``--dry-run`` prints the commands instead (e.g. for a cluster scheduler). Then it collects nnU-Net's
per-fold ``validation/summary.json`` and reports per trainer: mean +- std Dice per label and foreground
mean, the per-fold table, paired differences to ``--ref`` (Wilcoxon signed-rank p-value with >= 5 folds),
parameter count and median seconds per epoch (from the logging nnU-Net stores in its checkpoints).
Writes a terminal table, Markdown, CSV, JSON and a box plot PNG. Missing folds are listed, never dropped
silently; a training run that failed makes the command exit with code 1 after the report of what did finish.
Region-based datasets (``regions_class_order``) are reported per region, under nnU-Net's keys such as "(1, 2)".
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys


class CrossvalError(Exception):
    pass


def label_order(key: str) -> tuple:
    """Sort key for nnU-Net's per-class keys in summary.json: labels ("1") first by value, then regions ("(1, 2)"),
    which nnU-Net writes for region-based datasets (``regions_class_order``), by their labels."""
    text = key.strip()
    if text.lstrip("-").isdigit():
        return (0, (int(text),))
    return (1, tuple(int(v) for v in text.strip("()").split(",") if v.strip()))


def sorted_labels(keys) -> list[str]:
    return sorted(set(keys), key=label_order)


def fold_folder(results_root, dataset_name, trainer, plans, configuration, fold) -> str:
    return os.path.join(results_root, dataset_name, f"{trainer}__{plans}__{configuration}", f"fold_{fold}")


def fold_state(folder: str) -> str:
    if os.path.isfile(os.path.join(folder, "validation", "summary.json")) and \
            os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
        return "done"
    if os.path.isfile(os.path.join(folder, "checkpoint_latest.pth")) or \
            os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
        return "resumable"
    return "missing"


def train_command(dataset, configuration, trainer, fold, plans, device, extra) -> list[str]:
    cmd = ["nnUNetv2_train", str(dataset), configuration, str(fold), "-tr", trainer, "-p", plans]
    if device:
        cmd += ["-device", device]
    return cmd + list(extra)


def parameter_count(state_dict: dict) -> int:
    """Floating-point values of a network's state dict, each tensor counted once. A state dict names one tensor
    under every module that holds it: nnU-Net's PlainConvUNet lists its encoder again under ``decoder.encoder`` and
    every conv again under ``all_modules``, so summing its entries counted the CNN's 1.93 M parameters as 6.03 M
    (tensors loaded from one checkpoint keep sharing their storage, which identifies them)."""
    seen, total = set(), 0
    for value in state_dict.values():
        if not value.is_floating_point():
            continue
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if key not in seen:
            seen.add(key)
            total += value.numel()
    return int(total)


def _fold_record(folder: str) -> dict:
    import torch

    with open(os.path.join(folder, "validation", "summary.json")) as f:
        summary = json.load(f)
    record = {"dice": {k: float(v["Dice"]) for k, v in summary["mean"].items()},
              "foreground_mean": float(summary["foreground_mean"]["Dice"]), "params": None,
              "seconds_per_epoch": None, "epochs": None}
    checkpoint = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    record["params"] = parameter_count(checkpoint["network_weights"])
    logging = checkpoint.get("logging", {})
    starts, ends = logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", [])
    durations = [e - s for s, e in zip(starts, ends)]
    if durations:
        record["seconds_per_epoch"] = float(statistics.median(durations))
        record["epochs"] = len(durations)
    return record


def collect(results_root, dataset_name, trainers, plans, configuration, folds) -> dict:
    out = {}
    for trainer in trainers:
        per_fold, missing = {}, []
        for fold in folds:
            folder = fold_folder(results_root, dataset_name, trainer, plans, configuration, fold)
            if fold_state(folder) == "done":
                per_fold[fold] = _fold_record(folder)
            else:
                missing.append(fold)
        out[trainer] = {"folds": per_fold, "missing_folds": missing}
    return out


def summarise(collected: dict, ref: str | None) -> dict:
    from scipy.stats import wilcoxon

    summary = {}
    for trainer, data in collected.items():
        folds = data["folds"]
        labels = sorted_labels(k for r in folds.values() for k in r["dice"])
        stats = {}
        for key in labels + ["foreground_mean"]:
            values = [r["foreground_mean"] if key == "foreground_mean" else r["dice"][key] for r in folds.values()]
            stats[key] = {"mean": statistics.fmean(values) if values else None,
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None}
        params = [r["params"] for r in folds.values() if r["params"]]
        secs = [r["seconds_per_epoch"] for r in folds.values() if r["seconds_per_epoch"]]
        summary[trainer] = {"n_folds": len(folds), "missing_folds": data["missing_folds"], "dice": stats,
                            "params": params[0] if params else None,
                            "seconds_per_epoch": statistics.median(secs) if secs else None}
    if ref is not None:
        if ref not in collected:
            raise CrossvalError(f"--ref {ref} is not one of the trainers")
        ref_folds = collected[ref]["folds"]
        for trainer, data in collected.items():
            if trainer == ref:
                continue
            common = sorted(set(ref_folds) & set(data["folds"]))
            diffs = [data["folds"][f]["foreground_mean"] - ref_folds[f]["foreground_mean"] for f in common]
            p = None
            if len(diffs) >= 5 and any(d != 0 for d in diffs):
                p = float(wilcoxon(diffs).pvalue)
            summary[trainer]["vs_ref"] = {"ref": ref, "paired_folds": common,
                                          "mean_difference": statistics.fmean(diffs) if diffs else None,
                                          "wilcoxon_p": p}
    return summary


def _fmt(mean_std) -> str:
    if mean_std["mean"] is None:
        return "n/a"
    return f"{mean_std['mean']:.3f} ± {mean_std['std']:.3f}"


def markdown(summary: dict, collected: dict) -> str:
    labels = sorted_labels(k for s in summary.values() for k in s["dice"] if k != "foreground_mean")
    lines = ["| trainer | folds | " + " | ".join(f"Dice {l}" for l in labels) +
             " | foreground mean | Δ vs ref (p) | params | s/epoch |",
             "|---|---|" + "---|" * (len(labels) + 4)]
    for trainer, s in summary.items():
        vs = s.get("vs_ref")
        delta = "ref" if vs is None else (
            "n/a" if vs["mean_difference"] is None else
            f"{vs['mean_difference']:+.3f}" + (f" (p={vs['wilcoxon_p']:.3f})" if vs["wilcoxon_p"] is not None
                                               else " (p: <5 folds)"))
        params = f"{s['params']:,}" if s["params"] else "n/a"
        secs = f"{s['seconds_per_epoch']:.1f}" if s["seconds_per_epoch"] else "n/a"
        folds = f"{s['n_folds']}" + (f" (missing {s['missing_folds']})" if s["missing_folds"] else "")
        lines.append(f"| {trainer} | {folds} | " + " | ".join(_fmt(s["dice"][l]) for l in labels) +
                     f" | {_fmt(s['dice']['foreground_mean'])} | {delta} | {params} | {secs} |")
    lines += ["", "Per fold (foreground mean Dice):", "",
              "| trainer | " + " | ".join(f"fold {f}" for f in _all_folds(collected)) + " |",
              "|---|" + "---|" * len(_all_folds(collected))]
    for trainer, data in collected.items():
        cells = [f"{data['folds'][f]['foreground_mean']:.3f}" if f in data["folds"] else "missing"
                 for f in _all_folds(collected)]
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _all_folds(collected):
    return sorted({f for d in collected.values() for f in list(d["folds"]) + d["missing_folds"]})


def write_outputs(out_dir: str, summary: dict, collected: dict) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    md = markdown(summary, collected)
    path = os.path.join(out_dir, "crossval.md")
    with open(path, "w") as f:
        f.write(md + "\n")
    written.append(path)
    path = os.path.join(out_dir, "crossval.json")
    with open(path, "w") as f:
        json.dump({"summary": summary, "folds": collected}, f, indent=2)
    written.append(path)
    path = os.path.join(out_dir, "crossval_folds.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        labels = sorted_labels(k for d in collected.values() for r in d["folds"].values() for k in r["dice"])
        writer.writerow(["trainer", "fold", *[f"dice_{l}" for l in labels], "foreground_mean", "params",
                         "seconds_per_epoch"])
        for trainer, data in collected.items():
            for fold, r in sorted(data["folds"].items()):
                writer.writerow([trainer, fold, *[r["dice"].get(l) for l in labels], r["foreground_mean"],
                                 r["params"], r["seconds_per_epoch"]])
    written.append(path)
    path = os.path.join(out_dir, "crossval_boxplot.png")
    _boxplot(path, collected)
    written.append(path)
    return written


def _boxplot(path, collected):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(collected)
    data = [[r["foreground_mean"] for r in collected[n]["folds"].values()] for n in names]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.6))
    ax.boxplot([d if d else [float("nan")] for d in data], showmeans=True)
    for i, d in enumerate(data, start=1):
        ax.scatter([i] * len(d), d, s=14, color="k", zorder=3)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([n.replace("nnUNetTrainer", "") or "nnUNetTrainer" for n in names], rotation=20,
                       fontsize=8)
    ax.set_ylabel("foreground mean Dice per fold")
    ax.set_title("Cross-validation (nnU-Net validation folds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nnunetv2-allukan crossval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", dest="dataset", required=True)
    parser.add_argument("-c", dest="configuration", required=True)
    parser.add_argument("-tr", dest="trainers", nargs="+", required=True)
    parser.add_argument("-f", dest="folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("-p", dest="plans", default="nnUNetPlans")
    parser.add_argument("--ref", help="reference trainer for paired differences (default: the first)")
    parser.add_argument("-device", dest="device", default=None, help="passed to nnUNetv2_train")
    parser.add_argument("--collect-only", action="store_true", help="do not train, only report")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands, run nothing")
    parser.add_argument("--out", help="report folder (default: nnUNet_results/<dataset>/crossval_<config>)")
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="further nnUNetv2_train arguments (last on the line), e.g. --train-args --npz")
    args = parser.parse_args(argv)

    from .nnunet_commands import dataset_name, nnunet_executable, require_env, with_ext_trainer_path

    results_root = require_env("nnUNet_results")
    name = dataset_name(args.dataset)
    env = with_ext_trainer_path(dict(os.environ))
    failed = []  # training commands that failed: reported after the table, and the exit code says so
    if not args.collect_only:
        todo = []
        for trainer in args.trainers:
            for fold in args.folds:
                state = fold_state(fold_folder(results_root, name, trainer, args.plans, args.configuration, fold))
                if state == "done":
                    continue
                cmd = train_command(args.dataset, args.configuration, trainer, fold, args.plans, args.device,
                                    args.train_args)
                todo.append(cmd + (["--c"] if state == "resumable" else []))
        prefix = f'nnUNet_extTrainer="{env["nnUNet_extTrainer"]}" '
        for cmd in todo:
            if args.dry_run:
                print(prefix + " ".join(cmd))
                continue
            print(f"[crossval] $ {' '.join(cmd)}", flush=True)
            result = subprocess.run([nnunet_executable(cmd[0]), *cmd[1:]], env=env)
            if result.returncode != 0:
                failed.append(f"{' '.join(cmd)} (exit code {result.returncode})")
                print(f"[crossval] {' '.join(cmd)} failed with exit code {result.returncode}; continuing, the fold "
                      f"will be listed as missing", file=sys.stderr, flush=True)
        if args.dry_run:
            if not todo:
                print("# every requested fold is finished")
            return 0
    collected = collect(results_root, name, args.trainers, args.plans, args.configuration, args.folds)
    summary = summarise(collected, args.ref or args.trainers[0])
    print(markdown(summary, collected))
    out_dir = args.out or os.path.join(results_root, name, f"crossval_{args.configuration}")
    for path in write_outputs(out_dir, summary, collected):
        print(f"wrote {path}")
    missing = {t: d["missing_folds"] for t, d in collected.items() if d["missing_folds"]}
    if missing:
        print(f"missing folds (not finished): {missing}", file=sys.stderr)
    if failed:
        print(f"[crossval] {len(failed)} training run(s) failed (the report above shows what finished):\n  "
              + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0
