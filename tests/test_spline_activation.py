"""SharedSplineActivation against independent references: Cox-de Boor, gradcheck, hand-written formulas."""
import pytest
import torch
import torch.nn.functional as F

from nnunetv2_allukan import SharedSplineActivation
from nnunetv2_allukan.memory import saved_tensor_bytes
from nnunetv2_allukan.spline import bspline_basis


def cox_de_boor(x, grid_size, lo, hi, order=3):
    """Textbook Cox-de Boor recursion, written independently of the library."""
    h = (hi - lo) / grid_size
    knots = [lo + (m - order) * h for m in range(grid_size + 2 * order + 1)]
    n_knots = len(knots)
    out = torch.zeros(x.shape + (grid_size + order,), dtype=torch.float64)
    for idx, xv in enumerate(x.tolist()):
        b = [1.0 if knots[i] <= xv < knots[i + 1] else 0.0 for i in range(n_knots - 1)]
        for k in range(1, order + 1):
            b = [(xv - knots[i]) / (knots[i + k] - knots[i]) * b[i]
                 + (knots[i + k + 1] - xv) / (knots[i + k + 1] - knots[i + 1]) * b[i + 1]
                 for i in range(len(b) - 1)]
        out[idx] = torch.tensor(b, dtype=torch.float64)
    return out


@pytest.mark.parametrize("grid_size,grid_range", [(5, (-3.0, 3.0)), (8, (-1.0, 2.0)), (1, (0.0, 1.0))])
def test_basis_matches_cox_de_boor(grid_size, grid_range):
    lo, hi = grid_range
    h = (hi - lo) / grid_size
    x = torch.linspace(lo - 4 * h, hi + 4 * h, 997, dtype=torch.float64)
    ours = bspline_basis(x, grid_size, grid_range)
    assert ours.shape == (997, grid_size + 3)
    torch.testing.assert_close(ours, cox_de_boor(x, grid_size, lo, hi), atol=1e-5, rtol=0)


def test_basis_partition_of_unity_and_vanishes_outside():
    x = torch.linspace(-3.0, 2.999, 501, dtype=torch.float64)
    torch.testing.assert_close(bspline_basis(x, 5, (-3.0, 3.0)).sum(-1), torch.ones_like(x))
    far = torch.tensor([-1e4, -6.61, 6.61, 1e4], dtype=torch.float64)  # extended grid is [-6.6, 6.6]
    assert bspline_basis(far, 5, (-3.0, 3.0)).abs().max() == 0


def reference_phi(act, x):
    """phi from the definition, with the Cox-de Boor basis: w_b silu(x) + sum_j c_j B_j(x)."""
    lo, hi = act.grid_range
    basis = cox_de_boor(x.detach().double().reshape(-1), act.grid_size, lo, hi).reshape(x.shape + (-1,))
    coef = act.coef.detach().double()
    wb = act.base_weight.detach().double()
    if act.share == "layer":
        return wb[0] * F.silu(x.double()) + basis @ coef[0]
    c = coef.reshape(1, -1, 1, coef.shape[1])  # x is (N, C, L)
    return wb.reshape(1, -1, 1) * F.silu(x.double()) + (basis * c).sum(-1)


@pytest.mark.parametrize("impl", ["function", "plain"])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_forward_matches_definition(impl, share):
    act = SharedSplineActivation(num_channels=3, grid_size=5, share=share, impl=impl, init_scale=0.5)
    x = torch.randn(2, 3, 40) * 4
    torch.testing.assert_close(act(x).double(), reference_phi(act, x), atol=1e-5, rtol=1e-5)


def test_starts_close_to_silu():
    act = SharedSplineActivation(grid_size=5)
    x = torch.linspace(-3, 3, 100)
    assert (act(x) - F.silu(x)).abs().max() < 0.5
    assert act.base_weight.item() == 1.0


