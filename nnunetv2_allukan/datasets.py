"""Real, labelled brain data from files shipped inside public PyPI packages, as nnU-Net raw datasets.

* ICBM152 2009a (``nilearn`` wheel, BSD-3; MNI ICBM152 template, (c) McConnell Brain Imaging Centre, please
  cite Fonov et al. 2011/2009): T1 with grey/white-matter probability maps. Labels: 0 background, 1 grey
  matter, 2 white matter (the larger probability, where it exceeds 0.5).

The files are found on the installed package's path (``pip install nilearn``), never downloaded, and the
datasets are built at run time; nothing derived is committed. Imports no nnU-Net.

All slices come from one (average) brain, so neighbouring slices are near-duplicates: use the contiguous slab
splits of ``slab_splits`` (written as nnU-Net's ``splits_final.json``) rather than random folds.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

ICBM_FILES = {k: f"datasets/data/mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
TISSUE_LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}


class DatasetError(Exception):
    """A dataset cannot be built: missing package, clashing dataset id, bad arguments."""


def package_file(package: str, relative: str) -> str:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the Python package {package!r} is not installed; run: pip install {package}")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise DatasetError(f"{path} is missing from the installed {package!r}; reinstall it "
                           f"(pip install --force-reinstall {package})")
    return path


def load_icbm152():
    """(t1, gm_probability, wm_probability, affine); arrays float32 in RAS voxel order, 1 mm."""
    import nibabel as nib

    images = {k: nib.load(package_file("nilearn", rel)) for k, rel in ICBM_FILES.items()}
    t1 = np.asarray(images["t1"].dataobj, dtype=np.float32)
    gm = np.asarray(images["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(images["wm"].dataobj, dtype=np.float32) / 255.0
    return t1, gm, wm, images["t1"].affine


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    labels = np.zeros(gm.shape, np.uint8)
    labels[(gm > 0.5) & (gm >= wm)] = TISSUE_LABELS["grey_matter"]
    labels[(wm > 0.5) & (wm > gm)] = TISSUE_LABELS["white_matter"]
    return labels


def block_mean_2d(a: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool the first two axes by ``factor`` (cropping the remainder)."""
    if factor == 1:
        return a
    h, w = (a.shape[0] // factor) * factor, (a.shape[1] // factor) * factor
    a = a[:h, :w]
    return a.reshape(h // factor, factor, w // factor, factor, *a.shape[2:]).mean(axis=(1, 3))


def _dataset_folder(raw_root: str, dataset_id: int, name: str, overwrite: bool) -> tuple[str, bool]:
    """The folder to write to, and whether a complete copy is already there. Never touches another dataset."""
    if not 1 <= dataset_id <= 999:
        raise DatasetError(f"dataset id must be in 1..999, got {dataset_id}")
    prefix = f"Dataset{dataset_id:03d}_"
    folder = os.path.join(raw_root, prefix + name)
    if os.path.isdir(raw_root):
        clashes = [d for d in os.listdir(raw_root) if d.startswith(prefix) and d != prefix + name]
        if clashes:
            raise DatasetError(f"dataset id {dataset_id} is already used by {clashes[0]} in {raw_root}; "
                               f"choose another id")
    complete = os.path.isfile(os.path.join(folder, "dataset.json"))
    if complete and overwrite:
        import shutil
        shutil.rmtree(folder)
        complete = False
    return folder, complete


# nnU-Net treats the axis with the largest spacing as out of plane for 2D data; its own 2D reader uses 999.
SLICE_AXIS_SPACING = 999.0


def _write_slice(array_yx: np.ndarray, path: str, spacing_xy: tuple[float, float], origin_ras):
    """One axial slice as a single-slice NIfTI (x, y spacing kept; RAS origin converted to ITK's LPS)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array_yx[None])
    img.SetSpacing((float(spacing_xy[0]), float(spacing_xy[1]), SLICE_AXIS_SPACING))
    img.SetOrigin((-float(origin_ras[0]), -float(origin_ras[1]), float(origin_ras[2])))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, path)


def make_icbm152_2d(raw_root: str, dataset_id: int = 501, downsample: int = 2, min_brain_voxels: int = 200,
                    overwrite: bool = False) -> dict:
    """Axial ICBM152 slices as a 2D nnU-Net dataset (``DatasetXXX_ICBM152Tissue2D``).

    ``downsample`` average-pools in plane (2 -> 2 mm, 98x116) so that a CPU can train it. Slices with fewer
    than ``min_brain_voxels`` tissue voxels (at full resolution) are left out. Returns a description with the
    folder and the ordered case ids (inferior to superior) for ``slab_splits``.
    """
    if not isinstance(downsample, int) or downsample < 1:
        raise DatasetError(f"downsample must be an integer >= 1, got {downsample!r}")
    folder, complete = _dataset_folder(raw_root, dataset_id, "ICBM152Tissue2D", overwrite)
    if complete:
        with open(os.path.join(folder, "cases.json")) as f:
            return json.load(f)
    t1, gm, wm, affine = load_icbm152()
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    full_labels = tissue_labels(gm, wm)
    spacing = (float(abs(affine[0, 0])) * downsample, float(abs(affine[1, 1])) * downsample)
    cases = []
    for z in range(t1.shape[2]):
        if int((full_labels[:, :, z] > 0).sum()) < min_brain_voxels:
            continue
        image = block_mean_2d(t1[:, :, z], downsample)
        labels = tissue_labels(block_mean_2d(gm[:, :, z], downsample), block_mean_2d(wm[:, :, z], downsample))
        origin = affine @ np.array([(downsample - 1) / 2, (downsample - 1) / 2, z, 1.0])
        case = f"icbm_z{z:03d}"
        # arrays are (x, y); SimpleITK wants (y, x)
        _write_slice(image.T.astype(np.float32), os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"), spacing,
                     origin)
        _write_slice(labels.T, os.path.join(folder, "labelsTr", f"{case}.nii.gz"), spacing, origin)
        cases.append(case)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "T1"}, "labels": TISSUE_LABELS, "numTraining": len(cases),
                   "file_ending": ".nii.gz",
                   "description": "ICBM152 2009a sym T1, GM/WM from its probability maps (nilearn wheel). "
                                  "Built at run time; MNI ICBM152 licence: cite Fonov et al. 2011."}, f, indent=2)
    info = {"folder": folder, "dataset_id": dataset_id, "cases": cases, "downsample": downsample,
            "spacing": list(spacing)}
    with open(os.path.join(folder, "cases.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def slab_splits(ordered_cases: list[str], n_folds: int = 5, gap: int = 3) -> list[dict]:
    """nnU-Net splits of contiguous slabs: fold k validates on slab k, and trains on everything at least
    ``gap`` slices away from it, so that no near-duplicate neighbour of a validation slice is trained on."""
    n = len(ordered_cases)
    if n_folds < 2 or n < n_folds * (1 + 2 * gap):
        raise DatasetError(f"{n} cases are too few for {n_folds} slab folds with a gap of {gap}")
    bounds = np.linspace(0, n, n_folds + 1).round().astype(int)
    splits = []
    for k in range(n_folds):
        lo, hi = bounds[k], bounds[k + 1]
        val = ordered_cases[lo:hi]
        train = [c for i, c in enumerate(ordered_cases) if i < lo - gap or i >= hi + gap]
        splits.append({"train": train, "val": val})
    return splits


def write_splits(preprocessed_dataset_folder: str, splits: list[dict]) -> str:
    os.makedirs(preprocessed_dataset_folder, exist_ok=True)
    path = os.path.join(preprocessed_dataset_folder, "splits_final.json")
    with open(path, "w") as f:
        json.dump(splits, f, indent=2)
    return path
