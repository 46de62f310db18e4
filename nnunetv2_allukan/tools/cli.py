"""``nnunetv2-allukan``: small tools around nnU-Net for the ALL U-KAN plugin.

  ext-path      print the folder for nnUNet_extTrainer (export nnUNet_extTrainer="$(nnunetv2-allukan ext-path)")
  train         nnUNetv2_train with the plugin's trainers discoverable (arguments passed through unchanged)
  predict       nnUNetv2_predict likewise
  add-plans     add a plans configuration (e.g. 2d_allukan) that names AllUKAN, for the stock nnUNetTrainer
  demo          real brain data -> nnU-Net -> ALL U-KAN -> Dice, on a CPU, in one command
  crossval      run and compare cross-validations of several trainers (tables, CSV, JSON, box plot)
  make-dataset  write a real-data nnU-Net raw dataset from files inside installed PyPI packages
  plot-activations  PNG of every KA layer's learned activation, from an nnU-Net checkpoint
  profile       params, FLOPs, activation memory, step time: AllUKAN vs nnU-Net's CNN, UKAN, StackedKAN
  gradfid       cosine similarity of Grad-Free Spline vs exact gradients, per layer (JSON + PNG)
  bench-layers  the layer benchmark
  export-onnx   a trained fold as an ONNX file (plans' patch size), checked with onnxruntime when installed
"""
from __future__ import annotations

import argparse
import os
import sys

from .nnunet_commands import EXT_TRAINER_DIR, UserError, run_nnunet_entry


def _ext_path(args) -> int:
    print(EXT_TRAINER_DIR)
    return 0


def _train(args) -> int:
    from nnunetv2.run.run_training import run_training_entry
    return run_nnunet_entry("nnUNetv2_train", run_training_entry, args.rest)


def _predict(args) -> int:
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    return run_nnunet_entry("nnUNetv2_predict", predict_entry_point, args.rest)


def _add_plans(args) -> int:
    from .add_plans import add_plans
    return add_plans(args)


def _demo(args) -> int:
    from . import demo
    return demo.main(args.rest)


def _make_dataset(args) -> int:
    from .make_dataset import make_dataset
    return make_dataset(args)


def _plot_activations(args) -> int:
    from .checkpoints import load_network
    from .plots import plot_activations
    network, checkpoint = load_network(args.model, args.fold, args.checkpoint_name)
    out = args.output or os.path.join(os.path.dirname(checkpoint["checkpoint_file"]), "activations.png")
    n = plot_activations(network, out, max_channels=args.max_channels,
                         title=f"{checkpoint['trainer_name']}: learned activations (solid phi, dashed silu part, "
                               f"dotted spline part)")
    print(f"wrote {out} ({n} KA layers)")
    return 0


def _crossval(args) -> int:
    from . import crossval
    try:
        return crossval.main(args.rest)
    except crossval.CrossvalError as e:
        raise UserError(str(e)) from None


def _gradfid(args) -> int:
    from . import gradfid
    return gradfid.main(args.rest)


def _profile(args) -> int:
    from .profiling import command
    return command.main(args.rest)


def _bench_layers(args) -> int:
    from . import bench_layers
    bench_layers.main(args.rest)
    return 0


def _export_onnx(args) -> int:
    from . import export_onnx
    return export_onnx.main(args.rest)


