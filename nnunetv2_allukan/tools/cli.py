"""``nnunetv2-allukan``: small tools around nnU-Net for the ALL U-KAN plugin.

  ext-path      print the folder for nnUNet_extTrainer (export nnUNet_extTrainer="$(nnunetv2-allukan ext-path)")
  train         nnUNetv2_train with the plugin's trainers discoverable (arguments passed through unchanged)
  predict       nnUNetv2_predict likewise
  add-plans     add a plans configuration (e.g. 2d_allukan) that names AllUKAN, for the stock nnUNetTrainer
  demo          real brain data -> nnU-Net -> ALL U-KAN -> Dice, on a CPU, in one command
  crossval      run and compare cross-validations of several trainers (tables, CSV, JSON, box plot)
  make-dataset  write a real-data nnU-Net raw dataset from files inside installed PyPI packages
  plot-activations  PNG of every KA layer's learned activation, from an nnU-Net checkpoint
  profile       params, FLOPs, activation memory, step time: AllUKAN vs PlainConvUNet, UKAN, StackedKAN
  gradfid       cosine similarity of Grad-Free Spline vs exact gradients, per layer (JSON + PNG)
  bench-layers  the layer benchmark
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext_trainers")
FORGOT_VARIABLE_HINT = ('nnU-Net finds the ALL U-KAN trainers only with: export nnUNet_extTrainer="$(nnunetv2-allukan '
                        'ext-path)"  (or use "nnunetv2-allukan train ..." / "nnunetv2-allukan add-plans ...")')


def nnunet_executable(name: str) -> str:
    """An nnU-Net console script from this environment, also when its bin folder is not on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, without a traceback."""


def with_ext_trainer_path(environ: dict) -> dict:
    """``environ`` with this package's discovery folder added to nnUNet_extTrainer (kept if already there)."""
    paths = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if EXT_TRAINER_DIR not in paths:
        paths.append(EXT_TRAINER_DIR)
    return {**environ, "nnUNet_extTrainer": os.pathsep.join(paths)}


def _ext_path(args) -> int:
    print(EXT_TRAINER_DIR)
    return 0


def _run_nnunet_entry(prog: str, entry, argv: list[str]) -> int:
    os.environ.update(with_ext_trainer_path(dict(os.environ)))
    sys.argv = [prog, *argv]
    result = entry()
    return result if isinstance(result, int) else 0


def _train(args) -> int:
    from nnunetv2.run.run_training import run_training_entry
    return _run_nnunet_entry("nnUNetv2_train", run_training_entry, args.rest)


def _predict(args) -> int:
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    return _run_nnunet_entry("nnUNetv2_predict", predict_entry_point, args.rest)


def _require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise UserError(f"{name} is not set: export it as for any nnU-Net command (see nnU-Net's "
                        f"documentation/setting_up_paths.md)")
    if not os.path.isdir(value):
        raise UserError(f"{name}={value} is not a folder")
    return value


def _dataset_name(dataset: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise UserError(f"dataset {dataset!r} was not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results; "
                        f"check the id or run nnUNetv2_plan_and_preprocess first") from None


def add_allukan_configuration(plans: dict, source: str, target: str, ka_kwargs: dict) -> dict:
    """Return plans with a configuration ``target`` that inherits ``source`` and names AllUKAN."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_allukan.trainers.nnUNetTrainerAllUKAN import ALLUKAN_CLASS_NAME, allukan_arch_kwargs

    if source not in plans["configurations"]:
        raise UserError(f"configuration {source!r} is not in the plans; available: "
                        f"{', '.join(plans['configurations'])}")
    resolved = PlansManager(plans).get_configuration(source)
    arch = resolved.configuration["architecture"]
    new_plans = json.loads(json.dumps(plans))
    new_plans["configurations"][target] = {
        "inherits_from": source,
        "architecture": {
            "network_class_name": ALLUKAN_CLASS_NAME,
            "arch_kwargs": allukan_arch_kwargs(arch["arch_kwargs"], ka_kwargs),
            "_kw_requires_import": list(arch["_kw_requires_import"]),
        },
    }
    return new_plans


def _check_builds(plans: dict, configuration: str):
    """Build the network once so that bad KA arguments fail now, naming the argument, not at training time."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    try:
        get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                               cm.network_arch_init_kwargs_req_import, 1, 2, allow_init=False)
    except ValueError as e:
        raise UserError(str(e)) from None


