"""The reviewers' questions: does the Grad-Free Spline bias gradients, and do deep KA stacks train?"""
import subprocess
import sys

import pytest
import torch
from torch import nn

from nnunetv2_allukan import KALinear, SharedSplineActivation
from nnunetv2_allukan.architectures import AllUKAN
from nnunetv2_allukan.tools.gradfid import gradient_fidelity


def small_net():
    torch.manual_seed(0)
    return AllUKAN(1, 3, [4, 8, 8], nn.Conv2d, 3, [[1, 1], [2, 2], [2, 2]], 1, 3, 1, deep_supervision=True)


def ds_loss(outputs):
    return sum(o.square().mean() * (0.5 ** i) for i, o in enumerate(outputs))


def test_free_equals_exact_when_the_splines_are_zero():
    net = small_net()
    for m in net.modules():
        if isinstance(m, SharedSplineActivation):
            m.coef.data.zero_()
    result = gradient_fidelity(net, torch.randn(2, 1, 16, 16), ds_loss)
    assert result["overall"] == pytest.approx(1.0, abs=1e-9)


def test_non_trivial_splines_bend_only_the_gradients_before_them():
    net = small_net()
    for m in net.modules():
        if isinstance(m, SharedSplineActivation):
            m.coef.data.normal_(0, 1.0)
            assert m.spline_grad == "free"
    result = gradient_fidelity(net, torch.randn(2, 1, 16, 16), ds_loss)
    heads = {k: v for k, v in result["per_parameter"].items() if k.startswith("decoder.seg_layers.")}
    assert heads and all(v == pytest.approx(1.0, abs=1e-9) for v in heads.values())  # nothing after them
    assert result["per_parameter"]["encoder.stages.0.0.0.weight"] < 0.999
    assert result["overall"] < 0.9999
    # the modes were restored
    assert all(m.spline_grad == "free" for m in net.modules() if isinstance(m, SharedSplineActivation))


def test_gradfid_cli_writes_json_and_png(tmp_path):
    out = tmp_path / "gf"
    proc = subprocess.run([sys.executable, "-m", "nnunetv2_allukan.tools.cli", "gradfid", "--patch", "32", "32",
                           "--base-features", "4", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "gradfid.json").is_file() and (out / "gradfid.png").is_file()
    assert "overall" in proc.stdout


class DeepKAStack(nn.Module):
    """depth x [LayerNorm -> KALinear] with residual adds, then a KALinear read-out."""

    def __init__(self, depth, width, spline_grad):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.layers = nn.ModuleList(KALinear(width, width, spline_grad=spline_grad) for _ in range(depth))
        self.out = KALinear(width, 1, spline_grad=spline_grad)

    def forward(self, x):
        h = self.inp(x)
        for norm, layer in zip(self.norms, self.layers):
            h = h + layer(norm(h)) / len(self.layers) ** 0.5
        return self.out(h)


@pytest.mark.parametrize("spline_grad", ["free", "exact"])
def test_a_24_layer_ka_stack_trains(spline_grad):
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]])) + 0.5 * x[:, :1] ** 2
    net = DeepKAStack(24, 16, spline_grad)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    losses = []
    for _ in range(150):
        loss = (net(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:10]) / 10
