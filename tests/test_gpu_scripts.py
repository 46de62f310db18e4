"""Plumbing of the prepared GPU measurement (benchmarks/gpu_profile.sh), which CI cannot run: the script parses,
and its report combines kernel and profile results into the issue's targets."""
import importlib.util
import json
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
