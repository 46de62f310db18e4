"""``nnunetv2-allukan``: small tools around nnU-Net for the ALL U-KAN plugin."""
from __future__ import annotations

import argparse
import os
import sys

EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext_trainers")


def _ext_path(args) -> int:
    print(EXT_TRAINER_DIR)
    return 0


def _bench_layers(args) -> int:
    from . import bench_layers
    bench_layers.main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2-allukan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ext-path", help="print the folder to put in nnUNet_extTrainer")
    p.set_defaults(func=_ext_path)
    p = sub.add_parser("bench-layers", help="layer benchmark (see python -m nnunetv2_allukan.bench_layers -h)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench_layers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
