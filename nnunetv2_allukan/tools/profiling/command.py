"""``nnunetv2-allukan profile``: ALL U-KAN against its comparators on the same nnU-Net plans, patch and batch.

For each network (nnU-Net's PlainConvUNet, AllUKAN in its gradient modes and memory alternatives, UKAN,
StackedKAN) it reports parameters, FLOPs of one forward+backward (``torch.utils.flop_counter``: matmuls and
convolutions only, elementwise spline work is not counted), the bytes autograd saves for backward (unique
storages, parameters excluded, fp32, no autocast, so device-independent), the peak CUDA allocator memory of a
training step (CUDA only), and the median time of a training step (forward, deep-supervision cross-entropy,
backward, SGD step), eager and, with ``--compile``, compiled. Ratios are to PlainConvUNet and to StackedKAN at
the same size.

Inputs: a dataset's plans (``-d D -c 2d|3d_fullres [-p PLANS]``, read from
``$nnUNet_preprocessed/<dataset>/<plans>.json``) or a synthetic configuration (``--dim 2|3 --patch ...``), whose
stages, strides and kernels come from nnU-Net's ``get_pool_and_conv_props`` and whose widths and block counts
follow nnU-Net 2.8's default planner (see ``synthetic_plans``).

A network that does not fit (its estimated need exceeds ``--max-memory-gb``, or the allocator runs out) or whose
step exceeds ``--max-seconds`` is retried at half the batch, then half the patch, down to the smallest patch the
plans allow; the table says where it stopped. Its saved bytes at the requested size are still reported, as an
estimate from a run on fake tensors (no memory is allocated), marked with ``~``. Every network that ran at a
smaller size is compared there against all others, in a second table.

Rows (``--rows``):
  cnn         PlainConvUNet, nnU-Net's CNN (the plans' own dynamic-network-architectures class, if any)
  free        AllUKAN, Grad-Free Spline (the paper's); the basis is recomputed in backward; the spline runs on the
              device's kernels (numba on the CPU, Triton on CUDA)
  free-torch  ``free`` with the spline on the torch path (the reference implementation, no kernels)
  exact       AllUKAN, exact spline gradient; the basis is recomputed in backward
  dense       AllUKAN, exact gradient by plain autograd through the dense B-spline basis (no recompute)
  dense-ckpt  ``dense`` with torch.utils.checkpoint around every encoder and decoder stage
  exact-ckpt  ``exact`` with torch.utils.checkpoint around every encoder and decoder stage
  free-unfused  ``free`` with phi and the conv as two autograd ops (``fuse_activation = False``): phi(x) is kept
              for the conv's weight gradient, one more activation-sized tensor per KA layer than the fused
              layers (``free``), which recompute phi(x) in backward
  ukan        UKAN (partial KA: CNN stages, per-edge KANLinear in the tokenised stages)
  stacked     StackedKAN (per-edge KAN everywhere, the "directly deeply stacked KAN")
"""
from __future__ import annotations

import argparse
import sys

import torch

from .configs import NetworkConfig, ProfileError, plans_config, synthetic_plans
from .measure import Options
from .report import terminal_table, write_outputs
from .sweep import run_profile
from .variants import DEFAULT_ROWS, VARIANT_BY_KEY


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2-allukan profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    plans = parser.add_argument_group("from a dataset's plans")
    plans.add_argument("-d", dest="dataset", help="dataset id or name in $nnUNet_preprocessed")
    plans.add_argument("-c", dest="configuration", help="configuration, e.g. 2d or 3d_fullres")
    plans.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    synthetic = parser.add_argument_group("synthetic configuration (nnU-Net planner rules)")
    synthetic.add_argument("--dim", type=int, choices=[2, 3])
    synthetic.add_argument("--spacing", type=float, nargs="+", help="voxel spacing (default 1 per axis)")
    synthetic.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    synthetic.add_argument("--classes", type=int, default=3, help="output channels (default 3)")
    synthetic.add_argument("--base-features", type=int, default=32, help="first stage width (nnU-Net: 32)")
    synthetic.add_argument("--max-features", type=int, help="width cap (nnU-Net: 512 in 2D, 320 in 3D)")
    parser.add_argument("--patch", type=int, nargs="+", help="patch size (synthetic: required; plans: override)")
    parser.add_argument("--batch", type=int, help="batch size (default: the plans', or 2)")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"comma-separated rows (default all): {', '.join(DEFAULT_ROWS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per network (median; default 3)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    parser.add_argument("--no-time", dest="time_steps", action="store_false",
                        help="only parameters, FLOPs and saved bytes (no training steps)")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no fp16 autocast on CUDA")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="a step slower than this counts as not fitting (default 120)")
    parser.add_argument("--max-memory-gb", type=float,
                        help="CPU memory a network may need (default: half of the available memory)")
    parser.add_argument("--no-fallback", dest="fallback", action="store_false",
                        help="do not retry a network that does not fit at a smaller batch/patch")
    parser.add_argument("--out", default="allukan_profile", help="output folder (default ./allukan_profile)")
    return parser


def _available_memory_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2 ** 30


def config_from_args(args) -> NetworkConfig:
    if args.dataset is not None or args.configuration is not None:
        if args.dataset is None or args.configuration is None:
            raise ProfileError("plans input needs both -d DATASET and -c CONFIGURATION")
        if args.dim is not None:
            raise ProfileError("give either -d/-c (a dataset's plans) or --dim/--patch (synthetic), not both")
        return plans_config(args.dataset, args.configuration, args.plans, args.patch, args.batch)
    if args.dim is None or args.patch is None:
        raise ProfileError("give -d DATASET -c CONFIGURATION, or a synthetic configuration with --dim and --patch")
    return synthetic_plans(args.dim, args.patch, 2 if args.batch is None else args.batch, args.channels,
                           args.classes, args.spacing, args.base_features, args.max_features)


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in VARIANT_BY_KEY]
        if unknown or not rows:
            raise ProfileError(f"unknown rows {unknown}; choose from {', '.join(DEFAULT_ROWS)}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ProfileError("--device cuda, but CUDA is not available")
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = config_from_args(args)
        budget = args.max_memory_gb * 2 ** 30 if args.max_memory_gb else 0.5 * _available_memory_bytes()
        options = Options(device=args.device, repeats=args.repeats, compile=args.compile,
                          time_steps=args.time_steps, max_seconds=args.max_seconds, max_memory_bytes=budget,
                          amp=args.amp, fallback=args.fallback, log=lambda s: print(s, flush=True))
        result = run_profile(cfg, rows, options)
    except ProfileError as e:
        print(f"nnunetv2-allukan profile: error: {e}", file=sys.stderr)
        return 2
    print()
    print(terminal_table(result["rows"]))
    for table in result["fallback"]:
        print(f"\nAll networks at {table[0]['size']}:")
        print(terminal_table(table))
    paths = write_outputs(result, args.out)
    print(f"\nwrote {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
