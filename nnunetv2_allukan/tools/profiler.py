"""``nnunetv2-allukan profile``: ALL U-KAN against its comparators on the same nnU-Net plans, patch and batch.

For each network (nnU-Net's PlainConvUNet, AllUKAN in its gradient modes and memory alternatives, UKAN,
StackedKAN) it reports parameters, FLOPs of one forward+backward (``torch.utils.flop_counter``: matmuls and
convolutions only, elementwise spline work is not counted), the bytes autograd saves for backward (unique
storages, parameters excluded, fp32, no autocast, so device-independent), the peak CUDA allocator memory of a
training step (CUDA only), and the median time of a training step (forward, deep-supervision cross-entropy,
backward, SGD step), eager and, with ``--compile``, compiled. Ratios are to PlainConvUNet and to StackedKAN at
the same size.

Inputs: a dataset's plans (``-d D -c 2d|3d_fullres [-p PLANS]``, read from
``$nnUNet_preprocessed/<dataset>/<plans>.json``) or a synthetic configuration (``--dim 2|3 --patch ...``), whose
stages, strides and kernels come from nnU-Net's ``get_pool_and_conv_props`` and whose widths and block counts
follow nnU-Net 2.8's default planner (see ``synthetic_plans``).

A network that does not fit (its estimated need exceeds ``--max-memory-gb``, or the allocator runs out) or whose
step exceeds ``--max-seconds`` is retried at half the batch, then half the patch, down to the smallest patch the
plans allow; the table says where it stopped. Its saved bytes at the requested size are still reported, as an
estimate from a run on fake tensors (no memory is allocated), marked with ``~``. Every network that ran at a
smaller size is compared there against all others, in a second table.

Rows (``--rows``):
  cnn         PlainConvUNet, nnU-Net's CNN (the plans' own dynamic-network-architectures class, if any)
  free        AllUKAN, Grad-Free Spline (the paper's); the basis is recomputed in backward
  exact       AllUKAN, exact spline gradient; the basis is recomputed in backward
  dense       AllUKAN, exact gradient by plain autograd through the dense B-spline basis (no recompute)
  dense-ckpt  ``dense`` with torch.utils.checkpoint around every encoder and decoder stage
  exact-ckpt  ``exact`` with torch.utils.checkpoint around every encoder and decoder stage
  free-unfused  ``free`` with phi and the conv as two autograd ops (``fuse_activation = False``): phi(x) is kept
              for the conv's weight gradient, one more activation-sized tensor per KA layer than the fused
              layers (``free``), which recompute phi(x) in backward
  ukan        UKAN (partial KA: CNN stages, per-edge KANLinear in the tokenised stages)
  stacked     StackedKAN (per-edge KAN everywhere, the "directly deeply stacked KAN")
"""
from __future__ import annotations

import argparse
import csv
import gc
import inspect
import json
import os
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from ..activation import SharedSplineActivation
from ..memory import saved_tensor_bytes
from ..spline import bspline_basis

PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
ALLUKAN = "nnunetv2_allukan.architectures.AllUKAN"
UKAN = "nnunetv2_allukan.architectures.comparators.UKAN"
STACKED_KAN = "nnunetv2_allukan.architectures.comparators.StackedKAN"
REQ_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")


class ProfileError(Exception):
    """A mistake in what the user asked for: reported in one line, without a traceback."""


class DoesNotFit(Exception):
    """The network cannot be measured at this size (memory or time budget); the message says why."""


# ----------------------------------------------------------------------------------------------------------------
# What is profiled


@dataclass
class Variant:
    key: str
    name: str
    network: str          # dotted class name
    description: str
    overrides: dict = field(default_factory=dict)   # constructor keywords on top of the plans
    dense_basis: bool = False
    checkpoint_stages: bool = False
    unfused: bool = False


VARIANTS = [
    Variant("cnn", "PlainConvUNet", PLAIN_CONV_UNET, "nnU-Net's CNN (stock nnUNetTrainer)"),
    Variant("free", "AllUKAN free", ALLUKAN, "Grad-Free Spline, basis recomputed in backward",
            {"spline_grad": "free"}),
    Variant("exact", "AllUKAN exact", ALLUKAN, "exact spline gradient, basis recomputed in backward",
            {"spline_grad": "exact"}),
    Variant("dense", "AllUKAN dense basis", ALLUKAN, "exact gradient, plain autograd through the dense basis",
            {"spline_grad": "exact"}, dense_basis=True),
    Variant("dense-ckpt", "AllUKAN dense + checkpoint", ALLUKAN,
            "dense basis, torch.utils.checkpoint per stage", {"spline_grad": "exact"}, dense_basis=True,
            checkpoint_stages=True),
    Variant("exact-ckpt", "AllUKAN exact + checkpoint", ALLUKAN,
            "exact (recompute), torch.utils.checkpoint per stage", {"spline_grad": "exact"},
            checkpoint_stages=True),
    Variant("free-unfused", "AllUKAN free, unfused", ALLUKAN,
            "Grad-Free, phi(x) and the conv as two autograd ops (phi(x) kept)", {"spline_grad": "free"},
            unfused=True),
    Variant("ukan", "UKAN", UKAN, "partial KA: CNN stages, per-edge KANLinear in tokenised stages"),
    Variant("stacked", "StackedKAN", STACKED_KAN, "per-edge KAN everywhere (directly stacked KAN)"),
]
VARIANT_BY_KEY = {v.key: v for v in VARIANTS}
DEFAULT_ROWS = [v.key for v in VARIANTS]


