"""Layer benchmark: one 32->32 3x3 layer (2D 4x32x64x64 or 3D 2x32x24^3 by default), as ratios to nnU-Net's
counterpart, Conv + LeakyReLU(0.01), measured in the same run.

Run ``nnunetv2-allukan bench-layers`` (``--dim 3`` for 3D, ``--threads N``). Every KA row is measured per spline
backend (the device's kernels: numba on the CPU, Triton on CUDA; and the torch path), share layer/channel,
Grad-Free and exact. Steps of all rows are interleaved round by round, and the ratio reported is the median over
rounds of each round's ratio to the baseline, so that a slow spell of a noisy machine hits both. Conv + GELU (the
first baseline of this benchmark) and the per-edge reference KAN (at a small size) are extra rows. Saved-for-
backward bytes are device-independent. Not a test: it prints, and optionally writes JSON and Markdown.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from ..kernels import cpu_kernels_status
from ..layers import KAonv2d, KAonv3d
from ..memory import saved_tensor_bytes
from ..reference import KANConv2d

BASELINE = "Conv+LeakyReLU"


class ConvThen(nn.Module):
    """nnU-Net's order inside a block is conv -> norm -> nonlinearity; for one layer, nonlinearity then conv is the
    same work as phi then conv in a KA layer."""

    def __init__(self, conv: nn.Module, nonlinearity):
        super().__init__()
        self.conv, self.nonlinearity = conv, nonlinearity

    def forward(self, x):
        return self.conv(self.nonlinearity(x))


def _step(module: nn.Module, x: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()


def _interleaved_seconds(modules: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict:
    """Per module, the list of step times, measured round by round (one step of every module per round)."""
    for module in modules.values():
        for _ in range(warmup):
            _step(module, x)
    times = {name: [] for name in modules}
    for _ in range(repeats):
        for name, module in modules.items():
            t0 = time.perf_counter()
            _step(module, x)
            times[name].append(time.perf_counter() - t0)
    return times


def backends_for(device: str) -> list[str]:
    """The kernels of the device first (when they run here), then the torch path."""
    if device.startswith("cuda"):
        return ["triton", "torch"]
    return (["cpu"] if cpu_kernels_status()["available"] else []) + ["torch"]


def run(batch=None, channels=32, size=None, repeats=7, compiled=False, reference=True, reference_size=16,
        device="cpu", dim=2):
    """Rows (dicts) of the benchmark; prints them as it goes."""
    batch = batch or (4 if dim == 2 else 2)
    size = size or (64 if dim == 2 else 24)
    shape = (batch, channels) + (size,) * dim
    conv, ka_conv = (nn.Conv2d, KAonv2d) if dim == 2 else (nn.Conv3d, KAonv3d)
    x = torch.randn(shape, device=device, requires_grad=True)
    leaky = lambda t: nn.functional.leaky_relu(t, 0.01)  # noqa: E731
    modules = {BASELINE: ConvThen(conv(channels, channels, 3, padding=1), leaky),
               "Conv+GELU": ConvThen(conv(channels, channels, 3, padding=1), nn.functional.gelu)}
    for backend in backends_for(device):
        for grad in ("free", "exact"):
            for share in ("layer", "channel"):
                modules[f"{ka_conv.__name__} {grad}/{share} [{backend}]"] = ka_conv(
                    channels, channels, 3, padding=1, spline_grad=grad, share=share, backend=backend)
    modules = {name: m.to(device) for name, m in modules.items()}
    rows = []
    for mode in ("eager", "compiled") if compiled else ("eager",):
        run_modules = modules if mode == "eager" else {n: torch.compile(m) for n, m in modules.items()}
        times = _interleaved_seconds(run_modules, x, repeats, warmup=1 if mode == "eager" else 2)
        base_times = times[BASELINE]
        base_saved = None
        for name, module in modules.items():
            ratio = statistics.median(t / b for t, b in zip(times[name], base_times))
            saved, _ = saved_tensor_bytes(lambda: module(x), exclude=module.parameters())
            base_saved = base_saved or saved
            row = dict(layer=name, mode=mode, input=list(shape), threads=torch.get_num_threads(),
                       ms=statistics.median(times[name]) * 1e3, time_ratio=ratio, saved_bytes=saved,
                       saved_ratio=saved / base_saved)
            rows.append(row)
            print(f"{name:<34} {mode:<9} {row['ms']:9.1f} ms  x{ratio:6.2f}   saved {saved / 2 ** 20:8.1f} MiB  "
                  f"x{row['saved_ratio']:6.2f}", flush=True)
    if reference and dim == 2:
        # The per-edge KAN is far too slow and large at the full size; measure it, and the baseline, smaller.
        small = (batch, channels, reference_size, reference_size)
        xs = torch.randn(small, device=device, requires_grad=True)
        small_modules = {BASELINE: ConvThen(nn.Conv2d(channels, channels, 3, padding=1), leaky),
                         "KAonv2d free/layer": KAonv2d(channels, channels, 3, padding=1),
                         "KANConv2d (reference)": KANConv2d(channels, channels, 3, padding=1)}
        small_modules = {n: m.to(device) for n, m in small_modules.items()}
        times = _interleaved_seconds(small_modules, xs, max(1, repeats // 2), warmup=1)
        base_saved = None
        for name, module in small_modules.items():
            ratio = statistics.median(t / b for t, b in zip(times[name], times[BASELINE]))
            saved, _ = saved_tensor_bytes(lambda: module(xs), exclude=module.parameters())
            base_saved = base_saved or saved
            n_params = sum(p.numel() for p in module.parameters())
            rows.append(dict(layer=name, mode="eager", input=list(small), threads=torch.get_num_threads(),
                             ms=statistics.median(times[name]) * 1e3, time_ratio=ratio, saved_bytes=saved,
                             saved_ratio=saved / base_saved, params=n_params))
            print(f"{name:<34} eager@{reference_size:<3} {rows[-1]['ms']:9.1f} ms  x{ratio:6.2f}   "
                  f"saved {saved / 2 ** 20:8.1f} MiB  x{saved / base_saved:6.2f}   params {n_params}", flush=True)
    return rows


def markdown_table(rows) -> str:
    lines = [f"| layer | mode | input | threads | fwd+bwd ms (median) | time / {BASELINE} (median of rounds) | "
             f"saved / {BASELINE} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['mode']} | {'x'.join(map(str, r['input']))} | {r['threads']} | "
                     f"{r['ms']:.1f} | {r['time_ratio']:.2f} | {r['saved_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nnunetv2-allukan bench-layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2, help="KAonv2d or KAonv3d (default 2)")
    parser.add_argument("--batch", type=int, help="default 4 (2D) or 2 (3D)")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, help="spatial size per dimension, default 64 (2D) or 24 (3D)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (times are synchronised on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd layers")
    parser.add_argument("--no-reference", action="store_true", help="skip the per-edge KANConv2d rows")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--markdown", help="also write a Markdown table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = cpu_kernels_status()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU kernels: "
          f"{'loaded in %.1f s' % kernels['load_seconds'] if kernels['available'] else kernels['error']}", flush=True)
    rows = run(args.batch, args.channels, args.size, args.repeats, args.compile, not args.no_reference,
               device=args.device, dim=args.dim)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(rows) + "\n")
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
