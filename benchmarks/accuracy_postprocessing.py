"""False positives before and after nnU-Net's own postprocessing, for finished accuracy runs.

For each trainer, nnU-Net's ``nnUNetv2_find_best_configuration`` (ensembling off) pools the folds' validation
predictions, decides its postprocessing (keep the largest connected component, of all foreground and then per
class, where that raises Dice) and writes the postprocessed predictions with their ``summary.json``. From the two
summaries (pooled predictions, and postprocessed) this module counts, per fold:

* ``absent_classes_predicted``: classes absent from the fold's reference (every case) that the network predicts
  somewhere in the fold, as ``fold_dice`` in accuracy.py does for a single run;
* ``stray_case_classes``: (case, class) pairs where the class is absent from that case's reference and predicted
  in it: the finer count, also for classes present elsewhere in the fold;
* ``stray_voxels``: the predicted voxels of those pairs;
* ``foreground_mean``: mean Dice over the classes present in the fold's reference.

Used by ``accuracy.py postprocessing``; nothing here trains.
"""
from __future__ import annotations

import json
import os
import subprocess

from nnunetv2_allukan.tools.crossval import label_order


def case_name(entry: dict) -> str:
    return os.path.basename(entry["reference_file"])


def false_positive_counts(summary: dict, fold_cases: dict[int, set[str]]) -> dict:
    """Per fold (key: the fold's number as a string) the counts described in the module's docstring, from one of
    nnU-Net's ``summary.json`` files whose cases are the union of ``fold_cases``."""
    by_case = {case_name(e): e["metrics"] for e in summary["metric_per_case"]}
    out = {}
    for fold, cases in sorted(fold_cases.items()):
        missing = sorted(cases - set(by_case))
        if missing:
            raise ValueError(f"fold {fold}: {len(missing)} case(s) without a prediction in the summary, e.g. "
                             f"{missing[0]}; were all the fold's validations written?")
        metrics = [by_case[c] for c in sorted(cases)]
        classes = sorted(metrics[0], key=label_order)
        present = [k for k in classes if any(m[k]["n_ref"] > 0 for m in metrics)]
        absent_predicted = [k for k in classes if k not in present and any(m[k]["n_pred"] > 0 for m in metrics)]
        stray = [(m, k) for m in metrics for k in classes if m[k]["n_ref"] == 0 and m[k]["n_pred"] > 0]
        dice = {}
        for k in present:
            values = [m[k]["Dice"] for m in metrics if m[k]["n_ref"] + m[k]["n_pred"] > 0]
            dice[k] = sum(values) / len(values) if values else float("nan")
        out[str(fold)] = {"cases": len(cases),
                          "foreground_mean": sum(dice.values()) / len(dice) if dice else float("nan"),
                          "absent_classes_predicted": absent_predicted,
                          "stray_case_classes": len(stray),
                          "stray_voxels": int(sum(m[k]["n_pred"] for m, k in stray))}
    return out


def fold_cases_from_splits(splits: list[dict], folds: list[int]) -> dict[int, set[str]]:
    """Validation case file names of each fold, as nnU-Net writes them (identifier + file ending added later)."""
    return {f: set(splits[f]["val"]) for f in folds}


def with_file_ending(fold_cases: dict[int, set[str]], file_ending: str) -> dict[int, set[str]]:
    return {f: {c + file_ending for c in cases} for f, cases in fold_cases.items()}


def crossval_folder(results: str, dataset: str, trainer: str, plans: str, configuration: str,
                    folds: list[int]) -> str:
    return os.path.join(results, dataset, f"{trainer}__{plans}__{configuration}",
                        "crossval_results_folds_" + "_".join(str(f) for f in folds))


def run_find_best_configuration(command: str, dataset_id: int, configuration: str, trainer: str, plans: str,
                                folds: list[int], env: dict) -> None:
    subprocess.run([command, str(dataset_id), "-c", configuration, "-tr", trainer, "-p", plans,
                    "-f", *[str(f) for f in folds], "-np", "1", "--disable_ensembling"], env=env, check=True)


def trainer_record(folder: str, fold_cases: dict[int, set[str]]) -> dict:
    """Before/after counts of one trainer from its crossval folder, and the postprocessing nnU-Net chose."""
    with open(os.path.join(folder, "summary.json")) as f:
        before = json.load(f)
    with open(os.path.join(folder, "postprocessed", "summary.json")) as f:
        after = json.load(f)
    with open(os.path.join(folder, "postprocessing.json")) as f:
        chosen = json.load(f)
    return {"postprocessing": [{"function": fn, "kwargs": kw} for fn, kw in
                               zip(chosen["postprocessing_fns"], chosen["postprocessing_kwargs"])],
            "before": false_positive_counts(before, fold_cases),
            "after": false_positive_counts(after, fold_cases)}


def markdown(table: dict) -> str:
    """One row per trainer and fold: Dice and false positives before -> after postprocessing."""
    labels = table.get("labels", {})
    # nnU-Net's summary keys: "1" for a label, "(1, 2)" for a region (regions_class_order datasets)
    names = {str(tuple(v)) if isinstance(v, list) else str(v): k for k, v in labels.items()}
    foreground = sorted(v for v in labels.values() if isinstance(v, int))

    def classes(keys):
        return ", ".join(names.get(k, k) for k in keys) or "-"

    def step(label) -> str:
        """One postprocessing step's labels_or_regions: the first, over all foreground labels, or one class."""
        if isinstance(label, list) and sorted(label) == foreground and str(tuple(label)) not in names:
            return "the whole foreground"
        return classes([str(tuple(label)) if isinstance(label, list) else str(label)])

    lines = [f"# False positives before and after nnU-Net's postprocessing: {table['task']}, {table['budget']}, "
             f"folds {' '.join(str(f) for f in table['folds'])}, seed {table['seed']}", "",
             f"Reproduce: `{table['command']}`", "",
             "Per fold: mean Dice over the classes present in the fold; classes absent from the fold's reference but "
             "predicted in it; (case, class) pairs predicted where the case has none of the class, and their voxels. "
             "Before -> after nnU-Net's postprocessing (decided on the pooled folds).", "",
             "| trainer | postprocessing | fold | Dice | absent classes predicted | stray (case, class) | "
             "stray voxels |", "|---|---|---|---|---|---|---|"]
    for trainer, record in table["trainers"].items():
        # nnU-Net first tries the largest component of the whole foreground (a list of every label), then per class
        chosen = "; ".join(step(p["kwargs"].get("labels_or_regions")) for p in record["postprocessing"])
        for fold in record["before"]:
            b, a = record["before"][fold], record["after"][fold]
            lines.append(f"| {trainer} | {'largest component of: ' + chosen if chosen else 'none'} | {fold} | "
                         f"{b['foreground_mean']:.4f} -> {a['foreground_mean']:.4f} | "
                         f"{classes(b['absent_classes_predicted'])} -> {classes(a['absent_classes_predicted'])} | "
                         f"{b['stray_case_classes']} -> {a['stray_case_classes']} | "
                         f"{b['stray_voxels']} -> {a['stray_voxels']} |")
    return "\n".join(lines) + "\n"


__all__ = ["crossval_folder", "false_positive_counts", "fold_cases_from_splits", "markdown",
           "run_find_best_configuration", "trainer_record", "with_file_ending"]
