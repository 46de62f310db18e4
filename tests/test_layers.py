"""KA layers against torch layers applied to phi(x), and against the unfold KAN convolution."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_allukan import (KALinear, KAModule, KAonv1d, KAonv2d, KAonv3d, KAonvTranspose2d, KAonvTranspose3d,
                              SharedSplineActivation)


def phi(layer, x):
    """The layer's own activation through the plain-ops path (independent of the custom Functions).

    It shares the layer's coefficient and base-weight Parameters, so gradients through it reach them.
    """
    act = layer.activation
    plain = SharedSplineActivation(num_channels=act.num_channels, grid_size=act.grid_size,
                                   grid_range=act.grid_range, share=act.share, spline_grad=act.spline_grad,
                                   channel_dim=act.channel_dim, impl="plain", num_groups=act.num_groups or 1)
    plain.coef, plain.base_weight = act.coef, act.base_weight
    return plain(x)


CONV_CASES = [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=1, padding=2, dilation=2, groups=2),
    dict(stride=(1, 2), padding=(1, 0), dilation=1, groups=4),  # depthwise-ish, anisotropic
    dict(stride=1, padding=1, dilation=1, groups=8),  # depthwise
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_kaonv2d_equals_conv_of_phi(case, share):
    layer = KAonv2d(8, 8, 3, share=share, **case)
    x = torch.randn(2, 8, 11, 9) * 2
    expected = F.conv2d(phi(layer, x), layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if not isinstance(c["stride"], tuple)])
def test_kaonv3d_equals_conv_of_phi(case):
    layer = KAonv3d(8, 8, 3, share="channel", **case)
    x = torch.randn(1, 8, 7, 6, 9) * 2
    expected = F.conv3d(phi(layer, x), layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
    torch.testing.assert_close(layer(x), expected)


def test_kaonv1d_equals_conv_of_phi():
    layer = KAonv1d(4, 6, 5, padding=2)
    x = torch.randn(3, 4, 20)
    torch.testing.assert_close(layer(x), F.conv1d(phi(layer, x), layer.weight, layer.bias, padding=2))


@pytest.mark.parametrize("stride,padding,output_padding,groups", [(2, 0, 0, 1), (2, 1, 1, 1), (3, 0, 1, 4)])
def test_kaonv_transpose_equals_transpose_conv_of_phi(stride, padding, output_padding, groups):
    layer2 = KAonvTranspose2d(8, 4, 3, stride=stride, padding=padding, output_padding=output_padding,
                              groups=groups, share="channel")
    x2 = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(layer2(x2), F.conv_transpose2d(phi(layer2, x2), layer2.weight, layer2.bias, stride,
                                                              padding, output_padding, groups))
    layer3 = KAonvTranspose3d(8, 4, 2, stride=stride, padding=0, output_padding=output_padding, groups=groups)
    x3 = torch.randn(1, 8, 3, 4, 5)
    torch.testing.assert_close(layer3(x3), F.conv_transpose3d(phi(layer3, x3), layer3.weight, layer3.bias, stride,
                                                              0, output_padding, groups))


def test_transpose_output_size():
    layer = KAonvTranspose2d(4, 4, 2, stride=2)
    assert layer(torch.randn(1, 4, 5, 5), output_size=(10, 10)).shape[-2:] == (10, 10)


def test_kaonv2d_equals_unfold_kan_convolution():
    """The unfold/im2col KAN convolution with one shared activation; padded taps contribute 0 after phi."""
    layer = KAonv2d(3, 5, 3, stride=2, padding=1, share="layer")
    act = layer.activation
    x = torch.randn(2, 3, 9, 8) * 2
    patches = F.unfold(x, 3, padding=1, stride=2)  # (N, C*9, L)
    inside = F.unfold(torch.ones_like(x), 3, padding=1, stride=2)
    lo, hi = act.grid_range
    h = (hi - lo) / act.grid_size
    # B_j(x) from its definition on the knot vector, one basis at a time.
    knots = [lo + (m - 3) * h for m in range(act.grid_size + 7)]

    def basis_j(v, j):
        t = [knots[j + m] for m in range(5)]
        out = torch.zeros_like(v)
        for m in range(4):
            seg = (v >= t[m]) & (v < t[m + 1])
            s = (v - t[m]) / h
            piece = [s ** 3 / 6, (-3 * s ** 3 + 3 * s ** 2 + 3 * s + 1) / 6, (3 * s ** 3 - 6 * s ** 2 + 4) / 6,
                     (1 - s) ** 3 / 6][m]
            out = torch.where(seg, piece, out)
        return out

    phi_p = act.base_weight[0] * F.silu(patches)
    for j in range(act.grid_size + 3):
        phi_p = phi_p + act.coef[0, j] * basis_j(patches, j)
    phi_p = phi_p * inside
    out = layer.weight.reshape(5, -1) @ phi_p + layer.bias[:, None]
    expected = out.reshape(2, 5, 5, 4)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_kalinear_equals_linear_of_phi():
    for share in ("layer", "channel"):
        layer = KALinear(6, 4, share=share)
        x = torch.randn(3, 7, 6)
        torch.testing.assert_close(layer(x), F.linear(phi(layer, x), layer.weight, layer.bias))


@pytest.mark.parametrize("make,torch_layer", [
    (lambda **k: KALinear(16, 8, **k), nn.Linear(16, 8)),
    (lambda **k: KAonv2d(16, 8, 3, **k), nn.Conv2d(16, 8, 3)),
    (lambda **k: KAonv3d(16, 8, 3, bias=False, **k), nn.Conv3d(16, 8, 3, bias=False)),
    (lambda **k: KAonvTranspose3d(16, 8, 2, stride=2, **k), nn.ConvTranspose3d(16, 8, 2, stride=2)),
])
def test_parameter_counts(make, torch_layer):
    base = sum(p.numel() for p in torch_layer.parameters())
    nb = 5 + 3
    assert sum(p.numel() for p in make(grid_size=5).parameters()) == base + nb + 1
    assert sum(p.numel() for p in make(grid_size=5, share="channel").parameters()) == base + 16 * (nb + 1)
    layer = make()
    assert isinstance(layer, KAModule) and isinstance(layer.activation, SharedSplineActivation)
    assert layer.weight.shape == torch_layer.weight.shape


def test_spline_kwargs_are_validated_and_channel_count_checked():
    with pytest.raises(ValueError, match="share"):
        KAonv2d(4, 4, 3, share="pixel")
    with pytest.raises(ValueError, match="num_channels"):
        KAonv2d(4, 4, 3, num_channels=3)
    with pytest.raises(ValueError, match="4 channels"):
        KAonv2d(4, 4, 3, share="channel")(torch.randn(1, 5, 8, 8))


def test_extreme_inputs_through_layers_are_finite():
    layer = KAonv2d(2, 3, 3, padding=1, spline_grad="exact", share="channel")
    x = torch.full((1, 2, 6, 6), 1e4)
    x[:, 0] = -1e4
    x.requires_grad_()
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_bf16_autocast_conv_finite_and_close():
    layer = KAonv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 16, 16)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("spline_grad", ["free", "exact"])
def test_compiled_stack_matches_eager(spline_grad):
    torch._dynamo.reset()
    stack = nn.Sequential(KAonv2d(3, 8, 3, padding=1, spline_grad=spline_grad),
                          nn.InstanceNorm2d(8, affine=True),
                          KAonv2d(8, 4, 3, padding=1, spline_grad=spline_grad, share="channel"))
    x = torch.randn(2, 3, 12, 10)
    eager_out = stack(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(stack.parameters()))
    compiled = torch.compile(stack)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(stack.parameters()))
    torch.testing.assert_close(out, eager_out, atol=1e-4, rtol=1e-4)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, atol=1e-4, rtol=1e-3)


# (layer factory, input shape, the torch functional op applied to phi(x) as the reference)
FUSED_CASES = {
    "conv2d": (lambda **k: KAonv2d(4, 6, 3, stride=2, padding=1, groups=2, **k), (2, 4, 9, 8),
               lambda l, p: F.conv2d(p, l.weight, l.bias, l.stride, l.padding, l.dilation, l.groups)),
    "conv3d_nobias": (lambda **k: KAonv3d(4, 4, 3, padding=(0, 1, 1), dilation=(1, 2, 1), bias=False, **k),
                      (1, 4, 5, 7, 6),
                      lambda l, p: F.conv3d(p, l.weight, None, l.stride, l.padding, l.dilation, l.groups)),
    "conv1d_depthwise": (lambda **k: KAonv1d(4, 4, 5, padding=2, groups=4, **k), (3, 4, 11),
                         lambda l, p: F.conv1d(p, l.weight, l.bias, l.stride, l.padding, l.dilation, l.groups)),
    "transpose2d": (lambda **k: KAonvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, **k),
                    (2, 4, 5, 6),
                    lambda l, p: F.conv_transpose2d(p, l.weight, l.bias, l.stride, l.padding, l.output_padding,
                                                    l.groups, l.dilation)),
    "transpose3d": (lambda **k: KAonvTranspose3d(4, 3, 2, stride=2, **k), (1, 4, 3, 4, 2),
                    lambda l, p: F.conv_transpose3d(p, l.weight, l.bias, l.stride, l.padding, l.output_padding,
                                                    l.groups, l.dilation)),
    "linear": (lambda **k: KALinear(6, 5, **k), (2, 7, 6), lambda l, p: F.linear(p, l.weight, l.bias)),
}


def _fused_and_reference_gradients(case, dtype=torch.float32, **spline_kwargs):
    make, shape, functional = FUSED_CASES[case]
    torch.manual_seed(0)
    layer = make(init_scale=0.5, **spline_kwargs).to(dtype)
    x = (torch.randn(shape, dtype=dtype) * 2).requires_grad_()
    params = [x, *layer.parameters()]
    out = layer(x)
    upstream = torch.randn_like(out)
    fused = torch.autograd.grad(out, params, upstream)
    reference_out = functional(layer, phi(layer, x))
    reference = torch.autograd.grad(reference_out, params, upstream)
    return out, reference_out, fused, reference


@pytest.mark.parametrize("case", list(FUSED_CASES))
@pytest.mark.parametrize("spline_grad", ["free", "exact"])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_fused_layer_gradients_match_torch_op_of_plain_phi(case, spline_grad, share):
    """x, weight, bias, coefficients and base weight, against torch's own op autograd through plain-ops phi."""
    out, reference_out, fused, reference = _fused_and_reference_gradients(case, spline_grad=spline_grad,
                                                                          share=share)
    torch.testing.assert_close(out, reference_out, atol=1e-5, rtol=1e-5)
    for g, r in zip(fused, reference):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(FUSED_CASES))
