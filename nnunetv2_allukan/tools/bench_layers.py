"""Layer benchmark: one 32->32 3x3 layer on a 16x32x64x64 input, as ratios to Conv2d + GELU.

Run ``python -m nnunetv2_allukan.bench_layers`` (or ``nnunetv2-allukan bench-layers``). Reports the median
fwd+bwd time and the saved-for-backward bytes of every variant relative to Conv2d+GELU measured in the same
run, so the numbers are comparable across noisy machines. Not a test: it prints, and optionally writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from ..layers import KAonv2d
from ..memory import saved_tensor_bytes
from ..reference import KANConv2d


class ConvGELU(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):
        return self.conv(nn.functional.gelu(x))


def _median_step_seconds(module: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> float:
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(batch=16, channels=32, size=64, repeats=5, compiled=True, reference=True, reference_size=16,
        device="cpu"):
    shape = (batch, channels, size, size)
    x = torch.randn(shape, device=device, requires_grad=True)
    variants: list[tuple[str, nn.Module, bool]] = [("Conv2d+GELU", ConvGELU(channels, channels), False)]
    for grad in ("free", "exact"):
        for share in ("layer", "channel"):
            variants.append((f"KAonv2d {grad}/{share}",
                             KAonv2d(channels, channels, 3, padding=1, spline_grad=grad, share=share), False))
    if compiled:
        variants.append(("Conv2d+GELU", ConvGELU(channels, channels), True))
        for grad in ("free", "exact"):
            for share in ("layer", "channel"):
                variants.append((f"KAonv2d {grad}/{share}",
                                 KAonv2d(channels, channels, 3, padding=1, spline_grad=grad, share=share), True))
    rows = []
    baseline = {}
    for name, module, is_compiled in variants:
        module = module.to(device)
        run_module = torch.compile(module) if is_compiled else module
        seconds = _median_step_seconds(run_module, x, repeats, warmup=2 if is_compiled else 1)
        saved, _ = saved_tensor_bytes(lambda: module(x), exclude=module.parameters())
        mode = "compiled" if is_compiled else "eager"
        if name == "Conv2d+GELU":
            baseline[mode] = (seconds, saved)
        base_s, base_b = baseline[mode]
        rows.append(dict(layer=name, mode=mode, input=list(shape), ms=seconds * 1e3, time_ratio=seconds / base_s,
                         saved_bytes=saved, saved_ratio=saved / base_b))
        print(f"{name:<24} {mode:<9} {seconds * 1e3:9.1f} ms  x{seconds / base_s:6.2f}   "
              f"saved {saved / 2 ** 20:8.1f} MiB  x{saved / base_b:6.2f}", flush=True)
    if reference:
        # The per-edge KAN is far too slow and large at the full size; measure it, and the baseline, smaller.
        small = (batch, channels, reference_size, reference_size)
        xs = torch.randn(small, device=device, requires_grad=True)
        for name, module in (("Conv2d+GELU", ConvGELU(channels, channels)),
                             ("KAonv2d free/layer", KAonv2d(channels, channels, 3, padding=1)),
                             ("KANConv2d (reference)", KANConv2d(channels, channels, 3, padding=1))):
            module = module.to(device)
            seconds = _median_step_seconds(module, xs, max(1, repeats // 2), warmup=1)
            saved, _ = saved_tensor_bytes(lambda: module(xs), exclude=module.parameters())
            if name == "Conv2d+GELU":
                base_s, base_b = seconds, saved
            n_params = sum(p.numel() for p in module.parameters())
            rows.append(dict(layer=name, mode="eager", input=list(small), ms=seconds * 1e3,
                             time_ratio=seconds / base_s, saved_bytes=saved, saved_ratio=saved / base_b,
                             params=n_params))
            print(f"{name:<24} eager@{reference_size:<3} {seconds * 1e3:9.1f} ms  x{seconds / base_s:6.2f}   "
                  f"saved {saved / 2 ** 20:8.1f} MiB  x{saved / base_b:6.2f}   params {n_params}", flush=True)
    return rows


def markdown_table(rows) -> str:
    lines = ["| layer | mode | input | fwd+bwd ms (median) | time / Conv2d+GELU | saved / Conv2d+GELU |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['mode']} | {'x'.join(map(str, r['input']))} | {r['ms']:.1f} | "
                     f"{r['time_ratio']:.2f} | {r['saved_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nnunetv2-allukan bench-layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (times are synchronised on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-reference", action="store_true", help="skip the per-edge KANConv2d rows")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--markdown", help="also write a Markdown table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = run(args.batch, args.channels, args.size, args.repeats, not args.no_compile, not args.no_reference,
               device=args.device)
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