def _add_plans(args) -> int:
    from nnunetv2_allukan.trainers.nnUNetTrainerAllUKAN import nnUNetTrainerAllUKAN

    preprocessed = _require_env("nnUNet_preprocessed")
    name = _dataset_name(args.dataset)
    plans_file = os.path.join(preprocessed, name, args.plans + ".json")
    if not os.path.isfile(plans_file):
        raise UserError(f"plans file {plans_file} not found; run nnUNetv2_plan_and_preprocess -d {args.dataset} "
                        f"first, or pass -p with the plans identifier")
    target = args.name or f"{args.configuration}_allukan"
    ka_kwargs = dict(nnUNetTrainerAllUKAN.ka_kwargs)
    for key in ("spline_grad", "share", "grid_size", "skip_mode", "token_stages"):
        if getattr(args, key) is not None:
            ka_kwargs[key] = getattr(args, key)
    if args.grid_range is not None:
        ka_kwargs["grid_range"] = tuple(args.grid_range)
    with open(plans_file) as f:
        plans = json.load(f)
    if target in plans["configurations"] and not args.overwrite:
        raise UserError(f"configuration {target!r} already exists in {plans_file}; pass --overwrite to replace it")
    ka_kwargs["grid_range"] = list(ka_kwargs["grid_range"])
    new_plans = add_allukan_configuration(plans, args.configuration, target, ka_kwargs)
    _check_builds(new_plans, target)
    backup = plans_file + ".bak"
    if not os.path.exists(backup):
        shutil.copy2(plans_file, backup)
    tmp = plans_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new_plans, f, indent=4, sort_keys=False)
    os.replace(tmp, plans_file)
    print(f"Added configuration {target!r} (inherits {args.configuration!r}, network AllUKAN) to {plans_file}")
    print(f"Train it with the stock trainer:  nnUNetv2_train {args.dataset} {target} FOLD")
    return 0


def _demo(args) -> int:
    from . import demo
    return demo.main(args.rest)


def _make_dataset(args) -> int:
    from .data import templates as datasets
    raw = args.raw or _require_env("nnUNet_raw")
    if args.kind == "icbm2d":
        info = datasets.make_icbm152_2d(raw, args.dataset_id or 501, downsample=args.downsample,
                                        cross_template=not args.no_cross_template, overwrite=args.overwrite)
    else:
        info = datasets.make_icbm152_3d(raw, args.dataset_id or 503, downsample=args.downsample,
                                        overwrite=args.overwrite)
    print(f"{info['folder']}: {len(info['cases'])} training cases, {len(info.get('test_cases', []))} test cases")
    if args.kind == "icbm2d":
        # Neighbouring slices are near-duplicates: nnU-Net's random folds would leak, so write slab folds.
        preprocessed = args.preprocessed or os.environ.get("nnUNet_preprocessed")
        if preprocessed:
            path = datasets.write_splits(os.path.join(preprocessed, info["name"]),
                                         datasets.slab_splits(info["cases"]))
            print(f"contiguous slab folds written to {path} (nnU-Net uses them instead of random folds)")
        else:
            print("nnUNet_preprocessed is not set: no splits_final.json written; nnU-Net's random folds would put "
                  "neighbouring (near-identical) slices on both sides")
    print(f"Next: nnUNetv2_plan_and_preprocess -d {info['dataset_id']} --verify_dataset_integrity")
    return 0


def _plot_activations(args) -> int:
    from .checkpoints import load_network
    from .plots import plot_activations
    network, checkpoint = load_network(args.model)
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
    from . import profiler
    return profiler.main(args.rest)


