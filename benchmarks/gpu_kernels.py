"""The Triton kernels against the torch path on one device (issue 11's kernel checks): one JSON and one Markdown file.

1. Correctness at realistic sizes: phi and every gradient of SharedSplineActivation, Triton against torch, for
   both shares, both gradient modes, both base functions, fp32/fp16/bf16 inputs, NCHW and channels_last;
   error = max |triton - torch| / max |torch| per output. The coefficient and base-weight gradients are sums over
   every element of the input (a million at the realistic size), which the two paths add in different orders, so
   their fp32 results differ by more than one rounding; the verdict therefore compares each path with a float64
   evaluation of the same rounded inputs (torch path): the Triton path passes where its error is within the
   dtype's tolerance or at most twice the torch path's own error.
2. Determinism: two backward passes of the Triton path give bitwise-equal gradients (no atomics by design).
3. Per-layer step and peak memory under fp16 autocast (as nnU-Net trains): a fused 3x3 KAonv2d forward+backward
   with the Triton kernels and with the torch path, against LeakyReLU + Conv2d of the same shape; and the spline
   alone (SharedSplineActivation), Triton against torch.

Usage: ``python benchmarks/gpu_kernels.py --device cuda --out DIR``. Plumbing check without a GPU:
``TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --device cpu --quick --out DIR`` (tiny sizes, the kernels in
Triton's interpreter; the timings then mean nothing).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import time
import warnings

import torch
from torch import nn

from nnunetv2_allukan.activation import SharedSplineActivation
from nnunetv2_allukan.layers import KAonv2d

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _run(act, x, g):
    act.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    phi = act(x)
    phi.backward(g)
    return {"phi": phi, "grad_x": x.grad, "grad_coef": act.coef.grad, "grad_base_weight": act.base_weight.grad}


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def triton_is_accurate(triton_vs_fp64: dict, torch_vs_fp64: dict, tolerance: float) -> bool:
    """Each output of the Triton path within ``tolerance`` of float64, or at most twice the torch path's error."""
    return all(triton_vs_fp64[k] <= max(tolerance, 2 * torch_vs_fp64[k]) for k in torch_vs_fp64)


def correctness(device: str, shape) -> list[dict]:
    rows = []
    for share, spline_grad, spline_init, dtype, layout in itertools.product(
            ("layer", "channel"), ("free", "exact"), ("silu-noise", "leakyrelu"),
            (torch.float32, torch.float16, torch.bfloat16), ("nchw", "channels_last")):
        torch.manual_seed(0)
        act = SharedSplineActivation(shape[1], share=share, spline_grad=spline_grad, spline_init=spline_init,
                                     backend="torch").to(device)
        with torch.no_grad():
            act.coef.normal_()
            act.base_weight.uniform_(0.5, 1.5)
        x = (torch.randn(shape, device=device) * 3).to(dtype)
        g = torch.randn(shape, device=device).to(dtype)
        if layout == "channels_last":
            x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
        exact = _run(copy.deepcopy(act).double(), x.double(), g.double())
        reference = _run(act, x, g)
        act.backend = "triton"
        result = _run(act, x, g)
        errors = {k: _relative_error(result[k], reference[k]) for k in reference}
        triton_vs_fp64 = {k: _relative_error(result[k], exact[k]) for k in exact}
        torch_vs_fp64 = {k: _relative_error(reference[k], exact[k]) for k in exact}
        rows.append(dict(share=share, spline_grad=spline_grad, base=act.base, dtype=str(dtype).replace("torch.", ""),
                         layout=layout, errors=errors, triton_vs_fp64=triton_vs_fp64, torch_vs_fp64=torch_vs_fp64,
                         ok=triton_is_accurate(triton_vs_fp64, torch_vs_fp64, TOLERANCE[dtype])
                         and result["phi"].stride() == reference["phi"].stride()))
    return rows


def determinism(device: str, shape) -> dict:
    act = SharedSplineActivation(shape[1], share="channel", spline_grad="exact", backend="triton").to(device)
    x = torch.randn(shape, device=device) * 3
    g = torch.randn(shape, device=device)
    first, second = _run(act, x, g), _run(act, x, g)
    return {k: bool(torch.equal(first[k], second[k])) for k in first}


