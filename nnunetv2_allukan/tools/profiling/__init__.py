"""``nnunetv2-allukan profile`` as a small package, in the order a profile runs:

* what is measured: ``configs`` (the nnU-Net plans configuration: from a dataset's plans or synthesised by
  nnU-Net's planner rules) and ``variants`` (the networks and their gradient and memory modes);
* how it is measured: ``measure`` (one network at one size: parameters, FLOPs, saved bytes, peak memory, step
  times, within memory and time budgets) and ``sweep`` (every network, smaller sizes for those that do not fit,
  ratios at each size);
* how it is reported: ``report`` (terminal and Markdown tables, CSV, JSON, chart);
* ``command``: the argument parser and ``main``.
"""