def _bench_layers(args) -> int:
    from . import bench_layers
    bench_layers.main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2-allukan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ext-path", help="print the folder to put in nnUNet_extTrainer")
    p.set_defaults(func=_ext_path)
    for name, func, target in (("train", _train, "nnUNetv2_train"), ("predict", _predict, "nnUNetv2_predict")):
        p = sub.add_parser(name, help=f"run {target} with the ALL U-KAN trainers discoverable", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=f"arguments for {target}, unchanged")
        p.set_defaults(func=func)
    p = sub.add_parser("add-plans", help="add a plans configuration that names AllUKAN (stock trainer, no variable)")
    p.add_argument("-d", dest="dataset", required=True, help="dataset id or name")
    p.add_argument("-c", dest="configuration", required=True, help="configuration to inherit, e.g. 2d, 3d_fullres")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--name", help="new configuration name (default: <configuration>_allukan)")
    p.add_argument("--spline-grad", dest="spline_grad", choices=["free", "exact"])
    p.add_argument("--share", choices=["layer", "channel"])
    p.add_argument("--grid-size", dest="grid_size", type=int)
    p.add_argument("--grid-range", dest="grid_range", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--token-stages", dest="token_stages", type=int)
    p.add_argument("--skip-mode", dest="skip_mode", choices=["concat", "add"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing configuration of that name")
    p.set_defaults(func=_add_plans)
    p = sub.add_parser("demo", help="the real-data demo (see nnunetv2-allukan demo -h)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_demo)
    p = sub.add_parser("crossval", help="cross-validation benchmarking (see nnunetv2-allukan crossval -h)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_crossval)
    p = sub.add_parser("make-dataset", help="build a real-data nnU-Net raw dataset (ICBM152 from nilearn)")
    p.add_argument("kind", choices=["icbm2d", "icbm3d"])
    p.add_argument("--raw", help="nnUNet_raw folder (default: $nnUNet_raw)")
    p.add_argument("--preprocessed", help="nnUNet_preprocessed folder for splits_final.json "
                                          "(default: $nnUNet_preprocessed)")
    p.add_argument("--dataset-id", type=int)
    p.add_argument("--downsample", type=int, default=2)
    p.add_argument("--no-cross-template", action="store_true", help="icbm2d: skip the CAT12 test set")
    p.add_argument("--overwrite", action="store_true", help="rebuild the dataset if it exists")
    p.set_defaults(func=_make_dataset)
    p = sub.add_parser("plot-activations", help="PNG of the learned activations of a trained model")
    p.add_argument("model", help="checkpoint .pth or nnU-Net fold folder")
    p.add_argument("-o", dest="output", help="PNG path (default: activations.png next to the checkpoint)")
    p.add_argument("--max-channels", type=int, default=4, help="channels overlaid for share='channel'")
    p.set_defaults(func=_plot_activations)
    p = sub.add_parser("gradfid", help="cosine similarity of Grad-Free vs exact gradients (see gradfid -h)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_gradfid)
    p = sub.add_parser("profile", help="AllUKAN vs comparators (see nnunetv2-allukan profile -h)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_profile)
    p = sub.add_parser("bench-layers", help="layer benchmark (see python -m nnunetv2_allukan.bench_layers -h)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench_layers)
    return parser


PASS_THROUGH = {"train": _train, "predict": _predict, "bench-layers": _bench_layers, "demo": _demo,
                "crossval": _crossval, "profile": _profile, "gradfid": _gradfid}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASS_THROUGH:
        # argparse would try to interpret options such as -i meant for nnU-Net: hand them over untouched.
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=PASS_THROUGH[argv[0]])
    else:
        args = build_parser().parse_args(argv)
    from .checkpoints import CheckpointError
    from .data.templates import DatasetError
    try:
        return args.func(args)
    except (UserError, DatasetError, CheckpointError) as e:
        print(f"nnunetv2-allukan {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
