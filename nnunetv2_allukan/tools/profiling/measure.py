"""How it is measured: one network at one size.

Parameters, FLOPs of one forward+backward, bytes autograd saves for backward (real or, when the network cannot
run, counted on fake tensors), peak CUDA memory and the median training-step time (eager and compiled), within
a memory and a time budget (``DoesNotFit`` when they say no).
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from ...memory import saved_tensor_bytes
from .configs import NetworkConfig
from .variants import Variant, build_network


class DoesNotFit(Exception):
    """The network cannot be measured at this size (memory or time budget); the message says why."""


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


def random_targets(outputs, num_classes: int):
    return [torch.randint(0, num_classes, (o.shape[0], *o.shape[2:]), device=o.device) for o in outputs]


def deep_supervision_loss(outputs, targets):
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
                loss = deep_supervision_loss(outputs, random_targets(_outputs_list(outputs), cfg.num_classes))
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
            loss = deep_supervision_loss(self.model(self.x), self.targets)
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
            targets.extend(random_targets(_outputs_list(outputs), cfg.num_classes))
            return deep_supervision_loss(outputs, targets)

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
            m.note = _join(m.note, f"compiled: {error_note(error)}")
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


def error_note(error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return _join(type(error).__name__, first_line).replace("; ", ": ", 1)


def _join(*parts) -> str:
    return "; ".join(p for p in parts if p)


# The Measurement fields compared as ratios to a reference network at the same size.
RATIO_FIELDS = ("params", "flops", "saved_bytes", "peak_cuda_bytes", "eager_s", "compiled_s")