# Commands whose arguments go to them untouched: name -> (function, one-line help).
PASS_THROUGH = {
    "train": (_train, "run nnUNetv2_train with the ALL U-KAN trainers discoverable (arguments unchanged)"),
    "predict": (_predict, "run nnUNetv2_predict with the ALL U-KAN trainers discoverable (arguments unchanged)"),
    "demo": (_demo, "the real-data demo (see nnunetv2-allukan demo -h)"),
    "crossval": (_crossval, "cross-validation benchmarking (see nnunetv2-allukan crossval -h)"),
    "gradfid": (_gradfid, "cosine similarity of Grad-Free vs exact gradients (see gradfid -h)"),
    "profile": (_profile, "AllUKAN vs comparators (see nnunetv2-allukan profile -h)"),
    "bench-layers": (_bench_layers, "layer benchmark (see python -m nnunetv2_allukan.bench_layers -h)"),
    "export-onnx": (_export_onnx, "a trained fold as ONNX (see nnunetv2-allukan export-onnx -h)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2-allukan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ext-path", help="print the folder to put in nnUNet_extTrainer")
    p.set_defaults(func=_ext_path)
    for name, (func, help_text) in PASS_THROUGH.items():
        # These commands parse their own arguments (or nnU-Net's): the subparser only lists them in --help.
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    p = sub.add_parser("add-plans", help="add a plans configuration that names AllUKAN (stock trainer, no variable)")
    p.add_argument("-d", dest="dataset", required=True, help="dataset id or name")
    p.add_argument("-c", dest="configuration", required=True, help="configuration to inherit, e.g. 2d, 3d_fullres")
    p.add_argument("-p", dest="plans", default="nnUNetPlans",
                   help="plans identifier (default nnUNetPlans; ResEnc plans get the residual KA encoder)")
    p.add_argument("--name", help="new configuration name (default: <configuration>_allukan)")
    p.add_argument("--spline-grad", dest="spline_grad", choices=["free", "exact"])
    p.add_argument("--share", choices=["layer", "channel", "group"],
                   help="one spline per layer, per input channel, or per group of channels (8 groups)")
    p.add_argument("--grid-size", dest="grid_size", type=int)
    p.add_argument("--grid-range", dest="grid_range", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--token-stages", dest="token_stages", type=int)
    p.add_argument("--skip-mode", dest="skip_mode", choices=["concat", "add"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing configuration of that name")
    p.set_defaults(func=_add_plans)
    p = sub.add_parser("make-dataset", help="build a real-data nnU-Net raw dataset (ICBM152 from nilearn; a "
                                            "10-class parcellation from deepmriprep)")
    p.add_argument("kind", choices=["icbm2d", "icbm3d", "parcellation2d"])
    p.add_argument("--raw", help="nnUNet_raw folder (default: $nnUNet_raw)")
    p.add_argument("--preprocessed", help="nnUNet_preprocessed folder for splits_final.json "
                                          "(default: $nnUNet_preprocessed)")
    p.add_argument("--dataset-id", type=int)
    p.add_argument("--downsample", type=int, default=2)
    p.add_argument("--no-cross-template", action="store_true", help="icbm2d: skip the CAT12 test set")
    p.add_argument("--overwrite", action="store_true", help="rebuild the dataset if it exists")
    p.set_defaults(func=_make_dataset)
    p = sub.add_parser("plot-activations", help="PNG of the learned activations of a trained model")
    p.add_argument("model", help="checkpoint .pth, or an nnU-Net model folder (<Trainer>__<Plans>__<config>) or "
                                 "fold folder")
    p.add_argument("-f", dest="fold", help="fold of a model folder, as for nnUNetv2_predict (default: its only fold)")
    p.add_argument("-chk", dest="checkpoint_name",
                   help="checkpoint file name, as for nnUNetv2_predict (default: checkpoint_final.pth, else "
                        "checkpoint_best.pth, else checkpoint_latest.pth)")
    p.add_argument("-o", dest="output", help="PNG path (default: activations.png next to the checkpoint)")
    p.add_argument("--max-channels", type=int, default=4, help="splines overlaid for share='channel'/'group'")
    p.set_defaults(func=_plot_activations)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASS_THROUGH:
        # argparse would try to interpret options such as -i meant for nnU-Net: hand them over untouched.
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=PASS_THROUGH[argv[0]][0])
    else:
        args = build_parser().parse_args(argv)
    from .checkpoints import CheckpointError
    from ..data.templates import DatasetError
    try:
        return args.func(args)
    except (UserError, DatasetError, CheckpointError) as e:
        print(f"nnunetv2-allukan {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
