"""torch.func (grad, vmap, per-sample gradients) through the KA layers, and unbatched inputs as torch's convs take
them. References: the same layers called one sample at a time, and autograd's ordinary backward."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from nnunetv2_allukan import (KALinear, KAonv1d, KAonv2d, KAonv3d, KAonvTranspose2d, KAonvTranspose3d,
                              SharedSplineActivation)

# (layer factory, shape of one sample with its batch of 2)
LAYERS = {
    "conv2d": (lambda **k: KAonv2d(3, 4, 3, padding=1, stride=2, **k), (2, 3, 7, 6)),
    "conv3d": (lambda **k: KAonv3d(2, 3, 3, padding=1, **k), (2, 2, 4, 5, 3)),
    "transpose2d": (lambda **k: KAonvTranspose2d(3, 2, 2, stride=2, **k), (2, 3, 4, 5)),
    "linear": (lambda **k: KALinear(5, 3, **k), (2, 6, 5)),
}


def _layer(case, **kwargs):
    torch.manual_seed(0)
    make, shape = LAYERS[case]
    return make(init_scale=0.5, **kwargs), shape


def _loss(layer):
    def loss(params, x):
        return functional_call(layer, params, (x,)).square().sum()
    return loss


def _autograd_gradients(layer, x) -> dict:
    layer.zero_grad()
    layer(x).square().sum().backward()
    return {name: p.grad.clone() for name, p in layer.named_parameters()}


@pytest.mark.parametrize("case", list(LAYERS))
@pytest.mark.parametrize("spline_grad,share", [("free", "layer"), ("exact", "channel")])
def test_torch_func_grad_equals_autograd(case, spline_grad, share):
    layer, shape = _layer(case, spline_grad=spline_grad, share=share)
    x = torch.randn(shape) * 2
    params = {name: p.detach() for name, p in layer.named_parameters()}
    expected = _autograd_gradients(layer, x)
    got = grad(_loss(layer))(params, x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(LAYERS))
@pytest.mark.parametrize("spline_grad,share", [("free", "channel"), ("exact", "layer")])
def test_vmap_and_per_sample_gradients_equal_one_sample_at_a_time(case, spline_grad, share):
    layer, shape = _layer(case, spline_grad=spline_grad, share=share)
    xs = torch.randn(3, *shape) * 2  # vmap over 3 samples, each a batch of 2
    torch.testing.assert_close(vmap(layer)(xs), torch.stack([layer(x) for x in xs]), atol=1e-5, rtol=1e-5)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    per_sample = vmap(grad(_loss(layer)), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        for name, expected in _autograd_gradients(layer, x).items():
            torch.testing.assert_close(per_sample[name][i], expected, atol=1e-4, rtol=1e-4)


def test_vmap_over_stacked_parameters_runs_each_model():
    """Ensembling with torch.func.stack_module_state: parameters batched too."""
    models = [_layer("conv2d", share="channel")[0] for _ in range(2)]
    for m, scale in zip(models, (1.0, -0.5)):
        with torch.no_grad():
            m.activation.coef.mul_(scale)
    params, buffers = torch.func.stack_module_state(models)
    x = torch.randn(2, 3, 7, 6)
    out = vmap(lambda p, b: functional_call(models[0], (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(out, torch.stack([m(x) for m in models]), atol=1e-5, rtol=1e-5)


def test_the_activation_alone_under_torch_func():
    act = SharedSplineActivation(4, share="channel", spline_grad="exact", init_scale=0.5)
    x = torch.randn(2, 4, 5) * 2
    dx = grad(lambda v: act(v).sum())(x)
    x_ = x.clone().requires_grad_()
    act(x_).sum().backward()
    torch.testing.assert_close(dx, x_.grad)
    torch.testing.assert_close(vmap(act)(x[:, None]), act(x)[:, None])


UNBATCHED = {
    "conv1d": (lambda **k: KAonv1d(4, 6, 3, padding=1, **k), nn.Conv1d, (4, 9)),
    "conv2d": (lambda **k: KAonv2d(4, 6, 3, **k), nn.Conv2d, (4, 8, 8)),
    "conv3d": (lambda **k: KAonv3d(4, 2, 3, padding=1, **k), nn.Conv3d, (4, 3, 5, 4)),
    "transpose2d": (lambda **k: KAonvTranspose2d(4, 3, 3, stride=2, **k), nn.ConvTranspose2d, (4, 5, 6)),
    "transpose3d": (lambda **k: KAonvTranspose3d(4, 3, 2, stride=2, **k), nn.ConvTranspose3d, (4, 2, 3, 2)),
}


@pytest.mark.parametrize("case", list(UNBATCHED))
@pytest.mark.parametrize("share", ["layer", "channel"])
@pytest.mark.parametrize("fused", [True, False])
def test_unbatched_input_as_torch_convs_take_it(case, share, fused):
    make, torch_conv, shape = UNBATCHED[case]
    torch.manual_seed(0)
    layer = make(share=share, init_scale=0.5)
    layer.fuse_activation = fused
    x = torch.randn(shape) * 2
    out = layer(x)
    torch.testing.assert_close(out, layer(x[None])[0])
    assert out.shape == torch_conv.forward(layer, x).shape  # torch's own layer on the same (unbatched) input


def test_unbatched_share_channel_reads_the_channel_dimension():
    """(C, H, W): the per-channel splines act along C (dim 0 of the input), not along H."""
    layer = KAonv2d(4, 6, 3, share="channel", init_scale=0.5)
    x = torch.randn(4, 8, 8)
    phi = torch.stack([layer.activation(x[None])[0][c] for c in range(4)])
    expected = torch.nn.functional.conv2d(phi[None], layer.weight, layer.bias)[0]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_unbatched_transposed_conv_accepts_output_size_with_channels():
    layer = KAonvTranspose2d(4, 3, 3, stride=2)
    x = torch.randn(4, 5, 6)
    assert layer(x, output_size=[3, 12, 14]).shape == (3, 12, 14)
    assert layer(x, output_size=[12, 14]).shape == (3, 12, 14)