@dataclass
class NetworkConfig:
    """One plans configuration plus the input size to profile it at."""

    source: str                 # human-readable origin (plans file or "synthetic ...")
    dim: int
    network_class_name: str     # what the plans train (the CNN row uses it if it is a d-n-a class)
    arch_kwargs: dict           # plans' arch_kwargs, ops as dotted strings
    req_import: tuple
    input_channels: int
    num_classes: int
    patch: tuple
    batch: int

    @property
    def strides(self) -> list:
        return [list(s) if isinstance(s, (list, tuple)) else [s] * self.dim
                for s in self.arch_kwargs["strides"]]

    def cumulative_stride(self) -> list:
        total = [1] * self.dim
        for s in self.strides:
            total = [t * v for t, v in zip(total, s)]
        return total


# ----------------------------------------------------------------------------------------------------------------
# Configurations


def synthetic_plans(dim: int, patch, batch: int, input_channels: int = 1, num_classes: int = 3,
                    spacing=None, base_features: int = 32, max_features: int | None = None) -> NetworkConfig:
    """A configuration as nnU-Net 2.8's default ExperimentPlanner would write it for this patch and spacing.

    Stages, strides, conv kernels and the padded patch come from nnU-Net's own ``get_pool_and_conv_props`` (min
    bottleneck edge 4). Widths and block counts are the planner's defaults, which it sets in ``__init__`` (so they
    cannot be read without a dataset): 32 base features doubled per stage up to 512 (2D) / 320 (3D), two convs
    per encoder and decoder stage, instance norm, LeakyReLU. ``base_features``/``max_features`` override the widths
    (for small test networks).
    """
    from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op, get_matching_instancenorm
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    if dim not in (2, 3):
        raise ProfileError(f"--dim must be 2 or 3, got {dim}")
    patch = _expand(patch, dim, "--patch")
    spacing = _expand(spacing or [1.0], dim, "--spacing")
    if batch < 1 or min(patch) < 1:
        raise ProfileError(f"--batch and --patch must be positive, got batch {batch}, patch {patch}")
    _, strides, kernels, planned_patch, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    n_stages = len(strides)
    conv_op = convert_dim_to_conv_op(dim)
    norm = get_matching_instancenorm(conv_op)
    if max_features is None:
        max_features = 512 if dim == 2 else 320
    if base_features < 1 or max_features < 1:
        raise ProfileError(f"--base-features and --max-features must be positive, got {base_features}, "
                           f"{max_features}")
    arch = {
        "n_stages": n_stages,
        "features_per_stage": [min(max_features, base_features * 2 ** s) for s in range(n_stages)],
        "conv_op": f"{conv_op.__module__}.{conv_op.__name__}",
        "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides],
        "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": f"{norm.__module__}.{norm.__name__}",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    planned_patch = tuple(int(p) for p in planned_patch)
    source = f"synthetic {dim}D plans (nnU-Net planner rules), spacing {list(spacing)}"
    if planned_patch != tuple(patch):
        source += f"; patch {list(patch)} padded to {list(planned_patch)} by nnU-Net's planner"
    return NetworkConfig(source, dim, PLAIN_CONV_UNET, arch, REQ_IMPORT, input_channels, num_classes,
                         planned_patch, batch)


def plans_config(dataset: str, configuration: str, plans_identifier: str = "nnUNetPlans", patch=None,
                 batch: int | None = None) -> NetworkConfig:
    """The configuration nnU-Net planned for a dataset in ``$nnUNet_preprocessed``."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed or not os.path.isdir(preprocessed):
        raise ProfileError("nnUNet_preprocessed is not set or not a folder: export it as for any nnU-Net command, "
                           "or profile a synthetic configuration with --dim/--patch")
    name = _dataset_folder(preprocessed, dataset)
    plans_file = os.path.join(preprocessed, name, plans_identifier + ".json")
    dataset_file = os.path.join(preprocessed, name, "dataset.json")
    for path in (plans_file, dataset_file):
        if not os.path.isfile(path):
            raise ProfileError(f"{path} not found; run nnUNetv2_plan_and_preprocess -d {dataset} first, or pass -p "
                               f"with the plans identifier")
    with open(plans_file) as f:
        plans = json.load(f)
    with open(dataset_file) as f:
        dataset_json = json.load(f)
    if configuration not in plans.get("configurations", {}):
        raise ProfileError(f"configuration {configuration!r} is not in {plans_file}; available: "
                           f"{', '.join(plans.get('configurations', {}))}")
    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    dim = len(cm.patch_size)
    cfg = NetworkConfig(
        source=f"{plans_file} [{configuration}]", dim=dim, network_class_name=cm.network_arch_class_name,
        arch_kwargs=dict(cm.network_arch_init_kwargs), req_import=tuple(cm.network_arch_init_kwargs_req_import),
        input_channels=determine_num_input_channels(plans_manager, cm, dataset_json),
        num_classes=plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        patch=tuple(int(p) for p in cm.patch_size), batch=int(cm.batch_size))
    if patch is not None:
        cfg.patch = tuple(_expand(patch, dim, "--patch"))
    if batch is not None:
        cfg.batch = batch
    bad = [p for p, c in zip(cfg.patch, cfg.cumulative_stride()) if p % c]
    if bad:
        raise ProfileError(f"patch {list(cfg.patch)} is not divisible by the network's total stride "
                           f"{cfg.cumulative_stride()}")
    return cfg


def _dataset_folder(preprocessed: str, dataset: str) -> str:
    if os.path.isdir(os.path.join(preprocessed, dataset)):
        return dataset
    if dataset.isdigit():
        prefix = f"Dataset{int(dataset):03d}_"
        matches = sorted(d for d in os.listdir(preprocessed) if d.startswith(prefix))
        if len(matches) == 1:
            return matches[0]
    raise ProfileError(f"dataset {dataset!r} was not found in nnUNet_preprocessed={preprocessed}; check the id or "
                       f"run nnUNetv2_plan_and_preprocess first")


def _expand(values, dim: int, name: str) -> list:
    values = list(values)
    if len(values) == 1:
        values = values * dim
    if len(values) != dim:
        raise ProfileError(f"{name} needs 1 or {dim} values, got {values}")
    return values


# ----------------------------------------------------------------------------------------------------------------
# Building the networks


def build_network(variant: Variant, cfg: NetworkConfig, ka_kwargs: dict | None = None) -> nn.Module:
    """The variant's network from the configuration, with deep supervision on (as nnU-Net trains)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2_allukan.trainers.nnUNetTrainerAllUKAN import allukan_arch_kwargs, nnUNetTrainerAllUKAN

    class_name = variant.network
    if variant.key == "cnn":
        # The CNN the plans train, unless they name one of ours (e.g. a 2d_allukan configuration).
        if cfg.network_class_name.startswith("dynamic_network_architectures."):
            class_name = cfg.network_class_name
        kwargs = dict(cfg.arch_kwargs)
    else:
        kwargs = allukan_arch_kwargs(cfg.arch_kwargs, {**nnUNetTrainerAllUKAN.ka_kwargs, **(ka_kwargs or {}),
                                                       **variant.overrides})
    network_class = _locate_class(class_name)
    kwargs = _accepted_kwargs(network_class, kwargs)
    network = get_network_from_plans(class_name, kwargs, [k for k in cfg.req_import if k in kwargs],
                                     cfg.input_channels, cfg.num_classes, allow_init=True, deep_supervision=True)
    if variant.dense_basis:
        use_dense_basis(network)
    if variant.checkpoint_stages:
        checkpoint_every_stage(network)
    if variant.unfused:
        unfuse_ka_layers(network)
    return network


def _locate_class(class_name: str):
    import pydoc
    located = pydoc.locate(class_name)
    if located is None:
        raise ProfileError(f"network class {class_name} cannot be imported")
    return located


def _accepted_kwargs(network_class, kwargs: dict) -> dict:
    """Drop the plans keywords a class does not take (e.g. AllUKAN's spline keywords for the CNN)."""
    parameters = inspect.signature(network_class.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in parameters}


def _dense_basis_forward(self: SharedSplineActivation, x: torch.Tensor) -> torch.Tensor:
    """phi(x) through the dense (..., nb) basis and plain autograd: saves the basis and its intermediates."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        basis = bspline_basis(x32, self.grid_size, self.grid_range)
        coef = self.coef.to(x32.dtype)
        base_weight = self.base_weight.to(x32.dtype)
        if self.share == "layer":
            out = base_weight[0] * F.silu(x32) + basis @ coef[0]
        else:
            channel_dim = self.channel_dim % x.dim()
            shape = [1] * x.dim()
            shape[channel_dim] = -1
            out = base_weight.reshape(shape) * F.silu(x32) + (basis * coef.reshape(*shape, coef.shape[1])).sum(-1)
        return out.to(x.dtype)


def use_dense_basis(network: nn.Module) -> int:
    """Make every shared spline activation differentiate through the dense basis; returns how many changed."""
    unfuse_ka_layers(network)  # the fused layers would not call the activation's (patched) forward
    changed = 0
    for module in network.modules():
        if isinstance(module, SharedSplineActivation):
            module.forward = types.MethodType(_dense_basis_forward, module)
            changed += 1
    return changed


class CheckpointedStage(nn.Module):
    """Runs a stage under torch.utils.checkpoint: only its input is kept, the rest is recomputed in backward."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.stage, x, use_reentrant=False)
        return self.stage(x)


def checkpoint_every_stage(network: nn.Module) -> int:
    """Wrap each ``encoder.stages[i]`` and ``decoder.stages[i]``; returns how many were wrapped."""
    wrapped = 0
    for stages in (network.encoder.stages, network.decoder.stages):
        for i in range(len(stages)):
            stages[i] = CheckpointedStage(stages[i])
            wrapped += 1
    return wrapped


def unfuse_ka_layers(network: nn.Module) -> int:
    """Run phi and the linear map of every KA layer as two autograd ops; returns how many layers changed."""
    from ..layers import KAModule

    changed = 0
    for module in network.modules():
        if isinstance(module, KAModule):
            module.fuse_activation = False
            changed += 1
    return changed


# ----------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Options:
    device: str = "cpu"
    repeats: int = 3
    compile: bool = False
    time_steps: bool = True
    max_seconds: float = 120.0
    max_memory_bytes: float = 8 * 2 ** 30
    amp: bool = True          # fp16 autocast for the CUDA timing/peak, as nnU-Net trains
    fallback: bool = True
    ka_kwargs: dict = field(default_factory=dict)
    log: Callable[[str], None] = print


@dataclass
class Measurement:
    key: str
    name: str
    description: str
    patch: list
    batch: int
    status: str = "ok"                    # ok | did not fit | error
    params: int | None = None
    flops: float | None = None            # one forward + backward
    saved_bytes: float | None = None
    saved_is_estimate: bool = False       # fake-tensor count: the network did not run at this size
    peak_cuda_bytes: float | None = None
    peak_cuda_compiled_bytes: float | None = None
    eager_s: float | None = None
    compiled_s: float | None = None
    compile_s: float | None = None        # first compiled step, including compilation
    note: str = ""
    stopped: list = field(default_factory=list)   # [(size, reason)] of the sizes tried before this one

    @property
    def size(self) -> str:
        return size_label(self.patch, self.batch)


def size_label(patch, batch) -> str:
    return f"{'x'.join(str(p) for p in patch)} b{batch}"


def _random_targets(outputs, num_classes: int):
    return [torch.randint(0, num_classes, (o.shape[0], *o.shape[2:]), device=o.device) for o in outputs]


def _loss(outputs, targets):
    """nnU-Net-style deep-supervision cross-entropy: weights 1/2^i, the lowest resolution dropped, normalised."""
    outputs = _outputs_list(outputs)
    weights = [1 / 2 ** i for i in range(len(outputs))]
    if len(weights) > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return sum(w / total * F.cross_entropy(o.float(), t) for w, o, t in zip(weights, outputs, targets) if w)


def _inputs(cfg: NetworkConfig, patch, batch, device):
    return torch.randn(batch, cfg.input_channels, *patch, device=device)


def _outputs_list(outputs) -> list:
    return outputs if isinstance(outputs, (list, tuple)) else [outputs]


def count_on_fake_tensors(variant: Variant, cfg: NetworkConfig, patch, batch, ka_kwargs=None):
    """(parameters, fwd+bwd FLOPs, saved bytes) without allocating memory, on fake tensors.

    Saved tensors are de-duplicated by their base tensor (fake tensors have no storage addresses); parameters are
    excluded, as in ``memory.saved_tensor_bytes``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        network = build_network(variant, cfg, ka_kwargs)
        params = sum(p.numel() for p in network.parameters())
        excluded = {id(p) for p in network.parameters()}
        x = _inputs(cfg, patch, batch, "cpu")
        saved: dict[int, int] = {}
        keep_alive = []

        def pack(t):
            base = t if t._base is None else t._base
            if id(base) not in excluded and id(base) not in saved:
                keep_alive.append(base)
                saved[id(base)] = base.untyped_storage().nbytes()
            return t

        with FlopCounterMode(display=False) as flop_counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                outputs = network(x)
                loss = _loss(outputs, _random_targets(_outputs_list(outputs),
                                                      cfg.num_classes))
            loss.backward()
        return params, float(flop_counter.get_total_flops()), float(sum(saved.values()))


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate" in text
                                                or "cannot allocate" in text)


def _synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free_memory(device: str):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class _Trainer:
    """One network, its SGD optimiser (nnU-Net's settings) and a fixed batch: ``step()`` is one training step."""

    def __init__(self, network: nn.Module, x: torch.Tensor, targets: list, options: Options, compiled: bool):
        self.device = options.device
        self.network = network.to(self.device).train()
        self.model = torch.compile(self.network) if compiled else self.network
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=1e-2, momentum=0.99, nesterov=True,
                                         weight_decay=3e-5)
        self.x, self.targets = x, targets
        self.amp = options.amp and self.device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None

    def step(self) -> float:
        _synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.split(":")[0], enabled=self.amp):
            loss = _loss(self.model(self.x), self.targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        _synchronize(self.device)
        return time.perf_counter() - start

    def timed(self, repeats: int, max_seconds: float, what: str) -> tuple[float, float]:
        """(first step, median of ``repeats`` further steps); DoesNotFit if the first exceeds ``max_seconds``."""
        first = self.step()
        if first > max_seconds:
            raise DoesNotFit(f"{what} step took {first:.0f} s > --max-seconds {max_seconds:g}")
        return first, statistics.median(self.step() for _ in range(max(1, repeats)))

    def peak_cuda_bytes(self) -> float | None:
        if not self.device.startswith("cuda"):
            return None
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        return float(torch.cuda.max_memory_allocated(self.device))


def measure_at(variant: Variant, cfg: NetworkConfig, patch, batch, options: Options,
               counts: tuple | None = None, guard: bool = True) -> Measurement:
    """All numbers for one network at one size; DoesNotFit when the budgets say no.

    ``counts`` (from ``count_on_fake_tensors`` at this size) guard the memory budget; without them they are
    computed here, unless ``guard`` is off (the caller knows the network fits, e.g. it fit at a larger size).
    """
    from torch.utils.flop_counter import FlopCounterMode

    m = Measurement(variant.key, variant.name, variant.description, list(patch), batch)
    if counts is None and guard:
        counts = safe_counts(variant, cfg, patch, batch, options)
    if counts is not None:
        _check_memory_budget(counts[0], counts[2], options)
    network = None
    try:
        torch.manual_seed(0)
        network = build_network(variant, cfg, options.ka_kwargs).to(options.device)
        m.params = sum(p.numel() for p in network.parameters())
        x = _inputs(cfg, patch, batch, options.device)
        targets = []

        def forward_and_loss():
            outputs = network(x)
            targets.extend(_random_targets(_outputs_list(outputs), cfg.num_classes))
            return _loss(outputs, targets)

        with FlopCounterMode(display=False) as flop_counter:
            start = time.perf_counter()
            saved, loss = saved_tensor_bytes(forward_and_loss, exclude=network.parameters())
            forward_s = time.perf_counter() - start
            m.saved_bytes = float(saved)
            # A training step costs about three forwards: do not start one that would blow the time budget.
            if options.time_steps and 3 * forward_s > options.max_seconds:
                raise DoesNotFit(f"forward took {forward_s:.0f} s, a step would exceed --max-seconds "
                                 f"{options.max_seconds:g}")
            loss.backward()
        del loss
        m.flops = float(flop_counter.get_total_flops())
        if options.time_steps:
            trainer = _Trainer(network, x, targets, options, compiled=False)
            _, m.eager_s = trainer.timed(options.repeats, options.max_seconds, "eager")
            m.peak_cuda_bytes = trainer.peak_cuda_bytes()
            del trainer
        if options.time_steps and options.compile:
            _measure_compiled(variant, cfg, x, targets, options, m)
    except DoesNotFit:
        raise
    except Exception as error:  # noqa: BLE001 - any failure becomes a table entry, not a crash
        if _is_out_of_memory(error):
            raise DoesNotFit(f"out of memory ({type(error).__name__})") from None
        raise
    finally:
        del network
        _free_memory(options.device)
    return m


def _measure_compiled(variant, cfg, x, targets, options: Options, m: Measurement):
    """Compiled step time; a compiler failure is recorded in the note, the eager numbers stay."""
    trainer = None
    try:
        torch.manual_seed(0)
        trainer = _Trainer(build_network(variant, cfg, options.ka_kwargs), x, targets, options, compiled=True)
        m.compile_s, m.compiled_s = trainer.timed(options.repeats, options.max_seconds * 5, "compiled")
        m.peak_cuda_compiled_bytes = trainer.peak_cuda_bytes()
    except Exception as error:  # noqa: BLE001
        if _is_out_of_memory(error):
            m.note = _join(m.note, "compiled: out of memory")
        else:
            m.note = _join(m.note, f"compiled: {_error_note(error)}")
    finally:
        del trainer
        _free_memory(options.device)


def safe_counts(variant: Variant, cfg: NetworkConfig, patch, batch, options: Options) -> tuple:
    """``count_on_fake_tensors``, or (None, None, None) if some op has no fake-tensor support."""
    try:
        return count_on_fake_tensors(variant, cfg, patch, batch, options.ka_kwargs)
    except Exception as error:  # noqa: BLE001 - the real run still measures everything but the estimate
        options.log(f"  {variant.name}: no fake-tensor count ({type(error).__name__}: {error}); memory unguarded")
        return None, None, None


def _check_memory_budget(params, estimated_saved, options: Options):
    """DoesNotFit before allocating anything when the estimate says the network cannot fit.

    Need: the activations (with a margin) plus weights, gradients, momentum and one transient copy. On the CPU the
    kernel would kill the process (or a neighbour) instead of raising, so the budget is strict; on CUDA an OOM is
    an exception, so only sizes far beyond the device are skipped.
    """
    if params is None or estimated_saved is None:
        return
    need = 1.3 * estimated_saved + 4 * 4 * params
    if options.device == "cpu" and need > options.max_memory_bytes:
        raise DoesNotFit(f"needs ~{need / 2 ** 30:.1f} GiB > --max-memory-gb "
                         f"{options.max_memory_bytes / 2 ** 30:.1f}")
    if options.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(options.device).total_memory
        if need > 1.5 * total:
            raise DoesNotFit(f"needs ~{need / 2 ** 30:.1f} GiB, the GPU has {total / 2 ** 30:.0f} GiB")


def _error_note(error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return _join(type(error).__name__, first_line).replace("; ", ": ", 1)


def _join(*parts) -> str:
    return "; ".join(p for p in parts if p)


def smaller_sizes(cfg: NetworkConfig, patch, batch):
    """Halve the batch down to 1, then the patch (every axis that stays divisible, bottleneck edge >= 2)."""
    patch, total_stride = list(patch), cfg.cumulative_stride()
    while batch > 1:
        batch //= 2
        yield list(patch), batch
    while True:
        halved = [p // 2 if p % (2 * s) == 0 and p // 2 >= 2 * s else p for p, s in zip(patch, total_stride)]
        if halved == patch:
            return
        patch = halved
        yield list(patch), batch


def profile_variant(variant: Variant, cfg: NetworkConfig, options: Options) -> tuple[Measurement, Measurement]:
    """(numbers at the requested size, numbers where it fit); the same object when it fit at once.

    At the requested size a network that did not fit still gets its parameters, FLOPs and estimated saved bytes.
    """
    patch, batch = list(cfg.patch), cfg.batch
    counts = safe_counts(variant, cfg, patch, batch, options)
    requested = Measurement(variant.key, variant.name, variant.description, patch, batch)
    requested.params, requested.flops = counts[0], counts[1]
    stopped = []
    sizes = [(patch, batch)] + (list(smaller_sizes(cfg, patch, batch)) if options.fallback else [])
    for i, (p, b) in enumerate(sizes):
        options.log(f"  {variant.name:<28} {size_label(p, b):<16} ...")
        try:
            m = measure_at(variant, cfg, p, b, options, counts if i == 0 else None)
        except DoesNotFit as reason:
            options.log(f"  {variant.name:<28} {size_label(p, b):<16} does not fit: {reason}")
            stopped.append((size_label(p, b), str(reason)))
            continue
        except Exception as error:  # noqa: BLE001 - one broken row must not lose the others
            import traceback
            traceback.print_exc()
            requested.status, requested.note = "error", _error_note(error)
            return requested, requested
        m.stopped = stopped
        if i == 0:
            return m, m
        requested.note = f"did not fit ({stopped[0][1]}); measured at {m.size}, see below"
        break
    else:
        if len(stopped) > 1:
            requested.note = f"did not fit down to {stopped[-1][0]} ({stopped[-1][1]})"
        else:
            requested.note = f"did not fit ({stopped[0][1]})" if stopped else "did not fit"
        m = requested
    requested.status = "did not fit"
    requested.saved_bytes, requested.saved_is_estimate = counts[2], counts[2] is not None
    requested.stopped = stopped
    return requested, m


def run_profile(cfg: NetworkConfig, rows, options: Options) -> dict:
    """Measure every row at the configuration's size, and each size some row fell back to, against all rows."""
    variants = [VARIANT_BY_KEY[k] for k in rows]
    options.log(f"profiling {cfg.source}: patch {list(cfg.patch)}, batch {cfg.batch}, device {options.device}, "
                f"{torch.get_num_threads()} threads")
    main_rows, fitted = [], {}
    for variant in variants:
        at_request, where_fit = profile_variant(variant, cfg, options)
        main_rows.append(at_request)
        if where_fit is not at_request and where_fit.status == "ok":
            fitted.setdefault((tuple(where_fit.patch), where_fit.batch), {})[variant.key] = where_fit
    # At each fallback size, measure the other rows too, so that the ratios compare like with like.
    fallback_tables = []
    for (patch, batch), known in fitted.items():
        options.log(f"comparing all networks at {size_label(patch, batch)}")
        table = [known.get(row.key) or _measure_at_fallback_size(variant, row, cfg, list(patch), batch, options)
                 for variant, row in zip(variants, main_rows)]
        fallback_tables.append(table)
    return {
        "source": cfg.source, "dim": cfg.dim, "patch": list(cfg.patch), "batch": cfg.batch,
        "input_channels": cfg.input_channels, "num_classes": cfg.num_classes,
        "arch_kwargs": cfg.arch_kwargs, "device": options.device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "device_name": torch.cuda.get_device_name(options.device) if options.device.startswith("cuda") else "CPU",
        "rows": [_with_ratios(m, main_rows) for m in main_rows],
        "fallback": [[_with_ratios(m, t) for m in t] for t in fallback_tables],
    }


def _measure_at_fallback_size(variant: Variant, row: Measurement, cfg: NetworkConfig, patch, batch,
                              options: Options) -> Measurement:
    label = size_label(patch, batch)
    tried = dict(row.stopped)
    if label in tried:  # it already failed here while falling back itself
        return Measurement(variant.key, variant.name, variant.description, patch, batch, status="did not fit",
                           note=tried[label])
    try:
        # Smaller than a size it fit at: no memory estimate needed.
        return measure_at(variant, cfg, patch, batch, options, guard=row.status != "ok")
    except DoesNotFit as reason:
        return Measurement(variant.key, variant.name, variant.description, patch, batch, status="did not fit",
                           note=str(reason))
    except Exception as error:  # noqa: BLE001
        return Measurement(variant.key, variant.name, variant.description, patch, batch, status="error",
                           note=_error_note(error))


RATIO_FIELDS = ("params", "flops", "saved_bytes", "peak_cuda_bytes", "eager_s", "compiled_s")


def _with_ratios(m: Measurement, table: list) -> dict:
    row = asdict(m)
    row["size"] = m.size
    by_key = {r.key: r for r in table}
    for reference in ("cnn", "stacked"):
        ref = by_key.get(reference)
        for name in RATIO_FIELDS:
            mine, theirs = getattr(m, name), (getattr(ref, name) if ref else None)
            row[f"{name}_vs_{reference}"] = mine / theirs if mine is not None and theirs else None
        row[f"saved_bytes_vs_{reference}_is_estimate"] = m.saved_is_estimate or bool(ref and ref.saved_is_estimate)
    return row


# ----------------------------------------------------------------------------------------------------------------
# Reporting

COLUMNS = [
    # (header, row -> text); "/CNN" and "/Stacked" are ratios to PlainConvUNet and StackedKAN at the same size.
    ("network", lambda r: r["name"]),
    ("size", lambda r: r["size"]),
    ("params", lambda r: _human(r["params"])),
    ("params /CNN", lambda r: _ratio(r["params_vs_cnn"])),
    ("params /Stacked", lambda r: _ratio(r["params_vs_stacked"])),
    ("GFLOP f+b", lambda r: "n/a" if r["flops"] is None else f"{r['flops'] / 1e9:.2f}"),
    ("saved MiB", lambda r: _mib(r["saved_bytes"], r["saved_is_estimate"])),
    ("saved /CNN", lambda r: _ratio(r["saved_bytes_vs_cnn"], r["saved_bytes_vs_cnn_is_estimate"])),
    ("saved /Stacked", lambda r: _ratio(r["saved_bytes_vs_stacked"], r["saved_bytes_vs_stacked_is_estimate"])),
    ("peak CUDA MiB", lambda r: _mib(r["peak_cuda_bytes"])),
    ("eager s", lambda r: _seconds(r["eager_s"])),
    ("eager /CNN", lambda r: _ratio(r["eager_s_vs_cnn"])),
    ("eager /Stacked", lambda r: _ratio(r["eager_s_vs_stacked"])),
    ("compiled s", lambda r: _seconds(r["compiled_s"])),
    ("compiled /CNN", lambda r: _ratio(r["compiled_s_vs_cnn"])),
    ("note", lambda r: r["note"] or ("" if r["status"] == "ok" else r["status"])),
]


def _human(n) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _mib(n, estimate: bool = False) -> str:
    if n is None:
        return "n/a"
    return f"{'~' if estimate else ''}{n / 2 ** 20:.1f}"


def _ratio(value, estimate: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{value:#.4g}" if value < 10 else f"{value:.1f}"
    return ("~" if estimate else "") + text


def _seconds(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _table_cells(rows):
    return [[text(r) for _, text in COLUMNS] for r in rows]


def terminal_table(rows) -> str:
    headers = [h for h, _ in COLUMNS]
    cells = _table_cells(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.ljust(w) if i in (0, 1, len(values) - 1) else v.rjust(w)
                                    for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def markdown_table(rows) -> str:
    headers = [h for h, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in _table_cells(rows)]
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    parts = [f"# Profile: {result['source']}", "",
             f"patch {result['patch']}, batch {result['batch']}, {result['input_channels']} input channel(s), "
             f"{result['num_classes']} classes; device {result['device_name']} ({result['threads']} threads), torch "
             f"{result['torch']}, {result['date']}.", "",
             "Saved MiB: bytes autograd keeps for backward (unique storages, parameters excluded, fp32). "
             "`~`: estimated on fake tensors because the network did not fit at this size. GFLOP: matmul and "
             "convolution FLOPs of one forward+backward (torch.utils.flop_counter). Times: median training step "
             "(forward, deep-supervision cross-entropy, backward, SGD step).", "",
             markdown_table(result["rows"])]
    for table in result["fallback"]:
        parts += ["", f"## All networks at {table[0]['size']} (where a network that did not fit above was measured)",
                  "", markdown_table(table)]
    return "\n".join(parts) + "\n"


CSV_FIELDS = ["table", "key", "name", "size", "status", "params", "flops", "saved_bytes", "saved_is_estimate",
              "peak_cuda_bytes", "peak_cuda_compiled_bytes", "eager_s", "compiled_s", "compile_s"] + \
             [f"{f}_vs_{s}" for s in ("cnn", "stacked") for f in RATIO_FIELDS] + ["note"]


def write_csv(result: dict, path: str):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({**row, "table": "requested"})
        for table in result["fallback"]:
            for row in table:
                writer.writerow({**row, "table": f"at {row['size']}"})


CHART_METRICS = [("params", "parameters"), ("saved_bytes", "saved activation bytes"),
                 ("eager_s", "eager step time"), ("compiled_s", "compiled step time")]


def write_chart(result: dict, path: str):
    """Bars per network: ratio to PlainConvUNet (log scale) for params, saved bytes and step times.

    Without a PlainConvUNet row the bars show the absolute values instead.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    has_cnn = any(r["key"] == "cnn" and r["status"] == "ok" for r in result["rows"]) and len(result["rows"]) > 1
    rows = [r for r in result["rows"] if r["key"] != "cnn"] if has_cnn else result["rows"]
    suffix = "_vs_cnn" if has_cnn else ""
    metrics = [(key + suffix, label) for key, label in CHART_METRICS if any(r[key + suffix] for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.2 * max(1, len(metrics)), 0.45 * len(rows) + 1.8),
                             sharey=True, squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        values = [r[key] or 0.0 for r in rows]
        bars = ax.barh(range(len(rows)), [v if v > 0 else float("nan") for v in values], color="tab:blue")
        for bar, row in zip(bars, rows):
            if key.startswith("saved_bytes") and row["saved_is_estimate"]:
                bar.set_hatch("//")
        if has_cnn:
            ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{label}\n({'x PlainConvUNet' if has_cnn else 'absolute'})", fontsize=9)
        for i, v in enumerate(values):
            ax.text(v if v > 0 else 1.0, i, f" {v:.2g}" if v > 0 else " n/a", va="center", fontsize=7)
    axes[0][0].set_yticks(range(len(rows)))
    axes[0][0].set_yticklabels([r["name"] for r in rows], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{result['dim']}D, patch {'x'.join(map(str, result['patch']))}, batch {result['batch']} "
                 f"({result['device_name']}); hatched = estimated", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"profile.{ext}") for ext in ("md", "csv", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(markdown_report(result))
    write_csv(result, paths["csv"])
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    write_chart(result, paths["png"])
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2-allukan profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    plans = parser.add_argument_group("from a dataset's plans")
    plans.add_argument("-d", dest="dataset", help="dataset id or name in $nnUNet_preprocessed")
    plans.add_argument("-c", dest="configuration", help="configuration, e.g. 2d or 3d_fullres")
    plans.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    synthetic = parser.add_argument_group("synthetic configuration (nnU-Net planner rules)")
    synthetic.add_argument("--dim", type=int, choices=[2, 3])
    synthetic.add_argument("--spacing", type=float, nargs="+", help="voxel spacing (default 1 per axis)")
    synthetic.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    synthetic.add_argument("--classes", type=int, default=3, help="output channels (default 3)")
    synthetic.add_argument("--base-features", type=int, default=32, help="first stage width (nnU-Net: 32)")
    synthetic.add_argument("--max-features", type=int, help="width cap (nnU-Net: 512 in 2D, 320 in 3D)")
    parser.add_argument("--patch", type=int, nargs="+", help="patch size (synthetic: required; plans: override)")
    parser.add_argument("--batch", type=int, help="batch size (default: the plans', or 2)")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"comma-separated rows (default all): {', '.join(DEFAULT_ROWS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per network (median; default 3)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    parser.add_argument("--no-time", dest="time_steps", action="store_false",
                        help="only parameters, FLOPs and saved bytes (no training steps)")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no fp16 autocast on CUDA")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="a step slower than this counts as not fitting (default 120)")
    parser.add_argument("--max-memory-gb", type=float,
                        help="CPU memory a network may need (default: half of the available memory)")
    parser.add_argument("--no-fallback", dest="fallback", action="store_false",
                        help="do not retry a network that does not fit at a smaller batch/patch")
    parser.add_argument("--out", default="allukan_profile", help="output folder (default ./allukan_profile)")
    return parser


def _available_memory_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2 ** 30


def config_from_args(args) -> NetworkConfig:
    if args.dataset is not None or args.configuration is not None:
        if args.dataset is None or args.configuration is None:
            raise ProfileError("plans input needs both -d DATASET and -c CONFIGURATION")
        if args.dim is not None:
            raise ProfileError("give either -d/-c (a dataset's plans) or --dim/--patch (synthetic), not both")
        return plans_config(args.dataset, args.configuration, args.plans, args.patch, args.batch)
    if args.dim is None or args.patch is None:
        raise ProfileError("give -d DATASET -c CONFIGURATION, or a synthetic configuration with --dim and --patch")
    return synthetic_plans(args.dim, args.patch, 2 if args.batch is None else args.batch, args.channels,
                           args.classes, args.spacing, args.base_features, args.max_features)


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in VARIANT_BY_KEY]
        if unknown or not rows:
            raise ProfileError(f"unknown rows {unknown}; choose from {', '.join(DEFAULT_ROWS)}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ProfileError("--device cuda, but CUDA is not available")
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = config_from_args(args)
        budget = args.max_memory_gb * 2 ** 30 if args.max_memory_gb else 0.5 * _available_memory_bytes()
        options = Options(device=args.device, repeats=args.repeats, compile=args.compile,
                          time_steps=args.time_steps, max_seconds=args.max_seconds, max_memory_bytes=budget,
                          amp=args.amp, fallback=args.fallback, log=lambda s: print(s, flush=True))
        result = run_profile(cfg, rows, options)
    except ProfileError as e:
        print(f"nnunetv2-allukan profile: error: {e}", file=sys.stderr)
        return 2
    print()
    print(terminal_table(result["rows"]))
    for table in result["fallback"]:
        print(f"\nAll networks at {table[0]['size']}:")
        print(terminal_table(table))
    paths = write_outputs(result, args.out)
    print(f"\nwrote {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
