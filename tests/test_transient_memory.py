"""Transient memory of a KA layer's forward+backward on the CPU (torch path and numba kernels), against
Conv + LeakyReLU.

The issue's measure: peak RSS growth during one forward+backward of a 1x1 layer, 64 channels, 1x64x512x512 fp32,
each in a fresh process. The torch path evaluates the spline in cache-sized pieces
(``activation.TORCH_PIECE_ELEMENTS``), so its temporaries no longer scale with the input; the control evaluates
the whole input at once (as before the pieces) and must exceed the bound, which shows the measure can fail.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import nnunetv2_allukan.activation as activation
from nnunetv2_allukan.layers import KAonv2d

MEASURE = r"""
import json, resource, sys
import torch
from torch import nn
import nnunetv2_allukan.activation as activation
from nnunetv2_allukan.layers import KAonv2d

torch.set_num_threads(1)
kind, pieces, backend = sys.argv[1], sys.argv[2], sys.argv[3]
if pieces != "default":
    activation.TORCH_PIECE_ELEMENTS = None if pieces == "None" else int(pieces)
x = torch.randn(1, 64, 512, 512, requires_grad=True)
if kind == "conv+leakyrelu":
    conv = nn.Conv2d(64, 64, 1)
    step = lambda: conv(nn.functional.leaky_relu(x, 0.01)).sum().backward()
else:
    spline_grad, share = kind.split("/")
    layer = KAonv2d(64, 64, 1, spline_grad=spline_grad, share=share, backend=backend)
    step = lambda: layer(x).sum().backward()

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def max_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

try:  # reset the peak (VmHWM) to the current RSS, so that the peak below belongs to the step alone
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peak_was_reset = True
except OSError:
    peak_was_reset = False
before = status("VmRSS") if peak_was_reset else max(status("VmRSS"), max_rss())
step()
peak = status("VmHWM") if peak_was_reset else max_rss()
print(json.dumps({"growth": (peak - before) / (x.numel() * 4)}))
"""


def _growth(kind: str, pieces: str = "default", backend: str = "torch") -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, kind, pieces, backend], env=env, capture_output=True,
                         text=True, check=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])["growth"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS from /proc (Linux)")
def test_ka_layer_transient_memory_within_1_5x_conv_leakyrelu():
    conv = _growth("conv+leakyrelu")
    ka = {kind: _growth(kind) for kind in ("free/layer", "exact/channel")}
    ka.update({f"{kind} (CPU kernels)": _growth(kind, backend="cpu") for kind in ("free/layer", "exact/channel")})
    control = _growth("free/layer", "None")
    print(f"peak RSS growth / input size: conv+leakyrelu {conv:.2f}, KA {ka}, KA unbounded control {control:.2f}")
    for kind, growth in ka.items():
        assert growth <= 1.5 * conv, (kind, growth, conv)
    assert control > 1.5 * conv, (control, conv)


def _layer_grads(layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
    return [y, x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("piece", [7, 100])  # pieces within one plane (of 5x6 = 30 values) / of several planes
@pytest.mark.parametrize("spline_grad", ["free", "exact"])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_pieces_give_the_values_and_gradients_of_one_pass(monkeypatch, share, spline_grad, piece, channels_last):
    layer = KAonv2d(3, 2, 3, padding=1, share=share, spline_grad=spline_grad, backend="torch").double()
    with torch.no_grad():
        layer.activation.coef.normal_()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64) * 3
    x.view(-1)[:2] = torch.tensor([float("nan"), 50.0])
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    monkeypatch.setattr(activation, "TORCH_PIECE_ELEMENTS", None)
    whole = _layer_grads(layer, x)
    monkeypatch.setattr(activation, "TORCH_PIECE_ELEMENTS", piece)
    for a, b in zip(whole, _layer_grads(layer, x)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, equal_nan=True)


def _dispatched_ops(layer, x) -> int:
    """aten ops dispatched by the layer's forward+backward on fake tensors (the profiler's FLOP counting)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = x.clone().requires_grad_()
        with Count():
            layer(x).sum().backward()
    return Count.n


def test_fake_tensors_are_evaluated_in_one_piece(monkeypatch):
    """On fake tensors (no memory to bound) the torch path takes the whole input as one piece: the op count of a
    forward+backward does not grow with the input (it did: a 512x512 batch-12 AllUKAN took minutes to count)."""
    monkeypatch.setattr(activation, "TORCH_PIECE_ELEMENTS", 64)
    layer = KAonv2d(3, 2, 3, padding=1, backend="torch")
    small, large = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 32, 32)  # 48 and 6144 values: 1 and 96 pieces
    assert _dispatched_ops(layer, large) == _dispatched_ops(layer, small)