class LeakyConv(nn.Module):
    """nnU-Net's nonlinearity then the next conv: the CNN's counterpart of one KAonv2d."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):
        return self.conv(nn.functional.leaky_relu(x, 0.01))


def _synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step_stats(module, x, device, repeats):
    """(median seconds, peak bytes above the start) of forward+backward under fp16 autocast on CUDA."""
    amp = device.startswith("cuda")

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(device.split(":")[0], dtype=torch.float16, enabled=amp):
            y = module(x)
        y.float().sum().backward()
        _synchronize(device)

    step()  # warm-up: Triton compiles, cuDNN picks its algorithms
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = None
    if device.startswith("cuda"):
        module.zero_grad(set_to_none=True)
        x.grad = None
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        peak = torch.cuda.max_memory_allocated(device) - start
    return statistics.median(times), peak


def layer_speed(device: str, shape, repeats: int) -> list[dict]:
    c = shape[1]
    x = torch.randn(shape, device=device, requires_grad=True)
    modules = [("LeakyReLU+Conv2d", LeakyConv(c, c)),
               ("KAonv2d triton", KAonv2d(c, c, 3, padding=1, backend="triton")),
               ("KAonv2d torch", KAonv2d(c, c, 3, padding=1, backend="torch")),
               ("spline alone triton", SharedSplineActivation(c, backend="triton")),
               ("spline alone torch", SharedSplineActivation(c, backend="torch")),
               ("LeakyReLU alone", nn.LeakyReLU(0.01))]
    rows = []
    for name, module in modules:
        seconds, peak = _step_stats(module.to(device), x, device, repeats)
        rows.append(dict(module=name, input=list(shape), ms=seconds * 1e3, peak_bytes=peak))
    base = {r["module"]: r for r in rows}
    for r in rows:
        ref = base["LeakyReLU alone" if "alone" in r["module"] else "LeakyReLU+Conv2d"]
        r["time_vs_leaky"] = r["ms"] / ref["ms"]
        r["peak_vs_leaky"] = None if r["peak_bytes"] is None or not ref["peak_bytes"] else \
            r["peak_bytes"] / ref["peak_bytes"]
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Triton kernels vs torch path ({report['device_name']}, torch {report['torch']})", "",
             f"## Correctness, input {report['correctness_shape']}", "",
             "Columns phi ... grad w_b: max |triton - torch| / max |torch|. Worst vs fp64: the largest error of each "
             "path against a float64 evaluation; ok: Triton within the dtype's tolerance or within 2x the torch "
             "path's error.", "",
             "| share | gradient | base | dtype | layout | phi | grad x | grad coef | grad w_b | "
             "triton worst vs fp64 | torch worst vs fp64 | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["correctness"]:
        e = r["errors"]
        lines.append(f"| {r['share']} | {r['spline_grad']} | {r['base']} | {r['dtype']} | {r['layout']} | "
                     f"{e['phi']:.1e} | {e['grad_x']:.1e} | {e['grad_coef']:.1e} | {e['grad_base_weight']:.1e} | "
                     f"{max(r['triton_vs_fp64'].values()):.1e} | {max(r['torch_vs_fp64'].values()):.1e} | "
                     f"{'yes' if r['ok'] else '**no**'} |")
    lines += ["", f"Determinism (two backward passes bitwise equal): {report['determinism']}", "",
              f"## Per layer, forward+backward, fp16 autocast: input {report['layer_shape']}", "",
              "| module | ms (median) | time / LeakyReLU(+Conv) | peak MiB | peak / LeakyReLU(+Conv) |",
              "|---|---|---|---|---|"]
    for r in report["layers"]:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 20:.1f}"
        ratio = "n/a" if r["peak_vs_leaky"] is None else f"{r['peak_vs_leaky']:.2f}"
        lines.append(f"| {r['module']} | {r['ms']:.3f} | {r['time_vs_leaky']:.2f} | {peak} | {ratio} |")
    ms = {r["module"]: r["ms"] for r in report["layers"]}
    lines += ["", f"Triton path speed-up over the torch path: KAonv2d {ms['KAonv2d torch'] / ms['KAonv2d triton']:.2f}x, "
              f"spline alone {ms['spline alone torch'] / ms['spline alone triton']:.2f}x (target: >= 3x per KA layer)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_kernels")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (plumbing check)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter's numpy exp overflow
    correctness_shape = (2, 4, 5, 7) if args.quick else (4, 32, 96, 96)
    layer_shape = (2, 4, 8, 8) if args.quick else (16, 32, 256, 256)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    report = dict(device=args.device, device_name=device_name, torch=torch.__version__,
                  correctness_shape=list(correctness_shape), layer_shape=list(layer_shape))
    report["correctness"] = correctness(args.device, correctness_shape)
    report["determinism"] = determinism(args.device, correctness_shape)
    report["layers"] = layer_speed(args.device, layer_shape, 2 if args.quick else args.repeats)
    report["all_correct"] = all(r["ok"] for r in report["correctness"]) and all(report["determinism"].values())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(args.out, "gpu_kernels.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if report["all_correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
