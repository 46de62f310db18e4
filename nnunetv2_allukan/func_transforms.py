"""What the KA layers' autograd Functions need to run under torch.func (grad, vmap, per-sample gradients).

torch.func needs Functions whose forward takes no ctx (with ``setup_context``) and, for vmap, a rule saying how to
run a batch of samples. These are the rules the Functions of ``activation`` and ``layers`` share. Their backward
formulas write into preallocated outputs, which vmap cannot batch, so under vmap they run as one op of their own
(``FirstOrderBackward``), one vmap sample at a time. Imports only torch.
"""
from __future__ import annotations

import torch


def batch_dim_first(x: torch.Tensor, x_dim: int | None, channel_dim: int | None, batch_size: int):
    """For a Function's ``vmap`` rule: x with vmap's batch dimension first (expanded when x is not batched), and
    the channel dimension of the logical (per-sample) x as a dimension of that physical tensor."""
    x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(batch_size, *x.shape)
    return x, (channel_dim + 1 if channel_dim is not None and channel_dim >= 0 else channel_dim)


def per_sample(function, info, in_dims, args) -> torch.Tensor:
    """For a Function's ``vmap`` rule when parameters are batched too (e.g. vmap over stacked weights): the
    Function once per vmap sample, stacked along dimension 0."""
    def sample(b):
        return [a if d is None or not torch.is_tensor(a) else a.select(d, b) for a, d in zip(args, in_dims)]
    return torch.stack([function.apply(*sample(b)) for b in range(info.batch_size)])


class FirstOrderBackward(torch.autograd.Function):
    """A Function's first-order backward ``formula(*tensors)`` as one op of its own, so that it also runs under
    torch.func.vmap (vmap over grad: per-sample gradients), one vmap sample at a time: the formulas write into
    preallocated outputs, which vmap cannot batch."""

    @staticmethod
    def forward(formula, *tensors):
        return formula(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the KA layers are differentiable once: double backward is not supported")

    @staticmethod
    def vmap(info, in_dims, formula, *tensors):
        def sample(b):
            return [t if d is None else t.select(d, b) for t, d in zip(tensors, in_dims[1:])]
        samples = [formula(*sample(b)) for b in range(info.batch_size)]
        outputs = tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*samples))
        return outputs, tuple(None if o is None else 0 for o in outputs)


def first_order_backward(formula, *tensors):
    """Run a Function's backward ``formula(*tensors)`` without recording it (first-order gradients, as plain
    autograd computes them; torch.func runs backward with grad mode on). Eagerly as ``FirstOrderBackward``, so
    that vmap can run it; directly while torch.compile traces it (the traced backward needs no vmap rule)."""
    with torch.no_grad():
        if torch.compiler.is_compiling():
            return formula(*tensors)
        return FirstOrderBackward.apply(formula, *tensors)


def pointwise_vmap(function, info, in_dims, x: torch.Tensor, params: tuple, config):
    """vmap rule of a Function ``function.apply(x, *params, config)`` that is elementwise in x, with per-channel
    parameters along ``config.channel_dim``: the whole vmap batch in one call when only x is batched."""
    if any(d is not None for d in in_dims[1:1 + len(params)]):
        return per_sample(function, info, in_dims, (x, *params, config)), 0
    x, channel_dim = batch_dim_first(x, in_dims[0], config.channel_dim, info.batch_size)
    return function.apply(x, *params, config._replace(channel_dim=channel_dim)), 0
