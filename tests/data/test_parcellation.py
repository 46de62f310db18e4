"""The 10-class parcellation builder against the atlas and template files inside the deepmriprep wheel."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_allukan.data.parcellation import (PARCELLATION_LABELS, atlas_class_of_region, block_majority_2d,
                                                make_parcellation_2d)
from nnunetv2_allukan.data.templates import package_file


@pytest.fixture(scope="module")
def parcellation(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    return make_parcellation_2d(str(raw), 504, downsample=4)


def test_every_atlas_region_has_a_class_and_the_grouping_follows_the_csv():
    mapping = atlas_class_of_region()
    with open(package_file("deepmriprep", "data/templates/neuromorphometrics.csv")) as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    assert len(mapping) == len(rows) == 134
    by_name = {r["ROIname"]: mapping[int(r["ROIid"])] for r in rows}
    assert by_name["Left Cerebral White Matter"] == PARCELLATION_LABELS["cerebral_white_matter"]  # not cerebellum
    assert by_name["Right Cerebellum Exterior"] == PARCELLATION_LABELS["cerebellum"]
    assert by_name["Left Hippocampus"] == PARCELLATION_LABELS["limbic"]
    assert by_name["Brain Stem"] == PARCELLATION_LABELS["brainstem"]
    assert by_name["Right Lateral Ventricle"] == PARCELLATION_LABELS["csf"]
    frontal = [r for r in rows if r["CircRegion"] == "Frontal lobe"]
    assert frontal and all(mapping[int(r["ROIid"])] == PARCELLATION_LABELS["frontal_cortex"] for r in frontal)


def test_block_majority_takes_the_most_frequent_label():
    labels = np.array([[1, 1, 2, 3],
                       [1, 2, 2, 3],
                       [0, 0, 4, 4],
                       [0, 5, 4, 5]], np.uint8)
    np.testing.assert_array_equal(block_majority_2d(labels, 2, 6), [[1, 2], [0, 4]])


def test_dataset_has_ten_classes_aligned_with_the_template(parcellation):
    info = parcellation
    with open(f"{info['folder']}/dataset.json") as f:
        ds = json.load(f)
    assert ds["labels"] == PARCELLATION_LABELS and ds["numTraining"] == len(info["cases"]) > 30
    present, wm_t1, cortex_t1 = set(), [], []
    for case in info["cases"]:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(f"{info['folder']}/labelsTr/{case}.nii.gz"))[0]
        img = sitk.GetArrayFromImage(sitk.ReadImage(f"{info['folder']}/imagesTr/{case}_0000.nii.gz"))[0]
        assert seg.shape == img.shape
        present |= set(np.unique(seg).tolist())
        wm_t1.append(img[seg == PARCELLATION_LABELS["cerebral_white_matter"]])
        cortex_t1.append(img[seg == PARCELLATION_LABELS["frontal_cortex"]])
    assert present == set(PARCELLATION_LABELS.values())  # all 10 classes and background occur
    # T1 contrast checks the image/label alignment independently: white matter is brighter than cortex
    assert np.concatenate(wm_t1).mean() > np.concatenate(cortex_t1).mean() + 0.1
    # slices are ordered inferior -> superior, as the slab folds need
    zs = [int(c.split("_z")[1]) for c in info["cases"]]
    assert zs == sorted(zs)


def test_one_slice_matches_the_atlas_by_hand(parcellation):
    """Independent of the builder's resampling: the atlas voxels, grouped by hand, majority over 4x4 blocks."""
    atlas_img = nib.as_closest_canonical(nib.load(package_file("deepmriprep",
                                                               "data/templates/neuromorphometrics.nii.gz")))
    atlas = np.asarray(atlas_img.dataobj).astype(int)
    mapping = atlas_class_of_region()
    case = parcellation["cases"][len(parcellation["cases"]) // 2]
    z = int(case.split("_z")[1])
    grouped = np.vectorize(lambda r: mapping.get(r, 0))(atlas[:, :, z])
    h, w = (grouped.shape[0] // 4) * 4, (grouped.shape[1] // 4) * 4
    blocks = grouped[:h, :w].reshape(h // 4, 4, w // 4, 4).transpose(0, 2, 1, 3).reshape(h // 4, w // 4, 16)
    expected = np.array([[np.bincount(b, minlength=11).argmax() for b in row] for row in blocks])
    seg = sitk.GetArrayFromImage(sitk.ReadImage(f"{parcellation['folder']}/labelsTr/{case}.nii.gz"))[0].T
    np.testing.assert_array_equal(seg, expected)


def test_an_interrupted_build_is_rebuilt(tmp_path):
    first = make_parcellation_2d(str(tmp_path), 505, downsample=8)
    (tmp_path / first["name"] / "cases.json").unlink()  # as if killed after the images, before the description
    again = make_parcellation_2d(str(tmp_path), 505, downsample=8)
    assert again["cases"] == first["cases"]
    assert (tmp_path / first["name"] / "cases.json").is_file()
