"""Reference per-edge KAN against naive loops written here, and the unfold convolution against conv semantics."""
import pytest
import torch
import torch.nn.functional as F

from nnunetv2_allukan.reference import KANConv2d, KANConv3d, KANLinear
from nnunetv2_allukan.spline import bspline_basis


def naive_kan_linear(layer, x):
    """y_o = sum_i w_b[o,i] silu(x_i) + s[o,i] sum_j w_s[o,i,j] B_j(x_i), one edge at a time."""
    kan = layer.kan
    lo, hi = kan.grid[3].item(), kan.grid[-4].item()
    out = torch.zeros(x.shape[0], layer.out_features, dtype=torch.float64)
    for n in range(x.shape[0]):
        for o in range(layer.out_features):
            for i in range(layer.in_features):
                xi = x[n, i].double()
                basis = bspline_basis(xi.reshape(1), kan.grid_size, (lo, hi))[0]
                edge = kan.base_weight[0, o, i].double() * F.silu(xi)
                edge = edge + kan.spline_scaler[0, o, i].double() * (kan.spline_weight[0, o, i].double() @ basis)
                out[n, o] += edge
    return out


def test_kan_linear_equals_per_edge_loop():
    layer = KANLinear(4, 3, grid_size=5, init_scale=0.5)
    x = torch.randn(5, 4) * 2.5
    torch.testing.assert_close(layer(x).double(), naive_kan_linear(layer, x), atol=1e-5, rtol=1e-5)


def test_kan_linear_parameter_count():
    layer = KANLinear(10, 7, grid_size=5, spline_order=3)
    assert sum(p.numel() for p in layer.parameters()) == 10 * 7 * (5 + 3 + 2)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_kan_conv2d_is_kan_linear_over_patches_inside_the_image(stride, padding, dilation):
    conv = KANConv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation)
    lin = KANLinear(27, 4)
    lin.kan.load_state_dict(conv.kan.state_dict())
    x = torch.randn(2, 3, 9, 10)
    patches = F.unfold(x, 3, dilation=dilation, padding=padding, stride=stride)  # (N, 27, L)
    inside = F.unfold(torch.ones(1, 1, 9, 10), 3, dilation=dilation, padding=padding, stride=stride).min(1).values
    y_ref = lin(patches.transpose(1, 2)).transpose(1, 2)
    out = conv(x)
    assert out.shape[:2] == (2, 4)
    interior = inside[0] == 1  # patches without padding taps (the borders: test_kan_conv_borders_*)
    assert interior.any()
    torch.testing.assert_close(out.reshape(2, 4, -1)[..., interior], y_ref[..., interior])


def naive_kan_conv2d(conv, x):
    """Per output pixel, the sum over the kernel taps that lie inside the image of each edge's function (one edge
    at a time). A tap outside the image is not an input of the KAN: it has no edge and contributes nothing."""
    kan, (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kan, conv.kernel_size, conv.stride, conv.padding, conv.dilation
    lo, hi = kan.grid[3].item(), kan.grid[-4].item()
    n, c_in, h, w = x.shape
    out_h, out_w = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.zeros(n, conv.out_channels, out_h, out_w, dtype=torch.float64)
    for b in range(n):
        for r in range(out_h):
            for q in range(out_w):
                for i in range(c_in):
                    for a in range(kh):
                        for e in range(kw):
                            y, z = r * sh - ph + a * dh, q * sw - pw + e * dw
                            if not (0 <= y < h and 0 <= z < w):
                                continue
                            xi = x[b, i, y, z].double()
                            basis = bspline_basis(xi.reshape(1), kan.grid_size, (lo, hi))[0]
                            edge = i * kh * kw + a * kw + e
                            for o in range(conv.out_channels):
                                out[b, o, r, q] += kan.base_weight[0, o, edge].double() * F.silu(xi) + \
                                    kan.spline_scaler[0, o, edge].double() * (kan.spline_weight[0, o, edge].double()
                                                                              @ basis)
    return out


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 2, 1), (1, 2, 2)])
def test_kan_conv_borders_padding_taps_contribute_nothing(stride, padding, dilation):
    conv = KANConv2d(2, 2, 3, stride=stride, padding=padding, dilation=dilation, init_scale=0.5)
    x = torch.randn(1, 2, 5, 6) * 2
    expected = naive_kan_conv2d(conv, x)
    # phi(0) != 0 for a spline, so counting outside taps as x = 0 would change exactly the border pixels
    torch.testing.assert_close(conv(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("share", ["layer", "channel"])
def test_kan_conv_with_tied_weights_equals_kaonv_at_the_borders(share):
    """A per-edge KAN conv whose edge functions are W[o, i, tap] * phi_i equals KAonv2d with that phi and W:
    the directly stacked KAN and AllUKAN's layer treat the padding alike (no contribution from outside taps)."""
    from nnunetv2_allukan import KAonv2d

    torch.manual_seed(0)
    kaonv = KAonv2d(3, 4, 3, padding=1, stride=2, bias=False, share=share, init_scale=0.5)
    act = kaonv.activation
    coef, base_weight = act.coef.detach(), act.base_weight.detach()
    per_edge = KANConv2d(3, 4, 3, padding=1, stride=2)
    weight = kaonv.weight.detach().reshape(4, 3, 9)  # (out, in, tap)
    spline_of_channel = coef.expand(3, -1)  # (in, nb): one spline per layer or per input channel
    with torch.no_grad():
        per_edge.kan.base_weight.copy_((weight * base_weight.expand(3)[None, :, None]).reshape(1, 4, 27))
        per_edge.kan.spline_scaler.fill_(1.0)
        per_edge.kan.spline_weight.copy_((weight[..., None] * spline_of_channel[None, :, None, :])
                                         .reshape(1, 4, 27, -1))
    x = torch.randn(2, 3, 7, 8) * 2
    torch.testing.assert_close(per_edge(x), kaonv(x), atol=1e-5, rtol=1e-4)


def test_kan_conv3d_matches_2d_on_a_flat_volume():
    """A 1-voxel-deep 3D kernel on a depth-1 volume is the 2D convolution: checks the hand-written 3D unfold."""
    c3 = KANConv3d(2, 3, (1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1))
    c2 = KANConv2d(2, 3, 3, stride=(2, 1), padding=1)
    c2.kan.load_state_dict(c3.kan.state_dict())
    x = torch.randn(2, 2, 1, 8, 7)
    torch.testing.assert_close(c3(x)[:, :, 0], c2(x[:, :, 0]))


def test_kan_conv3d_shape_and_groups():
    conv = KANConv3d(4, 4, 3, padding=1, stride=2, groups=4)
    y = conv(torch.randn(1, 4, 6, 7, 8))
    assert y.shape == F.conv3d(torch.randn(1, 4, 6, 7, 8), torch.randn(4, 1, 3, 3, 3), padding=1, stride=2, groups=4).shape
    with pytest.raises(ValueError, match=r"expects \(N, 4"):
        conv(torch.randn(1, 3, 6, 7, 8))
