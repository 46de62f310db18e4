"""Finding a checkpoint as nnU-Net's commands do (-f, -chk, the only fold), and reading its plans through nnU-Net's
plans classes (configuration inheritance), for plot-activations and gradfid."""
import json

import pytest
import torch

from nnunetv2_allukan.tools import cli, gradfid
from nnunetv2_allukan.tools.checkpoints import CheckpointError, find_checkpoint


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def test_a_model_folder_trained_on_one_fold_is_found_whichever_fold_it_is(tmp_path):
    model = tmp_path / "nnUNetTrainerAllUKAN__nnUNetPlans__2d"
    final = _touch(model / "fold_2" / "checkpoint_final.pth")
    assert find_checkpoint(str(model)) == final  # the demo's default fold is 2
    assert find_checkpoint(str(model), fold=2) == find_checkpoint(str(model), fold="2") == final
    assert find_checkpoint(str(model / "fold_2")) == final
    with pytest.raises(CheckpointError, match="has no fold_0 .it has fold_2"):
        find_checkpoint(str(model), fold=0)


def test_several_folds_need_f_and_chk_picks_the_file(tmp_path):
    model = tmp_path / "model"
    _touch(model / "fold_0" / "checkpoint_final.pth")
    best = _touch(model / "fold_3" / "checkpoint_best.pth")
    latest = _touch(model / "fold_3" / "checkpoint_latest.pth")
    with pytest.raises(CheckpointError, match="holds fold_0, fold_3: choose one with -f FOLD"):
        find_checkpoint(str(model))
    assert find_checkpoint(str(model), fold=3) == best  # final missing: best before latest
    assert find_checkpoint(str(model), fold=3, checkpoint_name="checkpoint_latest.pth") == latest
    with pytest.raises(CheckpointError, match="no checkpoint_final.pth in"):
        find_checkpoint(str(model), fold=3, checkpoint_name="checkpoint_final.pth")
    assert find_checkpoint(_touch(tmp_path / "any.pth"), fold=9) == str(tmp_path / "any.pth")


def test_plot_activations_and_gradfid_accept_nnunets_f_and_chk():
    args = cli.build_parser().parse_args(["plot-activations", "m", "-f", "2", "-chk", "checkpoint_best.pth"])
    assert (args.fold, args.checkpoint_name) == ("2", "checkpoint_best.pth")


def _child_configuration_checkpoint(trained_2d, target):
    """The trained checkpoint, relabelled as trained on ``2d_child``, a configuration that only inherits ``2d``."""
    checkpoint = torch.load(trained_2d / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["init_args"]["plans"]["configurations"]["2d_child"] = {"inherits_from": "2d"}
    checkpoint["init_args"]["configuration"] = "2d_child"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return checkpoint["init_args"]["plans"]["configurations"]["2d"]["patch_size"]


@pytest.mark.e2e
def test_gradfid_takes_the_patch_size_an_inherited_configuration_gets_from_its_parent(trained_2d, tmp_path):
    parent_patch = _child_configuration_checkpoint(trained_2d, tmp_path / "child.pth")
    assert list(parent_patch) != [64, 64]  # gradfid's --patch default: must not be what is used
    assert gradfid.main([str(tmp_path / "child.pth"), "--batch", "1", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "gradfid.json").read_text())
    assert result["patch"] == list(parent_patch)


@pytest.mark.e2e
def test_plot_activations_on_a_model_folder_trained_on_fold_2(trained_2d, tmp_path):
    model = tmp_path / "nnUNetTrainerAllUKAN_smokeTest__nnUNetPlans__2d_child"
    _child_configuration_checkpoint(trained_2d, model / "fold_2" / "checkpoint_final.pth")
    assert cli.main(["plot-activations", str(model), "-o", str(tmp_path / "a.png")]) == 0
    assert cli.main(["plot-activations", str(model), "-f", "2", "-chk", "checkpoint_final.pth",
                     "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").stat().st_size > 10_000 and (tmp_path / "b.png").is_file()
    assert cli.main(["plot-activations", str(model), "-f", "0"]) == 2  # a one-line error, no traceback
