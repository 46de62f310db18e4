"""Small synthetic nnU-Net raw datasets (tests, smoke runs, recipe comparison); built at run time, never committed.

Writes the standard raw layout (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json); imports no nnU-Net.
"""
from __future__ import annotations

import json
import os

import numpy as np


def _write_dataset_json(folder, labels, file_ending, n_train, channel_names=None):
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": channel_names or {"0": "MRI"}, "labels": labels, "numTraining": n_train,
                   "file_ending": file_ending}, f, indent=2)


def _shapes_2d(rng, shape):
    """Background noise with a bright ellipse (label 1) and a mid-grey rectangle (label 2)."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    seg = np.zeros(shape, np.uint8)
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.2, 0.45) * w
    ry, rx = rng.uniform(0.12, 0.2) * h, rng.uniform(0.08, 0.15) * w
    seg[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    y0, x0 = int(rng.uniform(0.1, 0.6) * h), int(rng.uniform(0.55, 0.75) * w)
    seg[y0:y0 + int(0.25 * h), x0:x0 + int(0.2 * w)] = 2
    img = rng.normal(60, 12, shape)
    img[seg == 1] += 120
    img[seg == 2] += 60
    return np.clip(img, 0, 255).astype(np.uint8), seg


def make_2d_dataset(raw_root: str, dataset_id: int = 990, n_train: int = 8, n_test: int = 2,
                    shape=(40, 56), seed: int = 0, name: str = "KATest2D") -> str:
    """Non-square 2D PNG dataset with two foreground labels. Returns the dataset folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(n_train + n_test):
        img, seg = _shapes_2d(rng, shape)
        split = "Tr" if i < n_train else "Ts"
        Image.fromarray(img).save(os.path.join(folder, f"images{split}", f"case{i:03d}_0000.png"))
        Image.fromarray(seg).save(os.path.join(folder, f"labels{split}", f"case{i:03d}.png"))
    _write_dataset_json(folder, {"background": 0, "ellipse": 1, "rectangle": 2}, ".png", n_train,
                        {"0": "rescale_to_0_1"})
    return folder


def make_3d_dataset(raw_root: str, dataset_id: int = 991, n_train: int = 6, n_test: int = 1,
                    shape=(10, 28, 24), spacing=(3.0, 1.0, 1.0), seed: int = 1, name: str = "KATest3D") -> str:
    """Anisotropic 3D NIfTI dataset (thick slices along the first array axis) with one foreground label."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    for i in range(n_train + n_test):
        c = [rng.uniform(0.35, 0.65) * s for s in shape]
        r = rng.uniform(5.0, 8.0)  # mm
        dist = (((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2
                + ((xx - c[2]) * spacing[2]) ** 2)
        seg = (dist <= r * r).astype(np.uint8)
        img = (rng.normal(100, 15, shape) + 80 * seg).astype(np.float32)
        split = "Tr" if i < n_train else "Ts"
        for arr, path in ((img, os.path.join(folder, f"images{split}", f"vol{i:03d}_0000.nii.gz")),
                          (seg, os.path.join(folder, f"labels{split}", f"vol{i:03d}.nii.gz"))):
            itk = sitk.GetImageFromArray(arr)
            itk.SetSpacing(tuple(reversed(spacing)))  # SimpleITK spacing is (x, y, z)
            sitk.WriteImage(itk, path)
    _write_dataset_json(folder, {"background": 0, "sphere": 1}, ".nii.gz", n_train)
    return folder


# nnU-Net region-based training: each region is a set of labels, predicted with its own sigmoid output.
REGIONS = {"background": 0, "shapes": [1, 2], "rectangle": [2], "ignore": 3}
IGNORE_BAND = 3  # rows at the top of each training label map marked "not annotated"


def make_2d_regions_dataset(raw_root: str, dataset_id: int = 992, n_train: int = 8, n_test: int = 2,
                            shape=(40, 56), seed: int = 0, name: str = "KATestRegions2D") -> str:
    """The images of ``make_2d_dataset`` (same seed: same images) as a region-based dataset with an ignore label.

    Regions "shapes" (ellipse or rectangle, labels 1 and 2) and "rectangle" (label 2), ``regions_class_order``
    [1, 2]; the top ``IGNORE_BAND`` rows of every training label map carry the ignore label 3 (test labels are
    complete). Same images and sizes as the 2D dataset, so that its plans can be moved here for fine-tuning.
    """
    from PIL import Image

    folder = make_2d_dataset(raw_root, dataset_id, n_train, n_test, shape, seed, name)
    for path in sorted(os.listdir(os.path.join(folder, "labelsTr"))):
        seg = np.array(Image.open(os.path.join(folder, "labelsTr", path)))
        seg[:IGNORE_BAND] = REGIONS["ignore"]
        Image.fromarray(seg).save(os.path.join(folder, "labelsTr", path))
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    dataset_json.update(labels=REGIONS, regions_class_order=[1, 2])
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder
