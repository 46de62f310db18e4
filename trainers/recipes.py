"""Training recipes for the spline activations (issue: accuracy), as mixins for nnU-Net trainers.

nnU-Net's recipe treats every parameter alike: one SGD (lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5),
one poly schedule, and a global gradient-norm clip at 12 in ``train_step``. The spline coefficients and base
weights of a KA layer are different: a handful of numbers whose gradients sum over every voxel of the layer.
The mixins here give them their own treatment without touching nnU-Net's training loop:

* ``SplineParameterGroup``: the activation parameters in their own optimizer group (own optimizer, lr, no weight
  decay), optionally left out of nnU-Net's gradient clip, and optionally frozen for the first epochs (warm-up).

Every learning rate is a function of the epoch (nnU-Net steps schedulers with an explicit epoch and does not
checkpoint them), so ``--c`` resumes with the right rates.
"""
from __future__ import annotations

import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import _LRScheduler

from .clipping import clip_without


class EpochCosineLRScheduler(_LRScheduler):
    """Cosine annealing computed from the epoch number, keeping each parameter group's own base lr.

    nnU-Net steps the scheduler with an explicit epoch and does not checkpoint it, so the lr must be a
    function of the epoch alone (also after ``--c``).
    """

    def __init__(self, optimizer, max_epochs: int, min_lr_fraction: float = 0.01):
        self.max_epochs = max_epochs
        self.min_lr_fraction = min_lr_fraction
        self.base_lrs_by_group = [g["lr"] for g in optimizer.param_groups]
        super().__init__(optimizer, -1)

    def lr_factor(self, epoch: int) -> float:
        progress = min(max(epoch, 0), self.max_epochs) / self.max_epochs
        return self.min_lr_fraction + (1 - self.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = getattr(self, "_ctr", 0)
            self._ctr = current_step + 1
        factor = self.lr_factor(current_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs_by_group):
            group["lr"] = base * factor
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


def split_spline_parameters(network: torch.nn.Module):
    """(spline activation parameters, all other parameters)."""
    spline, other = [], []
    for name, p in network.named_parameters():
        (spline if ".activation." in f".{name}" else other).append(p)
    return spline, other


def spline_optimizer_of(trainer) -> str:
    """How a trainer (class or instance) trains the spline parameters: its ``spline_optimizer``, or 'shared'
    (nnU-Net's one SGD group) for trainers without one, such as nnU-Net's own."""
    return getattr(trainer, "spline_optimizer", "shared")


class CombinedOptimizer(Optimizer):
    """Several torch optimizers stepped as one (e.g. SGD for the convolutions, Adam for the splines).

    ``param_groups`` are the inner optimizers' own group dicts, so nnU-Net's logging, GradScaler.unscale_ and the
    epoch schedulers see (and set) every group; the state dict holds one entry per inner optimizer.
    """

    def __init__(self, optimizers: list[Optimizer]):
        # Optimizer.__init__ would build param groups of its own; the inner optimizers own them.
        self.optimizers = list(optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self):
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self):
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"combined": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict):
        parts = state_dict.get("combined") if isinstance(state_dict, dict) else None
        if parts is None or len(parts) != len(self.optimizers):
            raise ValueError("this checkpoint's optimizer state was not written by the same combined optimizer "
                             f"({len(self.optimizers)} parts); continue with the trainer that wrote it")
        for opt, part in zip(self.optimizers, parts):
            opt.load_state_dict(part)

    def __repr__(self):
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


class EpochPolyLRScheduler(EpochCosineLRScheduler):
    """nnU-Net's poly schedule, (1 - epoch / max_epochs) ** 0.9, applied to each group's own base lr.

    nnU-Net's PolyLRScheduler sets one lr for all groups; a spline group with its own lr needs this one.
    ``frozen_epochs`` maps a group index to a number of epochs during which that group's lr is 0 (warm-up).
    """

    def __init__(self, optimizer, max_epochs: int, exponent: float = 0.9, frozen_epochs: dict | None = None):
        self.exponent = exponent
        self.frozen_epochs = dict(frozen_epochs or {})
        super().__init__(optimizer, max_epochs)

    def lr_factor(self, epoch: int) -> float:
        return (1 - min(max(epoch, 0), self.max_epochs) / self.max_epochs) ** self.exponent

    def step(self, current_step=None):
        super().step(current_step)
        epoch = self._epoch_of(current_step)
        for index, n_frozen in self.frozen_epochs.items():
            if epoch < n_frozen:
                self.optimizer.param_groups[index]["lr"] = 0.0
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _epoch_of(self, current_step):
        return getattr(self, "_ctr", 1) - 1 if current_step is None or current_step == -1 else current_step


class SplineParameterGroup:
    """Mixin: spline coefficients and base weights in their own optimizer group.

    Class attributes (override in a variant): ``spline_optimizer`` ("adam", the default: a separate Adam, as
    DeepSplines trains its spline coefficients; "sgd": a second group of nnU-Net's SGD; "shared": no group of
    their own, nnU-Net's recipe exactly: one SGD group over every parameter, weight decay included, the
    recipe of nnUNetTrainerAllUKAN before 0.2.0), ``spline_lr``,
    ``spline_clip`` (False: the spline parameters are left out of nnU-Net's global gradient-norm clip, so that
    their voxel-summed gradients do not shrink every other update), ``spline_warmup_fraction`` (warm-up: their lr
    is 0 for that fraction of the epochs, then follows the schedule; a fraction, so that budget variants scale).
    In a group of their own they get no weight decay: decay would pull phi towards the base function alone.
    """

    spline_optimizer: str = "adam"
    spline_lr: float = 1e-3
    spline_clip: bool = True
    spline_warmup_fraction: float = 0.0

    def configure_optimizers(self):
        spline, other = split_spline_parameters(self.network)
        sgd = dict(momentum=0.99, nesterov=True)
        if self.spline_optimizer not in ("sgd", "adam", "shared"):
            raise ValueError(f"spline_optimizer={self.spline_optimizer!r}; allowed: 'adam', 'sgd', 'shared'")
        if self.spline_optimizer == "shared" and self.spline_warmup_fraction:
            raise ValueError("spline_warmup_fraction needs the spline parameters in a group of their own "
                             "(spline_optimizer 'adam' or 'sgd'), not 'shared'")
        if not spline or self.spline_optimizer == "shared":
            # nnU-Net's own optimizer and poly schedule (PolyLRScheduler's lr, computed per epoch). Also for
            # networks without learnable activation (fixed phi): an empty Adam would be an error, and an empty
            # group would shift the group indices. The network's own parameter order, as nnU-Net's: optimizer
            # state is matched by position, so checkpoints written by nnU-Net's configure_optimizers continue.
            optimizer = torch.optim.SGD(list(self.network.parameters()), lr=self.initial_lr,
                                        weight_decay=self.weight_decay, **sgd)
            return optimizer, EpochPolyLRScheduler(optimizer, self.num_epochs)
        if self.spline_optimizer == "sgd":
            optimizer = torch.optim.SGD([
                {"params": other, "lr": self.initial_lr, "weight_decay": self.weight_decay},
                {"params": spline, "lr": self.spline_lr, "weight_decay": 0.0}], **sgd)
        elif self.spline_optimizer == "adam":
            optimizer = CombinedOptimizer([
                torch.optim.SGD(other, lr=self.initial_lr, weight_decay=self.weight_decay, **sgd),
                torch.optim.Adam(spline, lr=self.spline_lr, weight_decay=0.0)])
        n_frozen = round(self.spline_warmup_fraction * self.num_epochs)
        frozen = {len(optimizer.param_groups) - 1: n_frozen} if n_frozen else {}
        return optimizer, EpochPolyLRScheduler(optimizer, self.num_epochs, frozen_epochs=frozen)

    def train_step(self, batch: dict) -> dict:
        if self.spline_clip:
            return super().train_step(batch)
        with clip_without(split_spline_parameters(self.network)[0]):
            return super().train_step(batch)


__all__ = ["CombinedOptimizer", "EpochCosineLRScheduler", "EpochPolyLRScheduler", "SplineParameterGroup",
           "clip_without", "spline_optimizer_of", "split_spline_parameters"]
