"""What the kernel tests of both backends share (tests/test_triton_kernels.py, tests/test_cpu_kernels.py): inputs
that exercise every branch of the spline, a KA layer's outputs and gradients, and the graphs torch.compile makes of
a layer. Not a test module (no ``test_`` prefix); imported by name from the tests folder."""
import torch


def difficult_input(shape, dtype, device="cpu", scale=4.0):
    """Random values over and beyond the extended grid [-6.6, 6.6], grid knots, NaN and huge values (the special
    values where the tensor has room for them)."""
    x = torch.randn(shape, dtype=torch.float64) * scale
    flat = x.view(-1)
    if flat.numel() >= 9:
        lo, h = -3.0, 6.0 / 5
        knots = torch.tensor([lo - 3 * h, lo - 2 * h, lo, 0.0, -lo, -lo + 3 * h], dtype=torch.float64)
        flat[:knots.numel()] = knots
        flat[-3:] = torch.tensor([float("nan"), 1e4, -1e4])
    return x.to(device=device, dtype=dtype)


def layer_grads(layer, x, compiled=False):
    """[output, dL/dx, dL/dparameter...] for a fixed upstream gradient; ``compiled``: under aot_eager."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    run = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
    y = run(x)
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype))
    return [y, x.grad] + [p.grad for p in layer.parameters()]


def compiled_op_targets(layer, x):
    """Compile ``layer`` with aot_autograd (fullgraph: no graph break allowed), check its output and gradients
    against eager, and return the ops of its forward and backward graphs with a readable listing of each (a list's
    repr is cut short on failure)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    eager = layer_grads(layer, x)
    torch._dynamo.reset()
    layer.zero_grad(set_to_none=True)
    xc = x.detach().requires_grad_()
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    y = compiled(xc)
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape))
    for a, b in zip(eager, [y, xc.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    forward, backward = graphs
    targets = [[n.target for n in g.graph.nodes if n.op == "call_function"] for g in (forward, backward)]
    listing = ["forward: " + ", ".join(map(str, targets[0])), "backward: " + ", ".join(map(str, targets[1]))]
    return targets, listing
