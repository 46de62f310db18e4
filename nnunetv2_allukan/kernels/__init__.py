"""Kernels of the shared spline activation: GPU (DESIGN.md §9) and CPU (§10).

* ``triton_spline``: the Triton kernels (phi in one pass; dL/dx, table and base-weight gradients in another);
* ``ops``: the ``torch.library`` custom ops ``allukan::spline_phi`` / ``allukan::spline_phi_backward`` around them,
  which the activation's autograd Functions call and ``torch.compile`` sees as one opaque op each;
* ``cpu_spline`` / ``cpu_ops``: the same pair for CPU tensors, compiled by numba
  (``allukan::spline_phi_cpu`` / ``allukan::spline_phi_backward_cpu``).

Importing this package loads neither triton, numba nor the kernels; ``resolve_backend`` decides, per input, whether
the torch path or the kernels evaluate the spline.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings

BACKENDS = ("auto", "torch", "triton", "cpu")
# Chooses the backend of every activation built with backend="auto", e.g. ALLUKAN_SPLINE_BACKEND=torch to train or
# profile a network on a GPU with the torch path, without code changes (as nnU-Net's own nnUNet_compile).
BACKEND_ENV = "ALLUKAN_SPLINE_BACKEND"
# Looked up once (without importing triton), so that resolve_backend stays a constant under torch.compile.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Values per call the Triton kernels take (int32 offsets, with room for the last tile's overhang); "auto" sends
# larger inputs to the torch path.
TRITON_MAX_ELEMENTS = 2 ** 30
NUMBA_INSTALLED = importlib.util.find_spec("numba") is not None
# Whether the numba CPU kernels loaded and passed their smoke test: None until first asked (cpu_kernels_available),
# then a constant, so that resolve_backend stays one under torch.compile. CPU_KERNELS_LOAD_SECONDS: what the first
# load took (compilation on a machine's first use, loading numba's on-disk cache afterwards).
_CPU_KERNELS: dict = {"available": None, "load_seconds": None, "error": None}


def cpu_kernels_available() -> bool:
    """Whether the numba CPU kernels can run here. Decided once per process: numba imported, the kernels compiled
    (or loaded from numba's cache) and checked on a few values against the closed-form spline. If anything fails,
    one warning says why, and ``backend="auto"`` uses the torch path."""
    if _CPU_KERNELS["available"] is None:
        if not NUMBA_INSTALLED:
            _CPU_KERNELS.update(available=False, error="numba is not installed")
        else:
            start = time.perf_counter()
            try:
                from . import cpu_ops

                cpu_ops.smoke_test()
                _CPU_KERNELS.update(available=True, load_seconds=time.perf_counter() - start)
            except Exception as error:  # any failure to import, compile or agree: fall back, say so once
                _CPU_KERNELS.update(available=False, error=f"{type(error).__name__}: {error}")
                warnings.warn(f"the numba CPU kernels of the spline could not be used ({_CPU_KERNELS['error']}); "
                              "backend='auto' runs the torch path on the CPU (same results, slower)", RuntimeWarning,
                              stacklevel=2)
    return _CPU_KERNELS["available"]


def cpu_kernels_status() -> dict:
    """{"available", "load_seconds", "error"} of the numba CPU kernels (for benchmarks and reports)."""
    cpu_kernels_available()
    return dict(_CPU_KERNELS)


def interpreter_enabled() -> bool:
    """Whether the kernels run through Triton's interpreter (on CPU tensors): ``TRITON_INTERPRET=1``, read when the
    kernels are first imported; it must be set before triton itself is first imported (torch._dynamo imports it),
    whose library functions are decorated then."""
    kernels = sys.modules.get(__name__ + ".triton_spline")
    if kernels is not None:
        return kernels.INTERPRETED
    if not TRITON_INSTALLED:
        return False
    return triton_interpret_requested()


def triton_interpret_requested() -> bool:
    """Triton's own reading of TRITON_INTERPRET (``triton.knobs`` from triton 3.4; the variable before)."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "on", "true", "yes")


def default_backend() -> str:
    """What ``backend="auto"`` means at construction: $ALLUKAN_SPLINE_BACKEND if set, else "auto"."""
    backend = os.environ.get(BACKEND_ENV, "auto")
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r} is not supported; allowed values: {BACKENDS}")
    return backend


def resolve_backend(backend: str, x) -> str:
    """"torch", "triton" or "cpu" for input ``x``: "auto" takes the Triton kernels for CUDA tensors when triton is
    installed, the numba kernels for CPU (and meta/fake) tensors when they load (``cpu_kernels_available``).

    Always "torch" while a model is exported (torch.onnx; torch.export from torch 2.14, see ``_exporting``):
    exported graphs, ONNX files among them, hold the plain ops, which every runtime has, instead of this package's
    custom ops.
    """
    if backend == "torch" or _exporting():
        return "torch"
    if backend == "auto":
        if x.is_cuda:
            return "triton" if TRITON_INSTALLED and x.numel() <= TRITON_MAX_ELEMENTS else "torch"
        on_cpu = x.device.type in ("cpu", "meta")
        return "cpu" if on_cpu and _CPU_KERNELS["available"] else "torch"
    if backend == "cpu":
        if x.device.type not in ("cpu", "meta"):
            raise RuntimeError(f"backend='cpu' runs on CPU tensors; got a {x.device.type} tensor. Use backend='auto'.")
        if not cpu_kernels_available():
            raise RuntimeError(f"backend='cpu' needs the numba CPU kernels, which cannot run here "
                               f"({_CPU_KERNELS['error']}); pip install numba, or use backend='auto' or 'torch'")
        return "cpu"
    if x.is_cuda:
        if not TRITON_INSTALLED:
            raise RuntimeError("backend='triton' needs the triton package (it ships with torch's Linux CUDA wheels)")
        return "triton"
    if not interpreter_enabled():
        raise RuntimeError(f"backend='triton' runs on CUDA tensors; got a {x.device.type} tensor. On the CPU it runs "
                           "only through Triton's interpreter (tests): set TRITON_INTERPRET=1 before triton is "
                           "first imported. Use backend='auto' or 'torch'.")
    return "triton"


def _is_exporting_reliable() -> bool:
    """Whether ``torch.compiler.is_exporting()`` tells export from compilation. From torch 2.7 to 2.13 dynamo answers
    True under plain torch.compile too (pytorch/pytorch#176347, fixed in 2.14): trusting it there kept compiled
    models off the kernels (seen on torch 2.11 with an H200)."""
    import torch
    from torch.torch_version import TorchVersion

    return hasattr(torch.compiler, "is_exporting") and TorchVersion(torch.__version__) >= (2, 14)


IS_EXPORTING_RELIABLE = _is_exporting_reliable()


def _exporting() -> bool:
    """torch.onnx's export, or (torch >= 2.14) any torch.export. Before 2.14 a torch.export of a CUDA model keeps
    the custom ops; export tools that need plain ops ask for them (``activation.spline_backend``, as
    export-onnx does)."""
    import torch

    if torch.onnx.is_in_onnx_export():
        return True
    return IS_EXPORTING_RELIABLE and bool(torch.compiler.is_exporting())
