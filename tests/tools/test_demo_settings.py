"""demo reruns: a finished step is reused only with the settings it was made with, never relabelled."""
from pathlib import Path

import pytest

from nnunetv2_allukan.tools import crossval, demo
from nnunetv2_allukan.tools.nnunet_commands import UserError

TRAINED = demo.training_settings(epochs=20, iterations=25, val_iterations=5, device="cpu", downsample=3)
RECORDED = {**TRAINED, "spline_optimizer": "adam"}  # what train_in_process records for demo.TRAINER


def _finished_fold(results_root, settings=None, trainer=demo.TRAINER):
    folder = crossval.fold_folder(str(results_root), "Dataset501_ICBM152Tissue2D", trainer, "nnUNetPlans",
                                  demo.CONFIGURATION, 2)
    for name in ("checkpoint_final.pth", "validation/summary.json"):
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    if settings is not None:
        demo.record_settings(folder, settings)
    return folder


def test_settings_difference_names_what_changed():
    assert demo.settings_difference(TRAINED, dict(TRAINED)) is None
    assert demo.settings_difference(TRAINED, {**TRAINED, "epochs": 5, "downsample": 2}) == \
        "epochs 20 -> 5, downsample 3 -> 2"
    assert "no record" in demo.settings_difference(None, TRAINED)


def test_a_fold_trained_with_the_same_settings_is_reused(tmp_path):
    folder = _finished_fold(tmp_path, RECORDED)
    assert demo.train_in_process(demo.TRAINER, "Dataset501_ICBM152Tissue2D", 2, dict(TRAINED), str(tmp_path)) == \
        folder


@pytest.mark.parametrize("change", [{"epochs": 5}, {"iterations": 10}, {"downsample": 2}, {"device": "cuda"}])
def test_a_fold_trained_with_other_settings_is_refused_not_relabelled(tmp_path, change):
    folder = _finished_fold(tmp_path, RECORDED)
    key, value = next(iter(change.items()))
    with pytest.raises(UserError, match=f"{key} {TRAINED[key]!r} -> {value!r}.*another --workdir, or delete"):
        demo.train_in_process(demo.TRAINER, "Dataset501_ICBM152Tissue2D", 2, {**TRAINED, **change}, str(tmp_path))
    assert demo.recorded_settings(folder) == RECORDED  # nothing was touched


def test_a_finished_fold_without_a_record_is_refused(tmp_path):
    _finished_fold(tmp_path)
    with pytest.raises(UserError, match="no record of its settings"):
        demo.train_in_process(demo.TRAINER, "Dataset501_ICBM152Tissue2D", 2, dict(TRAINED), str(tmp_path))


def test_a_fold_of_the_old_recipe_is_refused_and_the_cnns_is_reused(tmp_path):
    """Records before 0.2.0 have no spline_optimizer: ALL U-KAN folds trained then (nnU-Net's single SGD group) are
    not passed off as the new default's; a CNN fold, whose recipe did not change, is reused."""
    folder = _finished_fold(tmp_path, TRAINED)
    with pytest.raises(UserError, match="spline_optimizer 'shared' -> 'adam'.*own Adam since 0.2.0"):
        demo.train_in_process(demo.TRAINER, "Dataset501_ICBM152Tissue2D", 2, dict(TRAINED), str(tmp_path))
    assert demo.recorded_settings(folder) == TRAINED
    cnn = _finished_fold(tmp_path, TRAINED, trainer="nnUNetTrainer")
    assert demo.train_in_process("nnUNetTrainer", "Dataset501_ICBM152Tissue2D", 2, dict(TRAINED), str(tmp_path)) == cnn