@pytest.mark.parametrize("spline_grad", ["free", "exact"])
def test_fused_layer_group_sharing_matches_plain_phi(case, spline_grad):
    """share='group' (2 groups of 2 or 3 channels) through the fused Functions against the plain-ops phi, which
    spreads each group's spline over its channels by repeating it."""
    out, reference_out, fused, reference = _fused_and_reference_gradients(case, spline_grad=spline_grad,
                                                                          share="group", num_groups=2)
    assert fused[3].shape[0] == 2  # two splines: the coefficient gradient of each group
    torch.testing.assert_close(out, reference_out, atol=1e-5, rtol=1e-5)
    for g, r in zip(fused, reference):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["conv2d", "transpose2d", "linear"])
def test_fused_layer_exact_gradcheck(case):
    make, shape, _ = FUSED_CASES[case]
    layer = make(spline_grad="exact", share="channel", init_scale=0.5).double()
    x = (torch.randn(shape, dtype=torch.float64) * 2).requires_grad_()
    # gradcheck perturbs x and every parameter; the spline is C2, so finite differences are smooth.
    params = list(layer.parameters())

    def fn(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip(
                [n for n, _ in layer.named_parameters()], ps))):
            return layer(x)

    assert torch.autograd.gradcheck(fn, (x, *[p.detach().clone().requires_grad_() for p in params]))


