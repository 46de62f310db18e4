"""Host-device synchronisations in one ALL U-KAN training step on CUDA (issue 22): the step as the profiler runs it
(fp16 autocast, GradScaler, nnU-Net's SGD) under ``torch.cuda.set_sync_debug_mode("warn")``, which warns at every
synchronising call; the warnings are counted and listed by where they came from. GradScaler's own ``step`` reads
one value (the inf check) per step, as in the CNN's step: both networks are counted.

    python benchmarks/gpu_syncs.py --json syncs.json      # on a GPU; on the CPU it reports that it cannot count
"""
from __future__ import annotations

import argparse
import collections
import json
import warnings

import torch

from nnunetv2_allukan.tools.profiling import measure, variants
from nnunetv2_allukan.tools.profiling.configs import synthetic_plans


def count_syncs(key: str, device: str, patch=(128, 128), batch: int = 2) -> dict:
    cfg = synthetic_plans(len(patch), list(patch), batch)
    network = variants.build_network(variants.VARIANT_BY_KEY[key], cfg)
    x = torch.randn(batch, cfg.input_channels, *patch, device=device)
    targets = measure.random_targets(measure._outputs_list(network.to(device)(x)), cfg.num_classes)
    trainer = measure._Trainer(network, x, targets, measure.Options(device=device, amp=True), compiled=False)
    trainer.step()  # warm-up: caches (the spline tables' piece matrices, cuDNN plans) fill here
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"network": key, "syncs": sum(where.values()), "where": dict(where.most_common(20))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not (args.device.startswith("cuda") and torch.cuda.is_available()):
        result = {"error": "synchronisations can only be counted on a CUDA device"}
    else:
        result = {"rows": [count_syncs(key, args.device) for key in ("cnn", "free")]}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
