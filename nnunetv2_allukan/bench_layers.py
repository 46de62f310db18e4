"""Compatibility path: ``python -m nnunetv2_allukan.bench_layers`` (documented in the README) runs the layer
benchmark, which lives in the tools wing as ``nnunetv2_allukan.tools.bench_layers``.

The one module of the package root that reaches into the tools, and only when run as a script (importing it
loads nothing); the import-layout test allows exactly this.
"""
if __name__ == "__main__":
    import runpy

    runpy.run_module("nnunetv2_allukan.tools.bench_layers", run_name="__main__", alter_sys=True)
