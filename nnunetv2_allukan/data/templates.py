"""Real, labelled brain data from files shipped inside public PyPI packages, as nnU-Net raw datasets.

* ICBM152 2009a (``nilearn`` wheel, BSD-3; MNI ICBM152 template, (c) McConnell Brain Imaging Centre, please
  cite Fonov et al. 2011/2009): T1 with grey/white-matter probability maps. Labels: 0 background, 1 grey
  matter, 2 white matter (the larger probability, where it exceeds 0.5).
* CAT12 T1 template with the neuromorphometrics atlas (``deepmriprep`` wheel, MIT package; the atlas is
  CC BY-NC, Neuromorphometrics Inc.): a second, independently made template, mapped to the same tissue
  classes and used only as a cross-template test set.

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


DESCRIPTION_FILE = "cases.json"


def write_description(folder: str, info: dict) -> dict:
    """Write ``cases.json`` (what was built, with which settings) atomically: it marks the dataset complete."""
    path = os.path.join(folder, DESCRIPTION_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)
    return info


def _dataset_folder(raw_root: str, dataset_id: int, name: str, overwrite: bool) -> tuple[str, bool]:
    """The folder to write to, and whether a complete copy is already there. Never touches another dataset.

    ``cases.json`` is the last file a builder writes (``write_description``): a folder without it is an interrupted
    build (e.g. stopped after dataset.json) and is rebuilt in place on the next call.
    """
    if not 1 <= dataset_id <= 999:
        raise DatasetError(f"dataset id must be in 1..999, got {dataset_id}")
    prefix = f"Dataset{dataset_id:03d}_"
    folder = os.path.join(raw_root, prefix + name)
    if os.path.isdir(raw_root):
        clashes = [d for d in os.listdir(raw_root) if d.startswith(prefix) and d != prefix + name]
        if clashes:
            raise DatasetError(f"dataset id {dataset_id} is already used by {clashes[0]} in {raw_root}; "
                               f"choose another id")
    complete = os.path.isfile(os.path.join(folder, DESCRIPTION_FILE))
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


def load_cat12_on_grid(affine_ras: np.ndarray, shape: tuple[int, int, int]):
    """The CAT12 T1 template and neuromorphometrics tissue masks (``deepmriprep`` wheel), resampled to a grid.

    Both templates live in MNI space, so world coordinates are shared: the 0.5 mm T1 is sampled trilinearly
    and the 1 mm label atlas by nearest neighbour at the world position of every target voxel. Atlas regions
    map to grey/white matter through the atlas csv (Vgm/Vwm columns); CSF and unlabelled voxels become
    background, as in the ICBM labels. Returns (t1, gm_mask, wm_mask) as float32 arrays of ``shape``.
    """
    import csv

    import nibabel as nib
    from scipy.ndimage import map_coordinates

    t1_img = nib.load(package_file("deepmriprep", "data/templates/Template_05mm_bet.nii.gz"))
    atlas_img = nib.load(package_file("deepmriprep", "data/templates/neuromorphometrics.nii.gz"))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0).reshape(3, -1)
    world = affine_ras[:3, :3] @ grid + affine_ras[:3, 3:4]

    def voxel_coords(img):
        inv = np.linalg.inv(img.affine)
        return inv[:3, :3] @ world + inv[:3, 3:4]

    t1 = map_coordinates(np.asarray(t1_img.dataobj, np.float32), voxel_coords(t1_img), order=1, cval=0.0)
    atlas = map_coordinates(np.asarray(atlas_img.dataobj), voxel_coords(atlas_img), order=0, cval=0)
    gm_ids, wm_ids = [], []
    with open(package_file("deepmriprep", "data/templates/neuromorphometrics.csv")) as f:
        for row in csv.DictReader(f, delimiter=";"):
            if row["Vgm"].strip() == "1":
                gm_ids.append(int(row["ROIid"]))
            elif row["Vwm"].strip() == "1":
                wm_ids.append(int(row["ROIid"]))
    gm = np.isin(atlas, gm_ids).astype(np.float32)
    wm = np.isin(atlas, wm_ids).astype(np.float32)
    return t1.reshape(shape), gm.reshape(shape), wm.reshape(shape)


def _write_axial_slices(folder: str, split: str, prefix: str, t1, gm, wm, affine, downsample: int,
                        min_brain_voxels: int, every: int = 1) -> list[str]:
    """Every ``every``-th axial slice with enough tissue as one 2D case in images<split>/labels<split>."""
    for sub in (f"images{split}", f"labels{split}"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    full_labels = tissue_labels(gm, wm)
    spacing = (float(abs(affine[0, 0])) * downsample, float(abs(affine[1, 1])) * downsample)
    cases = []
    for z in range(0, t1.shape[2], every):
        if int((full_labels[:, :, z] > 0).sum()) < min_brain_voxels or not t1[:, :, z].any():
            continue
        image = block_mean_2d(t1[:, :, z], downsample)
        labels = tissue_labels(block_mean_2d(gm[:, :, z], downsample), block_mean_2d(wm[:, :, z], downsample))
        origin = affine @ np.array([(downsample - 1) / 2, (downsample - 1) / 2, z, 1.0])
        case = f"{prefix}_z{z:03d}"
        # arrays are (x, y); SimpleITK wants (y, x)
        _write_slice(image.T.astype(np.float32), os.path.join(folder, f"images{split}", f"{case}_0000.nii.gz"),
                     spacing, origin)
        _write_slice(labels.T, os.path.join(folder, f"labels{split}", f"{case}.nii.gz"), spacing, origin)
        cases.append(case)
    return cases


def make_icbm152_2d(raw_root: str, dataset_id: int = 501, downsample: int = 2, min_brain_voxels: int = 200,
                    cross_template: bool = True, test_every: int = 3, overwrite: bool = False) -> dict:
    """Axial ICBM152 slices as a 2D nnU-Net dataset (``DatasetXXX_ICBM152Tissue2D``).

    ``downsample`` average-pools in plane (2 -> 2 mm, 98x116) so that a CPU can train it. Slices with fewer
    than ``min_brain_voxels`` tissue voxels (at full resolution) are left out. With ``cross_template`` (needs
    ``deepmriprep``) the CAT12 template's slices, resampled to the ICBM grid, become imagesTs/labelsTs: an
    independently made brain, used only for testing; every ``test_every``-th slice is kept (neighbours are
    near-duplicates and would only cost prediction time). Returns a description with the folder, the ordered
    training case ids (inferior to superior, for ``slab_splits``) and the test case ids.
    """
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
        raise DatasetError(f"downsample must be an integer >= 1, got {downsample!r}")
    folder, complete = _dataset_folder(raw_root, dataset_id, "ICBM152Tissue2D", overwrite)
    if complete:
        with open(os.path.join(folder, DESCRIPTION_FILE)) as f:
            info = json.load(f)
        if info["downsample"] != downsample or bool(info["test_cases"]) != cross_template:
            raise DatasetError(f"{folder} exists with downsample={info['downsample']} and "
                               f"{len(info['test_cases'])} cross-template test cases; pass overwrite=True "
                               f"(--overwrite) to rebuild it, or use another dataset id")
        return info
    t1, gm, wm, affine = load_icbm152()
    cases = _write_axial_slices(folder, "Tr", "icbm", t1, gm, wm, affine, downsample, min_brain_voxels)
    test_cases = []
    if cross_template:
        cat_t1, cat_gm, cat_wm = load_cat12_on_grid(affine, t1.shape)
        test_cases = _write_axial_slices(folder, "Ts", "cat12", cat_t1, cat_gm, cat_wm, affine, downsample,
                                         min_brain_voxels, every=test_every)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "T1"}, "labels": TISSUE_LABELS, "numTraining": len(cases),
                   "file_ending": ".nii.gz",
                   "description": "ICBM152 2009a sym T1 with GM/WM from its probability maps (nilearn wheel); "
                                  "test: CAT12 template with neuromorphometrics tissue (deepmriprep wheel). "
                                  "Built at run time, never redistributed; see README for licences."},
                  f, indent=2)
    return write_description(folder, {
        "folder": folder, "dataset_id": dataset_id, "name": os.path.basename(folder), "cases": cases,
        "test_cases": test_cases, "downsample": downsample,
        "spacing": [float(abs(affine[0, 0])) * downsample, float(abs(affine[1, 1])) * downsample]})


def make_icbm152_3d(raw_root: str, dataset_id: int = 503, downsample: int = 2, slab_thickness: int = 24,
                    overwrite: bool = False) -> dict:
    """The ICBM152 volume as a 3D dataset of axial slabs (``DatasetXXX_ICBM152Tissue3D``), for 3D smoke runs.

    In-plane downsampling keeps anisotropic spacing (``downsample`` mm x ``downsample`` mm x 1 mm), which is
    what nnU-Net's 3D planner must handle. Slabs without tissue are skipped.
    """
    import SimpleITK as sitk

    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
        raise DatasetError(f"downsample must be an integer >= 1, got {downsample!r}")
    folder, complete = _dataset_folder(raw_root, dataset_id, "ICBM152Tissue3D", overwrite)
    if complete:
        with open(os.path.join(folder, DESCRIPTION_FILE)) as f:
            return json.load(f)
    t1, gm, wm, affine = load_icbm152()
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    spacing = (float(abs(affine[0, 0])) * downsample, float(abs(affine[1, 1])) * downsample,
               float(abs(affine[2, 2])))
    cases = []
    for z0 in range(0, t1.shape[2] - slab_thickness + 1, slab_thickness):
        sl = slice(z0, z0 + slab_thickness)
        gm_s, wm_s = block_mean_2d(gm[:, :, sl], downsample), block_mean_2d(wm[:, :, sl], downsample)
        labels = tissue_labels(gm_s, wm_s)
        if not labels.any():
            continue
        image = block_mean_2d(t1[:, :, sl], downsample)
        origin = affine @ np.array([(downsample - 1) / 2, (downsample - 1) / 2, z0, 1.0])
        case = f"icbm_slab{z0:03d}"
        for arr, path in ((image.astype(np.float32), os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz")),
                          (labels, os.path.join(folder, "labelsTr", f"{case}.nii.gz"))):
            img = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)))  # (x, y, z) -> ITK's (z, y, x)
            img.SetSpacing(spacing)
            img.SetOrigin((-float(origin[0]), -float(origin[1]), float(origin[2])))
            img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
            sitk.WriteImage(img, path)
        cases.append(case)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "T1"}, "labels": TISSUE_LABELS, "numTraining": len(cases),
                   "file_ending": ".nii.gz",
                   "description": "ICBM152 2009a sym T1 axial slabs with GM/WM labels (nilearn wheel); "
                                  "built at run time."}, f, indent=2)
    return write_description(folder, {"folder": folder, "dataset_id": dataset_id, "name": os.path.basename(folder),
                                      "cases": cases, "downsample": downsample, "spacing": list(spacing)})


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
