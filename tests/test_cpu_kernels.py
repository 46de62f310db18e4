"""The numba CPU kernels of the shared spline against the torch path (the reference): values and every gradient,
both share modes and groups, both gradient modes, both base functions, float/double inputs, memory layouts, NaN and
out-of-grid inputs, odd and empty shapes; bitwise-equal gradients at any thread count; the fused KA layers (whose
backward recomputes phi in the gradients' pass); the custom ops under torch.compile; the fallback to the torch path;
threads and forked processes."""
import os
import subprocess
import sys
import threading

import pytest
import torch

from nnunetv2_allukan import kernels
from nnunetv2_allukan.activation import LEAKY_SLOPE, SharedSplineActivation
from nnunetv2_allukan.layers import KALinear, KAonv1d, KAonv2d, KAonv3d, KAonvTranspose2d, KAonvTranspose3d

pytest.importorskip("numba")
if not kernels.cpu_kernels_available():
    pytest.fail(f"the numba CPU kernels do not load here: {kernels.cpu_kernels_status()['error']}")
from nnunetv2_allukan.kernels import cpu_ops  # noqa: E402
from kernel_checks import compiled_op_targets, difficult_input, layer_grads  # noqa: E402


def _activation(share, spline_grad, spline_init="silu-noise", channels=6, dtype=torch.float64, grid_size=5,
                num_groups=3):
    act = SharedSplineActivation(channels, grid_size=grid_size, share=share, spline_grad=spline_grad,
                                 spline_init=spline_init, backend="torch", num_groups=num_groups).to(dtype=dtype)
    with torch.no_grad():  # a spline far from its initialisation, so that every gradient term matters
        act.coef.normal_()
        act.base_weight.uniform_(0.5, 1.5)
    return act


