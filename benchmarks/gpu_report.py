"""Combine the runs of benchmarks/gpu_profile.sh into one report: gpu_report.md and gpu_report.json.

Reads, from the work folder, ``kernels/gpu_kernels.json`` (benchmarks/gpu_kernels.py) and ``<run>/profile.json``
of every ``nnunetv2-allukan profile`` run (``p2d_triton``, ``p3d_triton``, ``p2d_torch``, ``p3d_torch``: the
spline on the Triton kernels, or on the torch path with ALLUKAN_SPLINE_BACKEND=torch; ``p2d_triton_compiled``,
``p3d_triton_compiled``: with ``--compile``), and checks issue 11's GPU
targets: AllUKAN step <= 1.3x PlainConvUNet's and peak VRAM <= 1.15x (fp16 autocast, same plans); the Triton path
>= 3x faster than the torch path per KA layer.

Usage: ``python benchmarks/gpu_report.py WORK_DIR OUT_DIR``.
"""
from __future__ import annotations

import json
import os
import sys

# Eager runs on each spline backend, then compiled runs (Triton backend) in their own folders, so that a slow
# compilation cut off by its part's time limit loses only the compiled numbers.
RUNS = ("p2d_triton", "p3d_triton", "p2d_torch", "p3d_torch", "p2d_triton_compiled", "p3d_triton_compiled")
STEP_TARGET, PEAK_TARGET, LAYER_SPEEDUP_TARGET = 1.3, 1.15, 3.0


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def headline_rows(runs: dict) -> list[dict]:
    """One row per (run, AllUKAN variant): ratios to the CNN of the same run, and to the same variant on the
    other backend."""
    rows = []
    for run, result in runs.items():
        if result is None:
            continue
        other = runs.get(run.replace("triton", "torch") if "triton" in run else run.replace("torch", "triton"))
        other_rows = {r["key"]: r for r in (other or {}).get("rows", [])}
        for r in result["rows"]:
            if r["key"] == "cnn":
                continue
            o = other_rows.get(r["key"])
            vs_other = None
            if o and o.get("eager_s") and r.get("eager_s"):
                vs_other = r["eager_s"] / o["eager_s"]
            rows.append(dict(run=run, network=r["name"], size=r["size"], status=r["status"],
                             eager_vs_cnn=r.get("eager_s_vs_cnn"), compiled_vs_cnn=r.get("compiled_s_vs_cnn"),
                             peak_vs_cnn=r.get("peak_cuda_bytes_vs_cnn"), eager_vs_other_backend=vs_other))
    return rows


def targets(kernels: dict | None, rows: list[dict]) -> list[dict]:
    checks = []
    for r in rows:
        if "triton" not in r["run"] or not r["network"].startswith("AllUKAN"):
            continue
        step = r["compiled_vs_cnn"] if r["compiled_vs_cnn"] is not None else r["eager_vs_cnn"]
        checks.append(dict(target=f"{r['run']} {r['network']}: step <= {STEP_TARGET}x CNN", value=step,
                           met=None if step is None else step <= STEP_TARGET))
        checks.append(dict(target=f"{r['run']} {r['network']}: peak VRAM <= {PEAK_TARGET}x CNN",
                           value=r["peak_vs_cnn"],
                           met=None if r["peak_vs_cnn"] is None else r["peak_vs_cnn"] <= PEAK_TARGET))
    if kernels:
        ms = {r["module"]: r["ms"] for r in kernels["layers"]}
        speedup = ms["KAonv2d torch"] / ms["KAonv2d triton"]
        checks.append(dict(target=f"KAonv2d: Triton >= {LAYER_SPEEDUP_TARGET}x faster than torch", value=speedup,
                           met=speedup >= LAYER_SPEEDUP_TARGET))
        checks.append(dict(target="kernels match the torch path and are deterministic", value=None,
                           met=kernels["all_correct"]))
    return checks


def markdown(report: dict, work: str) -> str:
    lines = ["# GPU profile (benchmarks/gpu_profile.sh)", "", "## Targets (issue 11)", "",
             "| target | value | met |", "|---|---|---|"]
    for c in report["targets"]:
        met = "n/a" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['target']} | {_fmt(c['value'])} | {met} |")
    lines += ["", "## AllUKAN against PlainConvUNet, fp16 autocast", "",
              "| run | network | size | status | eager /CNN | compiled /CNN | peak VRAM /CNN | eager / other backend |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["headline"]:
        lines.append(f"| {r['run']} | {r['network']} | {r['size']} | {r['status']} | {_fmt(r['eager_vs_cnn'])} | "
                     f"{_fmt(r['compiled_vs_cnn'])} | {_fmt(r['peak_vs_cnn'])} | {_fmt(r['eager_vs_other_backend'])} |")
    for name in ("kernels/gpu_kernels.md", *(f"{run}/profile.md" for run in RUNS)):
        path = os.path.join(work, name)
        if os.path.exists(path):
            with open(path) as f:
                lines += ["", f"<!-- {name} -->", f.read().replace("\n# ", "\n### ").replace("# ", "### ", 1)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    work, out = argv
    kernels = _load(os.path.join(work, "kernels", "gpu_kernels.json"))
    runs = {run: _load(os.path.join(work, run, "profile.json")) for run in RUNS}
    rows = headline_rows(runs)
    report = dict(kernels=kernels, runs=runs, headline=rows, targets=targets(kernels, rows))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "gpu_report.md"), "w") as f:
        f.write(markdown(report, work))
    print(markdown(report, work).split("## AllUKAN")[0])


if __name__ == "__main__":
    main()
