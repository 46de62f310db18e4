"""A 10-class brain parcellation as a 2D nnU-Net dataset, from the ``deepmriprep`` wheel.

Image: the CAT12 T1 template (0.5 mm, skull-stripped). Labels: the neuromorphometrics atlas (1 mm, CC BY-NC,
Neuromorphometrics Inc. — research use only), its 134 regions grouped through the atlas csv into lobes and
structures (``PARCELLATION_LABELS``). Both live in MNI space; the T1 is sampled trilinearly at the atlas voxels'
world positions, so image and labels share the atlas grid. Axial slices, in-plane average pooling by
``downsample`` (labels: the majority label of each block). Imports no nnU-Net; nothing derived is committed.

Like the tissue task, all slices come from one average brain: use the contiguous slab folds (``slab_splits``).
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from .templates import DatasetError, _dataset_folder, _write_slice, block_mean_2d, package_file

PARCELLATION_LABELS = {"background": 0, "frontal_cortex": 1, "parietal_cortex": 2, "temporal_cortex": 3,
                       "occipital_cortex": 4, "limbic": 5, "deep_grey": 6, "cerebellum": 7, "brainstem": 8,
                       "cerebral_white_matter": 9, "csf": 10}

# Atlas csv "CircRegion" -> class. Rows are matched by ROI name first (the csv files "Cerebral White Matter"
# under the Cerebellum region).
_REGION_CLASS = {"Frontal lobe": "frontal_cortex", "Parietal lobe": "parietal_cortex",
                 "Temporal lobe": "temporal_cortex", "Occipital lobe": "occipital_cortex",
                 "Limbic cortex": "limbic", "Hippocampus": "limbic", "Amygdala": "limbic",
                 "Basal ganglia": "deep_grey", "Diencephalon": "deep_grey", "Basal Forebrain": "deep_grey",
                 "Optic chaism": "deep_grey", "Cerebellum": "cerebellum", "Brain stem": "brainstem",
                 "Ventricle": "csf"}


def atlas_class_of_region() -> dict[int, int]:
    """Atlas ROI id -> parcellation class, from the csv shipped next to the atlas."""
    mapping = {}
    with open(package_file("deepmriprep", "data/templates/neuromorphometrics.csv")) as f:
        for row in csv.DictReader(f, delimiter=";"):
            name, region = row["ROIname"], row["CircRegion"]
            if "Cerebral White Matter" in name:
                cls = "cerebral_white_matter"
            elif region in _REGION_CLASS:
                cls = _REGION_CLASS[region]
            else:
                raise DatasetError(f"neuromorphometrics.csv: region {region!r} of {name!r} has no class; the "
                                   "installed deepmriprep's atlas differs from the one this builder knows")
            mapping[int(row["ROIid"])] = PARCELLATION_LABELS[cls]
    return mapping


def load_parcellation_volume():
    """(t1, labels, affine) on the atlas grid (1 mm, 161x197x161), t1 float32, labels uint8."""
    import nibabel as nib
    from scipy.ndimage import map_coordinates

    atlas_img = nib.load(package_file("deepmriprep", "data/templates/neuromorphometrics.nii.gz"))
    t1_img = nib.load(package_file("deepmriprep", "data/templates/Template_05mm_bet.nii.gz"))
    # Reorient the atlas to RAS so slices are written as the tissue task writes them.
    atlas_img = nib.as_closest_canonical(atlas_img)
    atlas = np.asarray(atlas_img.dataobj).astype(np.int32)
    lut = np.zeros(int(atlas.max()) + 1, np.uint8)
    for roi, cls in atlas_class_of_region().items():
        if roi < lut.size:
            lut[roi] = cls
    labels = lut[atlas]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in atlas.shape], indexing="ij"), 0).reshape(3, -1)
    world = atlas_img.affine[:3, :3] @ grid + atlas_img.affine[:3, 3:4]
    inv = np.linalg.inv(t1_img.affine)
    t1 = map_coordinates(np.asarray(t1_img.dataobj, np.float32), inv[:3, :3] @ world + inv[:3, 3:4], order=1,
                         cval=0.0).reshape(atlas.shape)
    return t1, labels, atlas_img.affine


def block_majority_2d(labels: np.ndarray, factor: int, n_classes: int) -> np.ndarray:
    """The most frequent label of each factor x factor block (ties: the lower label)."""
    if factor == 1:
        return labels
    one_hot = np.stack([labels == c for c in range(n_classes)], -1).astype(np.float32)
    return block_mean_2d(one_hot, factor).argmax(-1).astype(np.uint8)


def make_parcellation_2d(raw_root: str, dataset_id: int = 504, downsample: int = 2, min_brain_voxels: int = 400,
                         overwrite: bool = False) -> dict:
    """Axial slices as ``DatasetXXX_NMMParcellation2D`` (10 foreground classes); returns a description with
    the folder and the ordered (inferior to superior) training case ids for ``slab_splits``.

    The description file ``cases.json`` is written last: a folder without it is an interrupted build and is
    rebuilt on the next call.
    """
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
        raise DatasetError(f"downsample must be an integer >= 1, got {downsample!r}")
    folder, _ = _dataset_folder(raw_root, dataset_id, "NMMParcellation2D", overwrite)
    info_path = os.path.join(folder, "cases.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info["downsample"] != downsample:
            raise DatasetError(f"{folder} exists with downsample={info['downsample']}; pass overwrite=True "
                               "(--overwrite) to rebuild it, or use another dataset id")
        return info
    t1, labels, affine = load_parcellation_volume()
    n_classes = len(PARCELLATION_LABELS)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    spacing = (float(abs(affine[0, 0])) * downsample, float(abs(affine[1, 1])) * downsample)
    cases = []
    for z in range(t1.shape[2]):
        if int((labels[:, :, z] > 0).sum()) < min_brain_voxels:
            continue
        case = f"nmm_z{z:03d}"
        origin = affine @ np.array([(downsample - 1) / 2, (downsample - 1) / 2, z, 1.0])
        image = block_mean_2d(t1[:, :, z], downsample)
        label = block_majority_2d(labels[:, :, z], downsample, n_classes)
        _write_slice(image.T.astype(np.float32), os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"), spacing,
                     origin)
        _write_slice(label.T, os.path.join(folder, "labelsTr", f"{case}.nii.gz"), spacing, origin)
        cases.append(case)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "T1"}, "labels": PARCELLATION_LABELS, "numTraining": len(cases),
                   "file_ending": ".nii.gz",
                   "description": "CAT12 T1 template with the neuromorphometrics atlas grouped into 10 lobes and "
                                  "structures (deepmriprep wheel; atlas CC BY-NC, research use only). Built at "
                                  "run time, never redistributed."}, f, indent=2)
    info = {"folder": folder, "dataset_id": dataset_id, "name": os.path.basename(folder), "cases": cases,
            "test_cases": [], "downsample": downsample, "spacing": list(spacing)}
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    return info


__all__ = ["PARCELLATION_LABELS", "atlas_class_of_region", "block_majority_2d", "load_parcellation_volume",
           "make_parcellation_2d"]
