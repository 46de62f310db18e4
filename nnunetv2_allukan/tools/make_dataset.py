"""``nnunetv2-allukan make-dataset``: write a real-data nnU-Net raw dataset from files inside installed wheels.

The builders live in ``nnunetv2_allukan.data``; this command picks one, and for 2D slices also writes the
contiguous slab folds nnU-Net should use.
"""
from __future__ import annotations

import os

from ..data import parcellation, templates
from .nnunet_commands import require_env


def make_dataset(args) -> int:
    """The command, from the CLI's parsed arguments."""
    raw = args.raw or require_env("nnUNet_raw")
    if args.kind == "icbm2d":
        info = templates.make_icbm152_2d(raw, args.dataset_id or 501, downsample=args.downsample,
                                         cross_template=not args.no_cross_template, overwrite=args.overwrite)
    elif args.kind == "parcellation2d":
        info = parcellation.make_parcellation_2d(raw, args.dataset_id or 504, downsample=args.downsample,
                                                 overwrite=args.overwrite)
    else:
        info = templates.make_icbm152_3d(raw, args.dataset_id or 503, downsample=args.downsample,
                                         overwrite=args.overwrite)
    print(f"{info['folder']}: {len(info['cases'])} training cases, {len(info.get('test_cases', []))} test cases")
    if args.kind in ("icbm2d", "parcellation2d"):
        # Neighbouring slices are near-duplicates: nnU-Net's random folds would leak, so write slab folds.
        preprocessed = args.preprocessed or os.environ.get("nnUNet_preprocessed")
        if preprocessed:
            path = templates.write_splits(os.path.join(preprocessed, info["name"]),
                                          templates.slab_splits(info["cases"]))
            print(f"contiguous slab folds written to {path} (nnU-Net uses them instead of random folds)")
        else:
            print("nnUNet_preprocessed is not set: no splits_final.json written; nnU-Net's random folds would put "
                  "neighbouring (near-identical) slices on both sides")
    print(f"Next: nnUNetv2_plan_and_preprocess -d {info['dataset_id']} --verify_dataset_integrity")
    return 0
