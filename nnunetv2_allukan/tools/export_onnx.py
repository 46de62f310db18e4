"""``nnunetv2-allukan export-onnx MODEL_FOLDER -f FOLD``: a trained network as an ONNX file, for deployment outside
PyTorch (ONNX Runtime, TensorRT, clinical viewers).

The network is rebuilt from the fold's checkpoint with its trainer's own builder (``checkpoints.load_network``,
deep supervision off, eval mode) and exported by torch.onnx's exporter (torch.export based) for one patch of the
plans' patch size, batch 1, as nnU-Net's sliding-window inference feeds it. While a model is exported the KA
layers evaluate the spline with plain torch ops (``activation.spline_backend``), so the file holds standard ONNX
operators only, never this package's Triton custom ops. Needs ``pip install onnx onnxscript`` (the exporter);
with ``onnxruntime`` installed the file is also run once and compared with PyTorch.
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import numpy as np
import torch

from ..activation import spline_backend
from .nnunet_commands import UserError


def export_network(network: torch.nn.Module, example: torch.Tensor, path: str) -> str:
    """Write ``network`` (eval mode) traced at ``example``'s shape to ``path``."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"export-onnx needs {' and '.join(missing)}: pip install onnx onnxscript "
                        "(and onnxruntime to check the file)")
    # Plain ops in the file whatever the device: torch.onnx's export flag alone is not trusted to reach the layers.
    with torch.no_grad(), spline_backend(network, "torch"):
        program = torch.onnx.export(network, (example,), dynamo=True, verbose=False)
    program.save(path)
    return path


def check_with_onnxruntime(network: torch.nn.Module, example: torch.Tensor, path: str) -> float | None:
    """max |onnxruntime - torch| / max |torch| of the logits, or None when onnxruntime is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    with torch.no_grad():
        expected = network(example).numpy()
    return float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-30))


def example_input(checkpoint: dict) -> torch.Tensor:
    """One random patch as nnU-Net's inference feeds the network: (1, input channels, *patch size)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    init = checkpoint["init_args"]
    plans = PlansManager(init["plans"])
    configuration = plans.get_configuration(init["configuration"])
    n_in = determine_num_input_channels(plans, configuration, init["dataset_json"])
    return torch.randn(1, n_in, *configuration.patch_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nnunetv2-allukan export-onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_folder", help="trainer folder: $nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION")
    parser.add_argument("-f", dest="fold", default="0", help="fold (default 0; 'all' for fold_all)")
    parser.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth",
                        help="checkpoint file name in the fold folder (default checkpoint_final.pth)")
    parser.add_argument("-o", dest="output", help="ONNX path (default: FOLD_FOLDER/model.onnx)")
    args = parser.parse_args(argv)
    from .checkpoints import load_network

    fold_folder = os.path.join(args.model_folder, f"fold_{args.fold}")
    checkpoint_file = os.path.join(fold_folder, args.checkpoint)
    if not os.path.isfile(checkpoint_file):
        raise UserError(f"{checkpoint_file} does not exist (model folder, -f fold and -chk checkpoint name)")
    network, checkpoint = load_network(checkpoint_file)
    example = example_input(checkpoint)
    out = args.output or os.path.join(fold_folder, "model.onnx")
    export_network(network, example, out)
    error = check_with_onnxruntime(network, example, out)
    check = "not run on onnxruntime (not installed)" if error is None else \
        f"onnxruntime logits within {error:.1e} (relative) of PyTorch's"
    print(f"wrote {out}: input {'x'.join(map(str, example.shape))}, {check}")
    return 0