@pytest.mark.parametrize("case", ["conv2d", "transpose3d", "linear"])
def test_fused_layer_keeps_only_its_input(case):
    from nnunetv2_allukan.memory import saved_tensor_bytes
    make, shape, _ = FUSED_CASES[case]
    layer = make()
    x = torch.randn(shape, requires_grad=True)
    x_bytes = x.numel() * x.element_size()
    saved, _ = saved_tensor_bytes(lambda: layer(x), exclude=layer.parameters())
    assert saved <= x_bytes + 4096
    layer.fuse_activation = False  # control: phi(x) then the torch op keeps phi(x) as well
    saved_unfused, _ = saved_tensor_bytes(lambda: layer(x), exclude=layer.parameters())
    assert saved_unfused >= 1.9 * x_bytes


def test_fused_layer_under_bf16_autocast_follows_torch_dtype_rules():
    layer = KAonv2d(4, 6, 3, padding=1, spline_grad="exact")
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    ref = torch.autograd.grad(layer(x).square().sum(), [x, layer.weight, layer.activation.coef])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected_dtype = F.conv2d(x, layer.weight).dtype
    assert y.dtype == expected_dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().square().sum(), [x, layer.weight, layer.activation.coef])
    assert [g.dtype for g in grads] == [torch.float32] * 3
    for g, r in zip(grads, ref):
        assert torch.isfinite(g).all()
        assert (g - r).norm() < 0.05 * r.norm()


def test_layer_benchmark_rows_show_the_memory_claims():
    """bench-layers at a toy size: a fused KAonv keeps half of Conv+LeakyReLU (x only) on every backend, the per-edge
    KAN far more."""
    from nnunetv2_allukan.tools.bench_layers import BASELINE, backends_for, markdown_table, run as bench
    rows = bench(batch=1, channels=4, size=32, repeats=1, compiled=False, reference=True, reference_size=6)
    eager = {r["layer"]: r for r in rows if r["mode"] == "eager" and r["input"][-1] == 32}
    ka_rows = {f"KAonv2d {g}/{s} [{b}]" for b in backends_for("cpu") for g in ("free", "exact")
               for s in ("layer", "channel")}
    assert set(eager) == {BASELINE, "Conv+GELU"} | ka_rows
    for name, r in eager.items():
        assert r["saved_ratio"] == pytest.approx(1.0 if name.startswith("Conv") else 0.5, abs=0.05), name
    reference = next(r for r in rows if r["layer"] == "KANConv2d (reference)")
    assert reference["saved_ratio"] > 5
    assert "KANConv2d (reference)" in markdown_table(rows)
    rows3d = bench(batch=1, channels=4, size=8, repeats=1, reference=False, dim=3)
    assert {r["layer"] for r in rows3d} == {BASELINE, "Conv+GELU"} | {n.replace("2d", "3d") for n in ka_rows}
