"""Real-data builders against the files inside the installed nilearn/deepmriprep wheels."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_allukan.data.templates import (DatasetError, ICBM_FILES, TISSUE_LABELS, make_icbm152_2d, make_icbm152_3d,
                                       package_file, slab_splits)


@pytest.fixture(scope="module")
def icbm2d(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    return make_icbm152_2d(str(raw), 501, downsample=4, test_every=6)


def test_icbm2d_matches_the_package_files(icbm2d):
    t1 = nib.load(package_file("nilearn", ICBM_FILES["t1"]))
    gm = np.asarray(nib.load(package_file("nilearn", ICBM_FILES["gm"])).dataobj) / 255.0
    wm = np.asarray(nib.load(package_file("nilearn", ICBM_FILES["wm"])).dataobj) / 255.0
    assert t1.shape == (197, 233, 189)
    # independent check of one slice: block-average by hand, threshold the probabilities
    case = icbm2d["cases"][len(icbm2d["cases"]) // 2]
    z = int(case.split("_z")[1])
    img = sitk.ReadImage(f"{icbm2d['folder']}/imagesTr/{case}_0000.nii.gz")
    seg = sitk.ReadImage(f"{icbm2d['folder']}/labelsTr/{case}.nii.gz")
    assert img.GetSpacing()[:2] == (4.0, 4.0) and seg.GetSize() == img.GetSize() == (49, 58, 1)
    expected_t1 = np.asarray(t1.dataobj, np.float64)[:196, :232, z].reshape(49, 4, 58, 4).mean((1, 3))
    np.testing.assert_allclose(sitk.GetArrayFromImage(img)[0].T, expected_t1, rtol=1e-5)
    g = gm[:196, :232, z].reshape(49, 4, 58, 4).mean((1, 3))
    w = wm[:196, :232, z].reshape(49, 4, 58, 4).mean((1, 3))
    labels = sitk.GetArrayFromImage(seg)[0].T
    assert set(np.unique(labels)) <= {0, 1, 2}
    np.testing.assert_array_equal(labels == 1, (g > 0.5) & (g >= w))
    np.testing.assert_array_equal(labels == 2, (w > 0.5) & (w > g))
    # physical position carried over: the slice origin is the RAS affine position, in ITK's LPS convention
    origin_ras = t1.affine @ np.array([1.5, 1.5, z, 1.0])
    np.testing.assert_allclose(img.GetOrigin()[:2], [-origin_ras[0], -origin_ras[1]])


def test_icbm2d_dataset_json_and_cross_template(icbm2d):
    ds = json.load(open(f"{icbm2d['folder']}/dataset.json"))
    assert ds["labels"] == TISSUE_LABELS and ds["numTraining"] == len(icbm2d["cases"]) > 100
    assert len(icbm2d["test_cases"]) > 10
    agreements = []
    for case in icbm2d["test_cases"]:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(f"{icbm2d['folder']}/labelsTs/{case}.nii.gz"))
        assert set(np.unique(seg)) <= {0, 1, 2}
        z = case.split("_z")[1]
        ref_file = f"{icbm2d['folder']}/labelsTr/icbm_z{z}.nii.gz"
        try:
            ref = sitk.GetArrayFromImage(sitk.ReadImage(ref_file))
        except RuntimeError:
            continue
        agreements.append(2 * ((seg > 0) & (ref > 0)).sum() / ((seg > 0).sum() + (ref > 0).sum()))
    # an independently made template, resampled into the same MNI grid: mostly, but not exactly, the same brain
    assert 0.7 < np.median(agreements) < 0.99


def test_existing_dataset_is_reused_and_clashes_refused(icbm2d):
    raw = icbm2d["folder"].rsplit("/", 1)[0]
    again = make_icbm152_2d(raw, 501, downsample=4, test_every=6)
    assert again == icbm2d
    with pytest.raises(DatasetError, match="downsample"):
        make_icbm152_2d(raw, 501, downsample=2)
    with pytest.raises(DatasetError, match="already used"):
        make_icbm152_3d(raw, 501)


def test_a_build_interrupted_after_dataset_json_is_finished_on_rerun(icbm2d):
    """Stopped between dataset.json and cases.json: the folder is incomplete, and a rerun rebuilds it."""
    description = f"{icbm2d['folder']}/cases.json"
    os.remove(description)
    assert os.path.isfile(f"{icbm2d['folder']}/dataset.json")
    raw = icbm2d["folder"].rsplit("/", 1)[0]
    assert make_icbm152_2d(raw, 501, downsample=4, test_every=6) == icbm2d
    assert json.load(open(description)) == icbm2d


def test_slab_splits_leave_a_gap():
    cases = [f"c{i:03d}" for i in range(100)]
    splits = slab_splits(cases, n_folds=5, gap=3)
    assert sorted(c for s in splits for c in s["val"]) == cases  # every case validated exactly once
    for s in splits:
        val_idx = [cases.index(c) for c in s["val"]]
        assert val_idx == list(range(min(val_idx), max(val_idx) + 1))  # contiguous
        for c in s["train"]:
            i = cases.index(c)
            assert i < min(val_idx) - 3 or i > max(val_idx) + 3  # no near-duplicate neighbour
    with pytest.raises(DatasetError):
        slab_splits(cases[:10], n_folds=5, gap=3)


def test_icbm3d_slabs(tmp_path):
    info = make_icbm152_3d(str(tmp_path), 503, downsample=4, slab_thickness=32)
    img = sitk.ReadImage(f"{info['folder']}/imagesTr/{info['cases'][2]}_0000.nii.gz")
    assert img.GetSize() == (49, 58, 32) and img.GetSpacing() == (4.0, 4.0, 1.0)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(f"{info['folder']}/labelsTr/{info['cases'][2]}.nii.gz"))
    assert set(np.unique(seg)) == {0, 1, 2}


def test_missing_package_is_a_clear_error():
    with pytest.raises(DatasetError, match="pip install no_such_pkg"):
        package_file("no_such_pkg", "x")
