"""The Triton kernels of the shared spline against the torch path: values and every gradient, both share modes,
both gradient modes, both base functions, half/float/double inputs, memory layouts, NaN and out-of-grid inputs,
determinism, the fused KA layers, the custom ops under torch.compile.

Without a GPU the kernels run through Triton's interpreter (numpy on CPU tensors). Triton must be told before it is
first imported, so ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` when CUDA is unavailable (only Triton GPU
code reads it). With a GPU the same tests run on CUDA tensors with compiled kernels.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from nnunetv2_allukan import kernels as kernels_package
from nnunetv2_allukan.activation import LEAKY_SLOPE, SharedSplineActivation
from nnunetv2_allukan.layers import KALinear, KAonv2d, KAonv3d, KAonvTranspose2d

pytest.importorskip("triton")
from nnunetv2_allukan.kernels import ops, triton_spline  # noqa: E402
from kernel_checks import compiled_op_targets, difficult_input, layer_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_spline.INTERPRETED:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it unless it is set otherwise)",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # numpy (the interpreter) warns about exp overflow for large |x|; the results are the IEEE ones torch gives.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield


def _activation(share, spline_grad, spline_init="silu-noise", channels=5, backend="torch", dtype=torch.float64):
    act = SharedSplineActivation(channels, grid_size=5, share=share, spline_grad=spline_grad, spline_init=spline_init,
                                 backend=backend).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():  # a spline far from its initialisation, so that every gradient term matters
        act.coef.normal_()
        act.base_weight.uniform_(0.5, 1.5)
    return act


def _difficult_input(shape, dtype):
    return difficult_input(shape, dtype, DEVICE)


def _run(act, x, grad_seed=1):
    """(phi, dL/dx, dL/dcoef, dL/dbase_weight) for a fixed random upstream gradient."""
    act.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    phi = act(x)
    g = torch.randn(phi.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    phi.backward(g.to(device=phi.device, dtype=phi.dtype))
    return phi, x.grad, act.coef.grad, act.base_weight.grad


def _compare_backends(act, x, **tolerance):
    act.backend = "torch"
    reference = _run(act, x)
    act.backend = "triton"
    result = _run(act, x)
    for name, ref, got in zip(("phi", "grad_x", "grad_coef", "grad_base_weight"), reference, result):
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, equal_nan=True, msg=lambda m: f"{name}: {m}", **tolerance)
    return reference, result


@pytest.mark.parametrize("spline_init", ["silu-noise", "leakyrelu"])
@pytest.mark.parametrize("spline_grad", ["free", "exact"])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_float64_values_and_gradients_match_torch_path(share, spline_grad, spline_init):
    act = _activation(share, spline_grad, spline_init)
    x = _difficult_input((3, 5, 7, 9), torch.float64)
    reference, _ = _compare_backends(act, x, rtol=1e-12, atol=1e-12)
    # The input holds NaN: phi and dL/dx are NaN there and only there, and NaN reaches neither the coefficients
    # (its table row is dropped) nor, for a finite upstream gradient, any other value's gradient.
    assert torch.isnan(reference[0]).sum() == 1 and torch.isfinite(reference[2]).all()


@pytest.mark.parametrize("spline_grad", ["free", "exact"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_innermost"])
def test_group_sharing_matches_torch_path(layout, spline_grad):
    """share='group': 3 splines over 6 channels (pairs of neighbours), the (A, groups, rest) view in both paths."""
    act = SharedSplineActivation(6, grid_size=5, share="group", num_groups=3, spline_grad=spline_grad,
                                 channel_dim=-1 if layout == "channels_innermost" else 1).to(DEVICE, torch.float64)
    with torch.no_grad():
        act.coef.normal_()
        act.base_weight.uniform_(0.5, 1.5)
    x = _difficult_input((3, 4, 6) if layout == "channels_innermost" else (2, 6, 5, 7), torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    reference, _ = _compare_backends(act, x, rtol=1e-12, atol=1e-12)
    assert reference[2].shape[0] == 3 and torch.isfinite(reference[2]).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_slice", "channels_last_3d",
                                    "channels_innermost"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_half_and_float_inputs_in_every_layout(share, dtype, layout):
    if layout == "channels_last_3d":
        x = _difficult_input((2, 5, 3, 4, 5), dtype).to(memory_format=torch.channels_last_3d)
    elif layout == "strided_slice":
        x = _difficult_input((2, 5, 5, 14), dtype)[..., ::2]
    elif layout == "channels_innermost":  # KALinear: channels in the last dimension
        x = _difficult_input((3, 7, 5), dtype)
    else:
        x = _difficult_input((2, 5, 5, 7), dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    act = _activation(share, "exact", dtype=torch.float32)
    if layout == "channels_innermost":
        act.channel_dim = -1
    # fp32 math on both paths: outputs agree to rounding of the output dtype (Triton's interpreter truncates to
    # bf16 where torch and GPUs round to nearest: one bf16 ulp), parameter gradients to fp32 summation order.
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    reference, result = _compare_backends(act, x, rtol=rtol, atol=rtol)
    assert result[0].stride() == reference[0].stride() == x.stride() or layout == "strided_slice"
    assert result[1].stride() == x.stride() or layout == "strided_slice"


@pytest.mark.parametrize("spline_grad", ["free", "exact"])
def test_channels_fastest_backward_with_several_channel_blocks(spline_grad):
    """Per-channel splines on a channels-fastest view (channels_last, B == 1) with more channels than one block
    holds (37: two blocks of 32, the second partly masked) and a position count that is no multiple of the tile:
    the flat (positions x channels) tiles of _grad_kernel_channels against the torch path."""
    act = _activation("channel", spline_grad, channels=37)
    x = _difficult_input((3, 37, 5, 7), torch.float64).to(memory_format=torch.channels_last)
    _compare_backends(act, x, rtol=1e-12, atol=1e-12)


def test_many_programs_and_deterministic_gradients():
    """Enough values for many programs of the backward kernel (several partial slots per channel): the reduction
    of the partial sums matches the torch path and is bitwise reproducible."""
    act = _activation("layer", "exact", dtype=torch.float32)
    x = _difficult_input((2, 5, 17, 31), torch.float32)
    assert x.numel() > 10 * 512  # > 10 programs of 512 values
    _compare_backends(act, x, rtol=1e-5, atol=1e-4)
    first, second = _run(act, x), _run(act, x)
    for a, b in zip(first, second):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_per_channel_partials_with_channels_innermost_and_many_channels():
    act = _activation("channel", "free", channels=40, dtype=torch.float32)  # two channel blocks of 32
    act.channel_dim = -1
    x = _difficult_input((3, 50, 40), torch.float32)
    _compare_backends(act, x, rtol=1e-5, atol=1e-5)


def test_gradients_not_asked_for_are_not_computed():
    act = _activation("channel", "exact", dtype=torch.float32)
    x = _difficult_input((2, 5, 3, 3), torch.float32)
    _, table, base_weight, config = act.function_inputs(x)
    args = (table.detach(), base_weight.detach(), config.lo, config.inv_h, config.channel_dim, config.base,
            LEAKY_SLOPE)
    grad_x, grad_table, grad_wb = ops.spline_phi_backward(x, torch.ones_like(x), *args, True, False, True)
    assert grad_x.numel() == 0 and grad_table.shape == (table.shape[0], table.shape[1] - 5) and grad_wb.shape == (5,)
    grad_x, grad_table, grad_wb = ops.spline_phi_backward(x, torch.ones_like(x), *args, True, True, False)
    assert grad_x.shape == x.shape and grad_table.numel() == 0 and grad_wb.numel() == 0


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0)])
def test_empty_inputs(shape):
    act = _activation("layer", "exact", dtype=torch.float32)
    x = torch.zeros(shape, device=DEVICE, requires_grad=True)
    act.backend = "triton"
    act(x).sum().backward()
    assert x.grad.shape == shape and torch.equal(act.coef.grad, torch.zeros_like(act.coef))


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and dispatch of both custom ops, as torch.library checks them."""
    act = _activation("channel", "exact", dtype=torch.float32)
    x = torch.randn(2, 5, 3, 4, device=DEVICE) * 4  # opcheck compares without equal_nan
    _, table, base_weight, c = act.function_inputs(x)
    table, base_weight = table.detach(), base_weight.detach()
    common = (c.lo, c.inv_h, c.channel_dim, c.base, LEAKY_SLOPE)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.spline_phi, (x, table, base_weight, *common, torch.float16), test_utils=tests)
    torch.library.opcheck(ops.spline_phi_backward, (x, torch.randn_like(x), table, base_weight, *common, True,
                                                    True, True), test_utils=tests)


