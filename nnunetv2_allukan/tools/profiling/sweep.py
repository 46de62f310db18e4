"""How it is measured, over sizes: every requested network, and each size some network fell back to.

A network that does not fit at the requested size is retried at half the batch, then half the patch; every size
a network fell back to is then measured for all networks, so the ratios compare like with like.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import torch

from .configs import NetworkConfig
from .measure import RATIO_FIELDS, DoesNotFit, Measurement, Options, error_note, measure_at, safe_counts, size_label
from .variants import VARIANT_BY_KEY, Variant, named_for_plans


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
            requested.status, requested.note = "error", error_note(error)
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
    variants = [named_for_plans(VARIANT_BY_KEY[k], cfg) for k in rows]
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
                           note=error_note(error))


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
