"""Measure ALL U-KAN's optimiser recipes: the default (nnU-Net's SGD + poly, spline parameters by their own Adam),
nnU-Net's SGD for every parameter (the default before 0.2.0, ``_splineSGD``) and the U-KAN Adam + cosine recipe.

All recipes train the same AllUKAN (same seed, plans, fold, budget) in-process through nnU-Net's own trainer
loop; the score is nnU-Net's final validation Dice of the fold (validation/summary.json).

    python benchmarks/compare_optimizers.py --workdir /tmp/recipes --epochs 10 --iters 25

Without -d it builds the real ICBM152 2D tissue dataset (nilearn wheel, in-plane downsampled by --downsample so
a CPU can train it), plans it, and validates on contiguous slab folds (nnunetv2_allukan.data.templates).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("-d", dest="dataset", default=None, help="existing dataset id (needs nnUNet_* variables)")
    parser.add_argument("-c", dest="configuration", default="2d")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--val-iters", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--downsample", type=int, default=4)
    args = parser.parse_args()

    work = os.path.abspath(args.workdir)
    if args.dataset is None:
        for sub in ("raw", "preprocessed", "results"):
            os.makedirs(os.path.join(work, sub), exist_ok=True)
        os.environ.update(nnUNet_raw=os.path.join(work, "raw"), nnUNet_preprocessed=os.path.join(work, "preprocessed"),
                          nnUNet_results=os.path.join(work, "results"))
        dataset = "502"
        pre = os.path.join(work, "preprocessed", "Dataset502_ICBM152Tissue2D")
        if not os.path.isfile(os.path.join(pre, "splits_final.json")):
            from nnunetv2_allukan.data.templates import make_icbm152_2d, slab_splits, write_splits
            info = make_icbm152_2d(os.environ["nnUNet_raw"], int(dataset), downsample=args.downsample)
            env = {**os.environ, "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1"}
            subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", dataset, "-c", args.configuration, "-np", "1",
                            "-npfp", "1"], check=True, env=env)
            write_splits(pre, slab_splits(info["cases"]))
    else:
        dataset = args.dataset
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("nnUNet_def_n_proc", "1")

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunetv2_allukan.trainers import (nnUNetTrainerAllUKAN, nnUNetTrainerAllUKAN_AdamCosine,
                                           nnUNetTrainerAllUKAN_splineSGD)

    name = maybe_convert_to_dataset_name(dataset)
    rows = []
    for seed in args.seeds:
        for cls in (nnUNetTrainerAllUKAN, nnUNetTrainerAllUKAN_splineSGD, nnUNetTrainerAllUKAN_AdamCosine):
            torch.manual_seed(seed)
            np.random.seed(seed)
            plans = load_json(os.path.join(str(nnUNet_preprocessed), name, "nnUNetPlans.json"))
            plans["continue_training"] = False
            dataset_json = load_json(os.path.join(str(nnUNet_preprocessed), name, "dataset.json"))
            trainer = cls(plans, args.configuration, args.fold, dataset_json, device=torch.device("cpu"))
            trainer.num_epochs = args.epochs
            trainer.num_iterations_per_epoch = args.iters
            trainer.num_val_iterations_per_epoch = args.val_iters
            t0 = time.time()
            trainer.run_training()
            trainer.perform_actual_validation(False)
            summary = load_json(os.path.join(trainer.output_folder, "validation", "summary.json"))
            rows.append(dict(trainer=cls.__name__, seed=seed, epochs=args.epochs, iters=args.iters,
                             dice=float(summary["foreground_mean"]["Dice"]),
                             dice_per_class={k: v["Dice"] for k, v in summary["mean"].items()},
                             final_train_loss=float(trainer.logger.local_logger.my_fantastic_logging["train_losses"][-1]),
                             seconds=time.time() - t0))
            print(json.dumps(rows[-1]), flush=True)
    out = os.path.join(work, "optimizer_comparison.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=2)
    print("\n| trainer | seed | epochs x iters | val Dice (fg mean) | final train loss |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trainer']} | {r['seed']} | {r['epochs']}x{r['iters']} | {r['dice']:.3f} | "
              f"{r['final_train_loss']:.3f} |")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    sys.exit(main())
