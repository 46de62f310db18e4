"""ONNX export of AllUKAN (2D and 3D) run on onnxruntime, and the export-onnx command on a trained fold.

The exporter (onnx, onnxscript) and onnxruntime are not among the test dependencies: these tests skip without them
(``pip install onnx onnxscript onnxruntime`` to run them), except the one that checks the error message.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_allukan.tools import export_onnx
from nnunetv2_allukan.tools.nnunet_commands import UserError
from nnunetv2_allukan.trainers import nnUNetTrainerAllUKAN
from nnunetv2_allukan.architectures.from_plans import allukan_arch_kwargs

HAVE_EXPORTER = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
needs_exporter = pytest.mark.skipif(not HAVE_EXPORTER, reason="needs onnx, onnxscript and onnxruntime")


def _allukan(dim: int, share: str):
    arch = {"n_stages": 3, "features_per_stage": [4, 8, 8], "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [[3] * dim] * 3, "strides": [[1] * dim, [2] * dim, [2] * dim],
            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    kwargs = allukan_arch_kwargs(arch, {**nnUNetTrainerAllUKAN.ka_kwargs, "share": share})
    network = get_network_from_plans("nnunetv2_allukan.architectures.AllUKAN", kwargs,
                                     ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, 3, allow_init=True,
                                     deep_supervision=False)
    with torch.no_grad():  # learned-looking splines, so that the spline part matters in the comparison
        for name, p in network.named_parameters():
            if name.endswith("activation.coef"):
                p.normal_()
    return network.eval()


@needs_exporter
@pytest.mark.parametrize("dim, share, size", [(2, "layer", (32, 24)), (3, "channel", (16, 16, 8))])
def test_allukan_onnx_matches_pytorch_on_onnxruntime(tmp_path, monkeypatch, dim, share, size):
    import onnx

    # Even with the Triton backend chosen (on the CPU through the interpreter the tests run under), the file holds
    # standard operators only: the export takes the torch path.
    interpreter = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton")
    monkeypatch.setenv("ALLUKAN_SPLINE_BACKEND", "triton" if interpreter else "torch")
    network = _allukan(dim, share)
    example = torch.randn(1, 1, *size) * 2
    path = export_onnx.export_network(network, example, str(tmp_path / "model.onnx"))
    domains = {node.domain for node in onnx.load(path).graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert export_onnx.check_with_onnxruntime(network, example, path) < 1e-4  # fp32 rounding, ~1e-5 here


def test_export_without_the_exporter_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="pip install onnx onnxscript"):
        export_onnx.export_network(torch.nn.Identity(), torch.zeros(1), "unused.onnx")


@needs_exporter
def test_export_onnx_command_on_a_trained_fold(trained_2d):
    model_folder = trained_2d.parent
    proc = subprocess.run([sys.executable, "-m", "nnunetv2_allukan.tools.cli", "export-onnx", str(model_folder),
                           "-f", "0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (trained_2d / "model.onnx").is_file()
    assert "onnxruntime logits within" in proc.stdout


def test_export_onnx_command_names_a_missing_checkpoint(tmp_path):
    from nnunetv2_allukan.tools import cli

    assert cli.main(["export-onnx", str(tmp_path), "-f", "3"]) == 2