def _run(act, x, backend, grad_seed=1):
    """(phi, dL/dx, dL/dcoef, dL/dbase_weight) for a fixed random upstream gradient."""
    act.backend = backend
    act.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    phi = act(x)
    g = torch.randn(phi.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    phi.backward(g.to(dtype=phi.dtype))
    return phi, x.grad, act.coef.grad, act.base_weight.grad


def _compare(act, x, **tolerance):
    reference = _run(act, x, "torch")
    result = _run(act, x, "cpu")
    assert act.function_inputs(x)[-1].backend == "cpu"
    for name, ref, got in zip(("phi", "grad_x", "grad_coef", "grad_base_weight"), reference, result):
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert got.stride() == ref.stride(), name
        torch.testing.assert_close(got, ref, equal_nan=True, msg=lambda m: f"{name}: {m}", **tolerance)
    return reference, result


@pytest.mark.parametrize("spline_init", ["silu-noise", "leakyrelu"])
@pytest.mark.parametrize("spline_grad", ["free", "exact"])
@pytest.mark.parametrize("share", ["layer", "channel", "group"])
def test_float64_matches_torch_path(share, spline_grad, spline_init):
    act = _activation(share, spline_grad, spline_init)
    x = difficult_input((3, 6, 37, 29), torch.float64)
    _compare(act, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spline_grad", ["free", "exact"])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_float32_matches_torch_path(share, spline_grad):
    act = _activation(share, spline_grad, dtype=torch.float32)
    x = difficult_input((2, 6, 41, 23), torch.float32)
    # Coefficient gradients are sums over ~10^4 values, in another order than the torch path's.
    _compare(act, x, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("grid_size", [1, 3, 8, 13])
def test_grid_sizes(grid_size):
    act = _activation("channel", "exact", grid_size=grid_size)
    _compare(act, difficult_input((2, 6, 9, 7), torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "transposed", "strided_slice",
                                    "expanded_grad"])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_memory_layouts(share, layout):
    """Outputs keep the input's strides (channels_last stays channels_last); non-dense inputs are copied."""
    act = _activation(share, "exact")
    if layout == "channels_last":
        x = difficult_input((2, 6, 5, 7), torch.float64).contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = difficult_input((2, 6, 3, 5, 4), torch.float64).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        x = difficult_input((6, 2, 11), torch.float64).transpose(0, 1)
    else:
        x = difficult_input((2, 6, 10, 8), torch.float64)[:, :, ::2]
    if layout == "expanded_grad":
        act.backend = "cpu"
        x = x.detach().requires_grad_()
        act(x).sum().backward()  # dL/dphi is an expanded tensor of ones
        reference = x.grad
        act.backend = "torch"
        x.grad = None
        act(x).sum().backward()
        torch.testing.assert_close(reference, x.grad, rtol=1e-12, atol=1e-12, equal_nan=True)
        return
    _compare(act, x, rtol=1e-12, atol=1e-12)


def test_channels_last_dimension_of_linear_inputs():
    """KALinear's activation: channels in the last dimension (the (A, C, 1) view: channels fastest in memory)."""
    act = _activation("channel", "exact", channels=40)
    act.channel_dim = -1
    _compare(act, difficult_input((3, 50, 40), torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(0, 6, 3), (6, 0), (0,), (1,), (6,), (1, 6, 1), (7, 6, 1, 1)])
def test_odd_and_empty_shapes(shape):
    act = _activation("channel" if len(shape) >= 2 and shape[1] == 6 else "layer", "exact")
    x = difficult_input(shape, torch.float64) if 0 not in shape else torch.zeros(shape, dtype=torch.float64)
    _compare(act, x, rtol=1e-12, atol=1e-12)


def test_large_input_spans_many_units():
    """More values than one unit of work (cpu_ops.UNIT_VALUES), in planes larger and smaller than a unit."""
    act = _activation("channel", "free", dtype=torch.float32)
    _compare(act, difficult_input((3, 6, 190, 130), torch.float32), rtol=1e-4, atol=1e-2)
    act = _activation("layer", "free", dtype=torch.float32)
    _compare(act, difficult_input((2, 6, 260, 300), torch.float32), rtol=1e-4, atol=1e-1)


@pytest.mark.parametrize("share", ["layer", "channel"])
def test_gradients_are_bitwise_equal_at_any_thread_count(share):
    act = _activation(share, "exact", dtype=torch.float32)
    x = difficult_input((4, 6, 130, 97), torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run(act, x, "cpu"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert len(cpu_ops.split_units(cpu_ops.units_for((1, 1, x.numel()))[0], x.numel(), 3)) == 3


def test_gradients_not_asked_for_are_not_computed():
    act = _activation("channel", "exact", dtype=torch.float32)
    x = difficult_input((2, 6, 3, 3), torch.float32)
    _, table, base_weight, config = act.function_inputs(x)
    args = (table.detach(), base_weight.detach(), config.lo, config.inv_h, config.channel_dim, config.base,
            LEAKY_SLOPE)
    grad_x, grad_table, grad_wb, phi = cpu_ops.spline_phi_backward_cpu(x, torch.ones_like(x), *args, True, False,
                                                                       True)
    assert grad_x.numel() == 0 and grad_table.shape == (table.shape[0], table.shape[1] - 5)
    assert grad_wb.shape == (6,) and phi.numel() == 0
    grad_x, grad_table, grad_wb, phi = cpu_ops.spline_phi_backward_cpu(x, torch.ones_like(x), *args, True, True,
                                                                       False, torch.float16)
    assert grad_x.shape == x.shape and grad_table.numel() == 0 and grad_wb.numel() == 0
    assert phi.dtype == torch.float16
    torch.testing.assert_close(phi, act(x).to(torch.float16).detach(), equal_nan=True)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and dispatch of both custom ops, as torch.library checks them."""
    act = _activation("channel", "exact", dtype=torch.float32)
    x = torch.randn(2, 6, 3, 4) * 4  # opcheck compares without equal_nan
    _, table, base_weight, c = act.function_inputs(x)
    table, base_weight = table.detach(), base_weight.detach()
    common = (c.lo, c.inv_h, c.channel_dim, c.base, LEAKY_SLOPE)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(cpu_ops.spline_phi_cpu, (x, table, base_weight, *common, torch.bfloat16), test_utils=tests)
    torch.library.opcheck(cpu_ops.spline_phi_backward_cpu, (x, torch.randn_like(x), table, base_weight, *common,
                                                            True, True, True, torch.float32), test_utils=tests)


def _ka_layers():
    return {
        "KAonv1d": (lambda **kw: KAonv1d(3, 4, 3, padding=1, **kw), (2, 3, 9)),
        "KAonv2d": (lambda **kw: KAonv2d(3, 4, 3, padding=1, **kw), (2, 3, 7, 6)),
        "KAonv3d": (lambda **kw: KAonv3d(3, 2, 3, stride=2, padding=1, **kw), (1, 3, 5, 4, 6)),
        "KAonvTranspose2d": (lambda **kw: KAonvTranspose2d(3, 2, 2, stride=2, **kw), (2, 3, 4, 5)),
        "KAonvTranspose3d": (lambda **kw: KAonvTranspose3d(3, 2, 2, stride=2, **kw), (1, 3, 3, 4, 2)),
        "KALinear": (lambda **kw: KALinear(5, 3, **kw), (2, 4, 5)),
        "KAonv2d unbatched": (lambda **kw: KAonv2d(3, 4, 3, padding=1, **kw), (3, 7, 6)),
    }


@pytest.mark.parametrize("layer_name", list(_ka_layers()))
@pytest.mark.parametrize("share", ["layer", "channel"])
@pytest.mark.parametrize("spline_grad", ["free", "exact"])
def test_fused_ka_layers_match_torch_path(layer_name, share, spline_grad):
    """The layers' backward asks the conv for its input gradient first, then one kernel pass gives phi (for the
    weight gradient) and the spline's gradients: every output and gradient as on the torch path, in float64."""
    make, shape = _ka_layers()[layer_name]
    torch.manual_seed(0)
    layer = make(share=share, spline_grad=spline_grad, backend="torch").double()
    x = torch.randn(shape, dtype=torch.float64) * 2
    reference = layer_grads(layer, x)
    layer.activation.backend = "cpu"
    for a, b in zip(reference, layer_grads(layer, x)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_frozen_input_and_fixed_activation():
    """Without dL/dx, or with a fixed activation (no spline parameters), the layer still gets its weight gradient."""
    for kwargs in ({}, {"activation": "fixed-leakyrelu"}):
        layer = KAonv2d(3, 4, 3, padding=1, backend="torch", **kwargs).double()
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        layer(x).sum().backward()
        reference = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        layer.activation.backend = "cpu"
        layer(x).sum().backward()
        for a, p in zip(reference, layer.parameters()):
            torch.testing.assert_close(p.grad, a, rtol=1e-12, atol=1e-12)


def test_fused_layer_under_cpu_autocast():
    """CPU autocast (bfloat16): phi is written in bf16 for the conv, the spline math stays fp32."""
    layer = KAonv2d(3, 4, 3, padding=1, share="channel", backend="torch")
    x = torch.randn(2, 3, 6, 6) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = layer_grads(layer, x)
        layer.activation.backend = "cpu"
        result = layer_grads(layer, x)
    assert result[0].dtype == torch.bfloat16
    for a, b in zip(reference, result):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


def test_half_precision_input():
    act = _activation("channel", "exact", dtype=torch.float32)
    x = difficult_input((2, 6, 5, 5), torch.float16)
    _compare(act, x, rtol=1e-3, atol=1e-3)


def test_compiled_layer_sees_one_custom_op_per_direction():
    """torch.compile (aot_eager) traces the fused layer with the CPU kernels as opaque custom ops and no graph
    break (fullgraph=True), and gives the eager gradients."""
    layer = KAonv2d(3, 4, 3, padding=1, share="channel", spline_grad="exact", backend="cpu")
    targets, listing = compiled_op_targets(layer, torch.randn(2, 3, 6, 5) * 2)
    phi_op = torch.ops.allukan.spline_phi_cpu.default
    backward_op = torch.ops.allukan.spline_phi_backward_cpu.default
    assert targets[0].count(phi_op) == 1, listing[0]
    assert targets[1].count(phi_op) == 0, listing[1]  # phi comes from the backward op's own pass
    assert targets[1].count(backward_op) == 1, listing[1]


def test_backend_choice():
    x = torch.randn(2, 3)
    assert SharedSplineActivation(backend="auto").function_inputs(x)[-1].backend == "cpu"
    assert SharedSplineActivation(backend="cpu").function_inputs(x)[-1].backend == "cpu"
    assert SharedSplineActivation(backend="torch").function_inputs(x)[-1].backend == "torch"
    with pytest.raises(ValueError, match="impl='function'"):
        SharedSplineActivation(backend="cpu", impl="plain")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CPU tensors"):
            SharedSplineActivation(backend="cpu").function_inputs(x.cuda())


_FALLBACK = """
import sys, warnings
import torch
from nnunetv2_allukan import kernels
sys.modules['numba'] = None  # as if numba were broken: importing it fails
kernels.NUMBA_INSTALLED = {installed}
from nnunetv2_allukan.layers import KAonv2d
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    layer = KAonv2d(2, 2, 3, padding=1)
    KAonv2d(2, 2, 3, padding=1)
x = torch.randn(1, 2, 5, 5, requires_grad=True)
layer(x).sum().backward()
print(layer.activation.function_inputs(x)[-1].backend, len([w for w in caught if 'numba' in str(w.message)]))
try:
    KAonv2d(2, 2, 3, backend='cpu')(x)
except RuntimeError as e:
    print('error:', e)
"""


@pytest.mark.parametrize("installed", [True, False])
def test_fallback_to_torch_path_when_numba_cannot_load(installed):
    """numba present but failing to import (installed=True: one warning), or absent (installed=False: silent):
    "auto" runs the torch path; an explicit backend="cpu" says why it cannot."""
    out = subprocess.run([sys.executable, "-c", _FALLBACK.format(installed=installed)], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == f"torch {1 if installed else 0}"
    assert out[1].startswith("error:") and "numba" in out[1]


def test_two_threads_run_ka_layers_at_once():
    """Two Python threads in the kernels at the same time (numba's workqueue layer would abort the process; these
    kernels are serial and share one pool): both get the single-threaded result."""
    layer = KAonv2d(4, 4, 3, padding=1, backend="cpu")
    x = torch.randn(2, 4, 150, 120)
    expected = layer_grads(layer, x)
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                local = KAonv2d(4, 4, 3, padding=1, backend="cpu")
                local.load_state_dict(layer.state_dict())
                results[i] = layer_grads(local, x)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        for a, b in zip(expected, results[i]):
            assert torch.equal(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_forked_child_runs_the_kernels():
    """A process forked after the kernels' pool started (nnU-Net's augmentation workers are forked) makes a pool of
    its own and gets the parent's result. (Only the kernels run in the child: torch's own OpenMP pool is not
    fork-safe once used, which is nnU-Net's concern, not this package's.)"""
    import numpy as np

    act = _activation("channel", "free", dtype=torch.float32)
    x = difficult_input((2, 6, 150, 120), torch.float32)
    _, table, base_weight, c = act.function_inputs(x)
    args = (x, table.detach(), base_weight.detach(), c.lo, c.inv_h, c.channel_dim, c.base, LEAKY_SLOPE,
            torch.float32)
    assert len(cpu_ops.split_units(cpu_ops.units_for((2, 6, 150 * 120))[0], x.numel(), 2)) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = cpu_ops.spline_phi_cpu(*args).numpy()  # starts the pool in this process
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                same = np.array_equal(cpu_ops.spline_phi_cpu(*args).numpy(), expected, equal_nan=True)
                os.write(write, b"1" if same else b"0")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(threads)
    assert os.read(read, 1) == b"1"


def test_availability_decided_inside_a_fake_tensor_mode():
    """The first KA layer of a process may be built inside a FakeTensorMode (the profiler counts FLOPs on fake
    tensors): the kernels' smoke test must not see fake tensors there and fall back."""
    code = ("from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "from nnunetv2_allukan import kernels\n"
            "from nnunetv2_allukan.layers import KAonv2d\n"
            "with FakeTensorMode():\n    KAonv2d(2, 2, 3)\n"
            "print(kernels.cpu_kernels_status()['available'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True"
