"""Memory passes of one layer's forward+backward, counted from the ops it runs (docs/gpu_kernels.md).

Every aten op that a 3x3 layer's forward+backward dispatches is intercepted (TorchDispatchMode) and the bytes of
its activation-sized tensor inputs and outputs are summed (tensors under a quarter of the activation, i.e. weights,
spline tables and partial sums, are left out; so are views, which move nothing). For the Triton path the two
custom ops are seen whole: their tensor arguments are exactly what the kernels load and store (x and phi forward;
x, dL/dphi and dL/dx backward), so the count is the kernels' own. Bytes are per element of the layer input;
"pointwise" is everything but the convolution, whose traffic is the same in all rows.

Run (the Triton rows need a GPU or the interpreter):
``TRITON_INTERPRET=1 python benchmarks/layer_passes.py``
"""
from __future__ import annotations

import collections

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nnunetv2_allukan.activation as activation
from nnunetv2_allukan.layers import KAonv2d

NO_DATA = {"view", "_unsafe_view", "alias", "permute", "detach", "expand", "reshape", "t", "transpose", "slice",
           "select", "unsqueeze", "as_strided", "empty", "empty_like", "new_empty", "empty_strided"}


class PassCounter(TorchDispatchMode):
    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.ops = collections.Counter()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in NO_DATA:
            return out
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                   if isinstance(t, torch.Tensor) and t.numel() >= self.numel // 4 and 0 not in t.stride()]
        if tensors:
            kind = "conv" if "convolution" in name else "pointwise"
            self.ops[kind] += 1
            self.bytes[kind] += sum(t.numel() * t.element_size() for t in tensors)
        return out


class LeakyConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(nn.functional.leaky_relu(x, 0.01))


def count(module: nn.Module, shape, fp16_autocast: bool) -> dict:
    x = torch.randn(shape, requires_grad=True)
    numel = x.numel()

    def forward():
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16_autocast):
            return module(x)

    gy = torch.randn_like(forward())
    with PassCounter(numel) as counter:
        forward().backward(gy)
    return {kind: dict(ops=counter.ops[kind], bytes_per_element=counter.bytes[kind] / numel)
            for kind in ("pointwise", "conv")}


def main():
    shape = (2, 16, 32, 32)
    activation.TORCH_PIECE_ELEMENTS = None  # whole tensors: the count per op is then the count per pass
    rows = [("LeakyReLU + Conv2d", lambda: LeakyConv(16))]
    for backend in ("torch", "triton"):
        for grad, share in (("free", "layer"), ("exact", "channel")):
            rows.append((f"KAonv2d {grad}/{share}, {backend} path",
                         lambda g=grad, s=share, b=backend: KAonv2d(16, 16, 3, padding=1, spline_grad=g, share=s,
                                                                    backend=b)))
    print("| layer, fwd+bwd | pointwise ops | pointwise bytes/element fp32 | same, fp16 autocast | "
          "conv bytes/element fp32 |")
    print("|---|---|---|---|---|")
    for name, make in rows:
        torch.manual_seed(0)
        try:
            fp32, fp16 = count(make(), shape, False), count(make(), shape, True)
        except RuntimeError as e:  # the Triton rows without a GPU or interpreter
            print(f"| {name} | {e} | | | |")
            continue
        print(f"| {name} | {fp32['pointwise']['ops']} | {fp32['pointwise']['bytes_per_element']:.0f} | "
              f"{fp16['pointwise']['bytes_per_element']:.0f} | {fp32['conv']['bytes_per_element']:.0f} |")


if __name__ == "__main__":
    main()
