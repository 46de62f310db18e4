"""Plumbing of the prepared GPU measurement (benchmarks/gpu_profile.sh), which CI cannot run: the script parses,
and its report combines kernel and profile results into the issue's targets."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_profile_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_profile.sh")], check=True)


def _profile(rows):
    return {"rows": [dict(key=k, name=n, size="512x512 b12", status="ok", eager_s=e, eager_s_vs_cnn=e / rows[0][2],
                          compiled_s_vs_cnn=None, peak_cuda_bytes_vs_cnn=p) for k, n, e, p in rows],
            "fallback": []}


def test_gpu_report_checks_the_targets(tmp_path):
    report = _load("gpu_report")
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "kernels").mkdir(parents=True)
    layers = [dict(module=m, ms=ms) for m, ms in (("KAonv2d triton", 1.0), ("KAonv2d torch", 4.0))]
    (work / "kernels" / "gpu_kernels.json").write_text(json.dumps({"layers": layers, "all_correct": True}))
    for run, free_s in (("p2d_triton", 1.2), ("p2d_torch", 6.0)):
        (work / run).mkdir()
        (work / run / "profile.json").write_text(json.dumps(_profile(
            [("cnn", "PlainConvUNet", 1.0, 1.0), ("free", "AllUKAN free", free_s, 1.2)])))
    report.main([str(work), str(out)])
    result = json.loads((out / "gpu_report.json").read_text())
    met = {c["target"]: c["met"] for c in result["targets"]}
    assert met == {"p2d_triton AllUKAN free: step <= 1.3x CNN": True,
                   "p2d_triton AllUKAN free: peak VRAM <= 1.15x CNN": False,
                   "KAonv2d: Triton >= 3.0x faster than torch": True,
                   "kernels match the torch path and are deterministic": True}
    headline = {r["run"]: r for r in result["headline"]}
    assert abs(headline["p2d_triton"]["eager_vs_other_backend"] - 0.2) < 1e-12
    assert "| p2d_torch | AllUKAN free |" in (out / "gpu_report.md").read_text()


def test_gpu_report_compiled_runs_have_no_other_backend(tmp_path):
    """A compiled run (Triton backend) is not compared with itself as its 'other backend'."""
    report = _load("gpu_report")
    work, out = tmp_path / "work", tmp_path / "out"
    run = work / "p2d_triton_compiled"
    run.mkdir(parents=True)
    rows = _profile([("cnn", "PlainConvUNet", 1.0, 1.0), ("free", "AllUKAN free", 1.1, 1.0)])
    rows["rows"][1]["compiled_s_vs_cnn"] = 1.25
    (run / "profile.json").write_text(json.dumps(rows))
    report.main([str(work), str(out)])
    result = json.loads((out / "gpu_report.json").read_text())
    (row,) = result["headline"]
    assert row["run"] == "p2d_triton_compiled" and row["eager_vs_other_backend"] is None
    met = {c["target"]: c["met"] for c in result["targets"]}
    assert met["p2d_triton_compiled AllUKAN free: step <= 1.3x CNN"] is True  # the compiled ratio, 1.25


def test_gpu_kernels_verdict_measures_both_paths_against_float64():
    kernels = _load("gpu_kernels")
    torch_err = {"phi": 1e-7, "grad_coef": 2e-5}
    assert kernels.triton_is_accurate({"phi": 1e-7, "grad_coef": 3.9e-5}, torch_err, 1e-5)  # within 2x torch's
    assert not kernels.triton_is_accurate({"phi": 1e-7, "grad_coef": 6e-5}, torch_err, 1e-5)  # 3x torch's
    assert not kernels.triton_is_accurate({"phi": 2e-5, "grad_coef": 1e-5}, torch_err, 1e-5)  # phi: 200x torch's
    assert kernels.triton_is_accurate({"phi": 9e-6, "grad_coef": 1e-5}, torch_err, 1e-5)  # within tolerance


def test_gpu_profile_keeps_time_for_the_report(tmp_path):
    """Parts that would run past BUDGET - REPORT_S are skipped, and the report is still written."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "DEVICE": "cpu", "PARTS": "kernels p2d",
           "BUDGET": "21", "REPORT_S": "20"}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_profile.sh")], check=True, env=env,
                   capture_output=True, timeout=300)
    log = (out / "gpu_log.txt").read_text()
    assert log.count("skipped") == 2 and "gpu_kernels.py --device cpu" in log, log
    assert (out / "gpu_report.md").exists() and (out / "gpu_report.json").exists()


def test_kernel_sass_reads_the_compiled_backward_kernel(tmp_path):
    """benchmarks/kernel_sass.py compiles a kernel for sm_90 on the CPU (triton's compiler, ptxas and cuobjdump from
    the wheel) and reads its loop, registers and barriers; run in a subprocess, because it must import triton
    without TRITON_INTERPRET (which this test session sets). Fails if the tools are missing or the listing cannot be
    parsed."""
    import sys

    import pytest

    pytest.importorskip("triton")
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_sass.py"), "--arch", "90", "--share", "layer",
                    "channel", "--dtype", "fp16", "--json", str(out), "--workdir", str(tmp_path)], check=True, env=env,
                   capture_output=True, text=True, timeout=600)
    every = json.loads(out.read_text())
    assert {(r["kernel"], r["share"], r["layout"]) for r in every} == {
        ("forward", "layer", "planes"), ("backward", "layer", "planes"), ("forward", "channel", "planes"),
        ("backward", "channel", "planes"), ("backward", "channel", "channels_fastest")}
    assert all(r["loop_instructions"] > 50 for r in every if r["kernel"] == "backward")  # each loop found and read
    records = {r["kernel"]: r for r in every if r["share"] == "layer"}
    backward = records["backward"]
    for key in ("loop_instructions_per_element", "registers", "loop_barriers", "spills"):
        assert key in backward
    assert backward["arch"] == 90 and backward["share"] == "layer" and backward["dtype"] == "fp16"
    assert backward["loop_instructions"] > 50 and 0 < backward["registers"] <= 255  # a loop was found and read
    assert records["forward"]["loop_instructions_per_element"] > 0
