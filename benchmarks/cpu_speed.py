"""Whole-network CPU speed of ALL U-KAN against nnU-Net's CNN, per spline backend: the training step and the
inference forward (what sliding-window prediction runs per patch), on the same nnU-Net plans, patch and batch.

The networks come from the profiler's synthetic plans (nnU-Net 2.8's planner rules) and its training step (forward,
deep-supervision cross-entropy, backward, nnU-Net's SGD). All networks step round by round, and each ratio is the
median over rounds of that round's ratio to the CNN, so that a slow spell of a noisy machine hits both.

    python benchmarks/cpu_speed.py --dim 2 --patch 128 128 --batch 2 --threads 1 --rounds 9 --json out.json
    python benchmarks/cpu_speed.py --dim 3 --patch 64 64 64 --batch 2 --threads 2

Rows: ``cnn`` (PlainConvUNet), ``allukan`` (the default: numba kernels on the CPU), ``allukan-torch`` (the torch
path of the spline). The first step of each network is not timed (numba loads or compiles its kernels then).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from nnunetv2_allukan.kernels import cpu_kernels_status
from nnunetv2_allukan.tools.profiling import measure, variants
from nnunetv2_allukan.tools.profiling.configs import synthetic_plans

ROWS = {"cnn": "cnn", "allukan": "free", "allukan-torch": "free-torch"}


def _forward_seconds(network, x) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        network(x)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2)
    parser.add_argument("--patch", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = synthetic_plans(args.dim, args.patch, args.batch)
    options = measure.Options(device="cpu", amp=False)
    x = torch.randn(args.batch, cfg.input_channels, *args.patch)
    trainers, inference = {}, {}
    for row, key in ROWS.items():
        network = variants.build_network(variants.VARIANT_BY_KEY[key], cfg)
        targets = measure.random_targets(measure._outputs_list(network(x)), cfg.num_classes)
        trainers[row] = measure._Trainer(network, x, targets, options, compiled=False)
        trainers[row].step()  # untimed: first use
        network.eval()
        inference[row] = network
        _forward_seconds(network, x)
        network.train()
    step = {row: [] for row in ROWS}
    forward = {row: [] for row in ROWS}
    for r in range(args.rounds):
        for row, trainer in trainers.items():
            step[row].append(trainer.step())
        for row, network in inference.items():
            network.eval()
            forward[row].append(_forward_seconds(network, x))
            network.train()
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{row} {step[row][-1]:.3f} s" for row in ROWS),
              file=sys.stderr, flush=True)

    def ratio(times, row):
        return statistics.median(a / b for a, b in zip(times[row], times["cnn"]))

    result = {
        "config": {"dim": args.dim, "patch": args.patch, "batch": args.batch, "threads": args.threads,
                   "rounds": args.rounds, "torch": torch.__version__, "cpu_kernels": cpu_kernels_status()},
        "rows": {row: {"train_step_s": statistics.median(step[row]), "train_step_vs_cnn": ratio(step, row),
                       "forward_s": statistics.median(forward[row]), "forward_vs_cnn": ratio(forward, row)}
                 for row in ROWS},
    }
    print(f"{args.dim}D patch {args.patch} batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds")
    print("| network | train step s | / CNN | inference forward s | / CNN |")
    print("|---|---|---|---|---|")
    for row, r in result["rows"].items():
        print(f"| {row} | {r['train_step_s']:.3f} | {r['train_step_vs_cnn']:.2f} | {r['forward_s']:.3f} | "
              f"{r['forward_vs_cnn']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