@pytest.mark.parametrize("impl", ["function", "plain"])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_exact_passes_gradcheck(impl, share):
    act = SharedSplineActivation(num_channels=3, grid_size=4, share=share, spline_grad="exact", impl=impl,
                                 init_scale=0.5).double()
    x = (torch.randn(2, 3, 6, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda inp, c, w: act(inp), (x, act.coef, act.base_weight))


@pytest.mark.parametrize("impl", ["function", "plain"])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_free_gradients(impl, share):
    kwargs = dict(num_channels=3, grid_size=5, share=share, impl=impl, init_scale=0.5)
    free = SharedSplineActivation(spline_grad="free", **kwargs).double()
    exact = SharedSplineActivation(spline_grad="exact", **kwargs).double()
    exact.load_state_dict(free.state_dict())
    x = (torch.randn(2, 3, 50, dtype=torch.float64) * 3).requires_grad_()
    upstream = torch.randn(2, 3, 50, dtype=torch.float64)
    gx_f, gc_f, gw_f = torch.autograd.grad(free(x), (x, free.coef, free.base_weight), upstream)
    gx_e, gc_e, gw_e = torch.autograd.grad(exact(x), (x, exact.coef, exact.base_weight), upstream)
    torch.testing.assert_close(gc_f, gc_e)
    torch.testing.assert_close(gw_f, gw_e)
    # Grad-Free Spline: only the base branch carries the input gradient.
    wb = free.base_weight.detach().reshape(1, -1, 1) if share == "channel" else free.base_weight.detach()
    xd = x.detach()
    silu_slope = torch.sigmoid(xd) * (1 + xd * (1 - torch.sigmoid(xd)))
    torch.testing.assert_close(gx_f, wb * silu_slope * upstream)
    assert not torch.allclose(gx_f, gx_e)  # the spline slope is non-trivial here


@pytest.mark.parametrize("spline_grad", ["free", "exact"])
@pytest.mark.parametrize("share", ["layer", "channel"])
def test_saves_only_the_input(spline_grad, share):
    act = SharedSplineActivation(num_channels=8, share=share, spline_grad=spline_grad, impl="function")
    x = torch.randn(4, 8, 32, 32, requires_grad=True)
    saved, _ = saved_tensor_bytes(lambda: act(x))
    assert saved <= x.numel() * x.element_size() + 4096


def test_dense_basis_autograd_would_save_much_more():
    """Sanity check that the counter can fail: autograd through a dense basis saves far more than x."""
    x = torch.randn(4, 8, 32, 32, requires_grad=True)
    coef = torch.randn(8, requires_grad=True)
    saved, _ = saved_tensor_bytes(lambda: bspline_basis(x, 5, (-3.0, 3.0)) @ coef)
    assert saved > 5 * x.numel() * x.element_size()


@pytest.mark.parametrize("spline_grad", ["free", "exact"])
def test_extreme_inputs_are_finite(spline_grad):
    act = SharedSplineActivation(num_channels=2, share="channel", spline_grad=spline_grad)
    x = torch.tensor([[-1e4, -50.0, 0.0, 50.0, 1e4], [1e4, 3.0, -3.0, 1e-8, -1e4]]).reshape(1, 2, 5)
    x.requires_grad_()
    y = act(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(act.coef.grad).all() and torch.isfinite(act.base_weight.grad).all()


@pytest.mark.parametrize("impl", ["function", "plain"])
def test_bf16_autocast_runs_spline_in_fp32(impl):
    act = SharedSplineActivation(num_channels=4, share="channel", impl=impl)
    x = torch.randn(2, 4, 16, 16)
    ref = act(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = act(x)
        y_half_in = act(x.bfloat16())
    assert y.dtype == torch.float32  # fp32 input stays fp32: no silent bf16 spline
    torch.testing.assert_close(y, ref)
    assert torch.isfinite(y_half_in).all()
    torch.testing.assert_close(y_half_in.float(), ref, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("kwargs,match", [
    (dict(share="edge"), "share"),
    (dict(spline_grad="none"), "spline_grad"),
    (dict(grid_range=(1.0, 1.0)), "grid_range"),
    (dict(grid_range=(2.0, -2.0)), "grid_range"),
    (dict(grid_size=0), "grid_size"),
    (dict(share="channel"), "num_channels"),
    (dict(impl="triton"), "impl"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharedSplineActivation(**kwargs)


def _grouped_and_tied_channel(channels, num_groups, spline_grad, impl="function", channel_dim=1):
    """A share='group' activation and a share='channel' one whose per-channel splines are the group's spline."""
    torch.manual_seed(0)
    kwargs = dict(grid_size=5, spline_grad=spline_grad, impl=impl, channel_dim=channel_dim)
    grouped = SharedSplineActivation(channels, share="group", num_groups=num_groups, init_scale=0.5, **kwargs).double()
    per_channel = SharedSplineActivation(channels, share="channel", **kwargs).double()
    with torch.no_grad():
        grouped.base_weight.uniform_(0.5, 1.5)
        per_group = channels // grouped.coef.shape[0]
        per_channel.coef.copy_(grouped.coef.repeat_interleave(per_group, 0))
        per_channel.base_weight.copy_(grouped.base_weight.repeat_interleave(per_group, 0))
    return grouped, per_channel, per_group


@pytest.mark.parametrize("impl", ["function", "plain"])
@pytest.mark.parametrize("spline_grad", ["free", "exact"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_innermost"])
def test_group_sharing_equals_channel_sharing_with_tied_splines(impl, spline_grad, layout):
    """Values and input gradients as the per-channel activation with each group's spline copied to its channels;
    each group's parameter gradient is the sum of its channels' gradients."""
    channel_dim = -1 if layout == "channels_innermost" else 1
    grouped, per_channel, per_group = _grouped_and_tied_channel(12, 8, spline_grad, impl, channel_dim)
    assert grouped.coef.shape[0] == 4 and per_group == 3  # gcd(12, 8) groups
    if layout == "channels_innermost":
        x = torch.randn(2, 5, 12, dtype=torch.float64) * 3
    else:
        x = torch.randn(2, 12, 5, 6, dtype=torch.float64) * 3
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    upstream = torch.randn_like(x)
    results = []
    for act in (grouped, per_channel):
        xi = x.clone().requires_grad_()
        out = act(xi)
        results.append((out, *torch.autograd.grad(out, (xi, act.coef, act.base_weight), upstream)))
    (y_g, gx_g, gc_g, gw_g), (y_c, gx_c, gc_c, gw_c) = results
    torch.testing.assert_close(y_g, y_c)
    torch.testing.assert_close(gx_g, gx_c)
    torch.testing.assert_close(gc_g, gc_c.reshape(4, per_group, -1).sum(1))
    torch.testing.assert_close(gw_g, gw_c.reshape(4, per_group).sum(1))
    if impl == "function" and layout != "channels_innermost":
        assert y_g.stride() == x.stride()


def test_group_sharing_exact_gradcheck():
    act = SharedSplineActivation(num_channels=6, grid_size=4, share="group", num_groups=3, spline_grad="exact",
                                 init_scale=0.5).double()
    x = (torch.randn(2, 6, 5, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda inp, c, w: act(inp), (x, act.coef, act.base_weight))


@pytest.mark.parametrize("channels,num_groups,splines", [(1, 8, 1), (12, 8, 4), (32, 8, 8), (320, 8, 8),
                                                         (32, 3, 1), (6, 6, 6)])
def test_group_count_is_the_gcd(channels, num_groups, splines):
    act = SharedSplineActivation(channels, share="group", num_groups=num_groups)
    assert act.coef.shape[0] == act.base_weight.shape[0] == act.num_groups == splines


@pytest.mark.parametrize("num_groups", [0, 2.5, True, "8"])
def test_group_sharing_rejects_bad_group_counts(num_groups):
    with pytest.raises(ValueError, match="num_groups"):
        SharedSplineActivation(8, share="group", num_groups=num_groups)


def test_group_sharing_checks_the_channel_count():
    act = SharedSplineActivation(num_channels=8, share="group")
    with pytest.raises(ValueError, match="8 channels"):
        act(torch.randn(2, 4, 5))


def test_wrong_channel_count():
    act = SharedSplineActivation(num_channels=3, share="channel")
    with pytest.raises(ValueError, match="3 channels"):
        act(torch.randn(2, 4, 5))


def test_no_tensor_is_built_from_python_data_in_a_ka_forward(monkeypatch):
    """On CUDA a tensor built from Python data is a host-to-device copy and a stream sync: a KA layer's forward and
    backward must build none once warmed up (the spline table's piece matrix is cached per dtype and device)."""
    from nnunetv2_allukan.layers import KAonv2d

    layer = KAonv2d(3, 4, 3, padding=1, share="channel")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    layer(x).sum().backward()  # warm-up
    built = []
    original = torch.tensor

    def counting_tensor(*args, **kwargs):
        built.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting_tensor)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()
    assert built == []


def test_piece_matrix_cache_keeps_no_fake_or_inference_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from nnunetv2_allukan import spline

    spline._PIECE_MATRICES.clear()
    with FakeTensorMode():
        spline.spline_table(torch.zeros(1, 8, dtype=torch.float64))
    assert spline._PIECE_MATRICES == {}
    with torch.inference_mode():
        spline.spline_table(torch.zeros(1, 8, dtype=torch.float64))
    coef = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    spline.spline_table(coef).sum().backward()  # would fail on a cached inference tensor
    assert coef.grad is not None and not spline._PIECE_MATRICES[(torch.float64, torch.device("cpu"))].is_inference()


@pytest.mark.parametrize("grid_size", [1, 5, 8])
def test_table_gradient_to_coefficients_is_the_transpose_of_spline_table(grid_size):
    """Against autograd through ``spline_table``: the custom Functions' coefficient gradient rests on it."""
    from nnunetv2_allukan import spline

    coef = torch.randn(3, grid_size + 3, dtype=torch.float64, requires_grad=True)
    table = spline.spline_table(coef)
    grad_table = torch.randn_like(table)
    expected, = torch.autograd.grad(table, coef, grad_table)
    torch.testing.assert_close(spline.table_gradient_to_coefficients(grad_table), expected, rtol=1e-12, atol=1e-12)