def _ka_layers():
    return {
        "KAonv2d": (lambda **kw: KAonv2d(3, 4, 3, padding=1, **kw), (2, 3, 7, 6)),
        "KAonv3d": (lambda **kw: KAonv3d(3, 2, 3, stride=2, padding=1, **kw), (1, 3, 5, 4, 6)),
        "KAonvTranspose2d": (lambda **kw: KAonvTranspose2d(3, 2, 2, stride=2, **kw), (2, 3, 4, 5)),
        "KALinear": (lambda **kw: KALinear(5, 3, **kw), (2, 4, 5)),
    }


@pytest.mark.parametrize("layer_name", list(_ka_layers()))
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_fused_ka_layers_triton_matches_torch(layer_name, share):
    make, shape = _ka_layers()[layer_name]
    torch.manual_seed(0)
    layer = make(share=share, spline_grad="exact", backend="torch").to(DEVICE)
    x = torch.randn(shape, device=DEVICE) * 2
    reference = layer_grads(layer, x)
    layer.activation.backend = "triton"
    for a, b in zip(reference, layer_grads(layer, x)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_fused_layer_under_fp16_autocast():
    """nnU-Net's mixed precision: phi is written in fp16 for the conv, the spline math stays fp32. (fp16, because
    Triton's interpreter truncates fp32 -> bf16 where GPUs round to nearest: a bias that the conv's weight gradient
    sums up.)"""
    layer = KAonv2d(3, 4, 3, padding=1, share="channel", backend="torch").to(DEVICE)
    x = torch.randn(2, 3, 6, 6, device=DEVICE) * 2
    with torch.autocast(DEVICE, dtype=torch.float16):
        reference = layer_grads(layer, x)
        layer.activation.backend = "triton"
        result = layer_grads(layer, x)
    assert result[0].dtype == torch.float16
    for a, b in zip(reference, result):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_compiled_layer_sees_one_custom_op_per_direction():
    """torch.compile (aot_eager) traces the fused layer with the kernels as two opaque custom ops and no graph
    break (fullgraph=True), and gives the eager gradients."""
    layer = KAonv2d(3, 4, 3, padding=1, share="channel", spline_grad="exact", backend="triton").to(DEVICE)
    targets, listing = compiled_op_targets(layer, torch.randn(2, 3, 6, 5, device=DEVICE) * 2)
    phi_op, backward_op = torch.ops.allukan.spline_phi.default, torch.ops.allukan.spline_phi_backward.default
    assert targets[0].count(phi_op) == 1, listing[0]
    assert targets[1].count(phi_op) == 1, listing[1]  # phi recomputed for the weight gradient
    assert targets[1].count(backward_op) == 1, listing[1]


def test_backend_option(monkeypatch):
    x = torch.randn(2, 3)
    cpu_default = "cpu" if kernels_package.cpu_kernels_available() else "torch"
    assert SharedSplineActivation(backend="auto").function_inputs(x)[-1].backend == cpu_default  # CPU tensor
    assert SharedSplineActivation(backend="torch").function_inputs(x.to(DEVICE))[-1].backend == "torch"
    assert SharedSplineActivation(backend="triton").function_inputs(x.to(DEVICE))[-1].backend == "triton"
    with pytest.raises(ValueError, match="backend"):
        SharedSplineActivation(backend="cuda")
    with pytest.raises(ValueError, match="impl='function'"):
        SharedSplineActivation(backend="triton", impl="plain")
    assert KAonv2d(3, 4, 1, backend="torch").activation.backend == "torch"
    # The environment chooses for "auto" (networks built by nnU-Net trainers), explicit choices stay.
    monkeypatch.setenv("ALLUKAN_SPLINE_BACKEND", "torch")
    assert SharedSplineActivation().backend == "torch"
    assert SharedSplineActivation(backend="triton").backend == "triton"
    monkeypatch.setenv("ALLUKAN_SPLINE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ALLUKAN_SPLINE_BACKEND"):
        SharedSplineActivation()


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch; from nnunetv2_allukan.activation import SharedSplineActivation\n"
            "try:\n    SharedSplineActivation(backend='triton')(torch.randn(3))\n"
            "except RuntimeError as e:\n    print(e)\nelse:\n    raise SystemExit('no error')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "TRITON_INTERPRET=1" in out and "cpu tensor" in out


def test_kernels_under_compile_where_is_exporting_is_unreliable(monkeypatch):
    """torch 2.7-2.13 answer torch.compiler.is_exporting() True under plain torch.compile (pytorch#176347): there
    the flag must not send compiled models to the torch path; from 2.14, where it means export, it does."""
    import nnunetv2_allukan.kernels as kernels

    x = torch.randn(2, 3, device=DEVICE)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # as dynamo answers before 2.14
    monkeypatch.setattr(kernels, "IS_EXPORTING_RELIABLE", False)
    assert kernels.resolve_backend("triton", x) == "triton"
    monkeypatch.setattr(kernels, "IS_EXPORTING_RELIABLE", True)
    assert kernels.resolve_backend("triton", x) == "torch"
    assert kernels.IS_EXPORTING_RELIABLE is (torch.torch_version.TorchVersion(torch.__version__) >= (2, 14))


def test_spline_backend_switches_every_activation_and_restores_it():
    from nnunetv2_allukan.activation import spline_backend

    net = torch.nn.Sequential(KAonv2d(3, 4, 3, backend="triton"), KALinear(4, 2, backend="auto"))
    with spline_backend(net, "torch"):
        assert [m.activation.backend for m in net] == ["torch", "torch"]
        assert net[0].activation.function_inputs(torch.randn(1, 3, 4, 4, device=DEVICE))[-1].backend == "torch"
    assert [m.activation.backend for m in net] == ["triton", "auto"]
    with pytest.raises(ValueError, match="backend"):
        with spline_backend(net, "cuda"):
            pass


def test_backward_programs_loop_over_several_tiles(monkeypatch):
    """With few programs each loops over many tiles, so the per-thread accumulators carry across trips (on the
    default sizes the test inputs give each program one tile: only a GPU-sized input would exercise the loop)."""
    monkeypatch.setattr(triton_spline, "BACKWARD_TILE", 64)
    # Programs per channel (block) = TARGET_PROGRAMS // channel blocks: with 1 (share layer) or 5 channels (one
    # program each) and with 2 channel blocks, 10 and 4 give at least two programs per channel, each over several
    # tiles, so that a program's position in the split (not only its trip) must be right.
    cases = (("layer", 1, (3, 5, 17, 13), None, 2), ("layer", 1, (3, 5, 17, 13), None, 4),
             ("channel", 5, (3, 5, 17, 13), None, 10), ("channel", 40, (3, 50, 40), -1, 2),
             ("channel", 40, (3, 50, 40), -1, 6))
    for share, channels, shape, channel_dim, programs in cases:
        monkeypatch.setattr(triton_spline, "TARGET_PROGRAMS", programs)
        act = _activation(share, "exact", channels=channels, dtype=torch.float64)
        if channel_dim is not None:
            act.channel_dim = channel_dim  # channels fastest: (positions, channel block) tiles
        _compare_backends(act, _difficult_input(shape, torch.float64), rtol=1e-12, atol=1e-12)


def test_auto_sends_inputs_too_large_for_the_kernels_to_the_torch_path():
    """Over 2**30 values (int32 offsets) "auto" takes the torch path on CUDA instead of raising in the kernels."""
    from types import SimpleNamespace

    import nnunetv2_allukan.kernels as kernels

    def cuda_tensor(numel):
        return SimpleNamespace(is_cuda=True, device=SimpleNamespace(type="cuda"), numel=lambda: numel)

    if kernels.TRITON_INSTALLED:
        assert kernels.resolve_backend("auto", cuda_tensor(kernels.TRITON_MAX_ELEMENTS)) == "triton"
    assert kernels.resolve_backend("auto", cuda_tensor(kernels.TRITON_MAX_ELEMENTS + 1)) == "torch"
