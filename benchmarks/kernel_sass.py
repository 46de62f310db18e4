"""The Triton spline kernels' machine code, read on the CPU: compile each kernel configuration for sm_90 (and sm_80)
with Triton's own compiler and ptxas (``triton.compile(ASTSource(...), target=GPUTarget(...))``; no GPU needed),
disassemble the cubin with the ``cuobjdump`` that ships in the triton wheel, and report per kernel:

* ``loop_instructions_per_element``: SASS instructions of the main loop (between a backward branch and its target)
  per value each thread handles per trip; for a kernel without a loop (the forward: one tile per program), all its
  instructions per value;
* ``registers`` per thread, ``shared_bytes``, ``spills`` (local-memory bytes and LDL/STL instructions);
* ``loop_barriers``: block barriers (BAR) inside the loop: each is a wait of the whole block, the backward's
  latency problem (DESIGN.md §9).

This is how the kernels are judged until a GPU is lent (docs/gpu_kernels.md); CI runs it as a smoke test.

    python benchmarks/kernel_sass.py                 # table
    python benchmarks/kernel_sass.py --json out.json --arch 90 80
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret (must happen before triton is imported)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nnunetv2_allukan.kernels import triton_spline  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_\w+\)|0x([0-9a-f]+))")
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class KernelReport:
    kernel: str            # "forward" or "backward"
    share: str             # "layer" or "channel"
    layout: str            # "planes" (channels outermost, the NCHW view) or "channels_fastest" (channels_last, Linear)
    dtype: str             # dtype of x and dL/dphi (the math is fp32)
    arch: int
    grid_size: int
    exact: bool
    num_warps: int
    values_per_thread_per_trip: float
    loop_instructions: int
    loop_instructions_per_element: float
    loop_barriers: int
    registers: int
    shared_bytes: int
    spills: int            # local-memory bytes plus LDL/STL instructions
    total_instructions: int


def _tool(name: str) -> str:
    path = os.path.join(TOOLS, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} not found in {TOOLS}: this triton wheel does not ship the CUDA tools")
    return path


def _sass(cubin: bytes, workdir: str) -> tuple[list[tuple[int, str]], dict]:
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    listing = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                           check=True).stdout
    instructions = []
    for line in listing.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            instructions.append((int(m.group(1), 16), m.group(2)))
    r = _RESOURCES.search(usage)
    resources = dict(zip(("registers", "stack", "shared", "local"), map(int, r.groups()))) if r else {}
    return instructions, resources


def main_loop(instructions: list[tuple[int, str]]) -> list[str] | None:
    """The instructions of the largest loop: from a backward branch's target to the branch; None if no loop."""
    best = None
    for address, text in instructions:
        m = _BRANCH.search(text)
        if m and m.group(1) is not None:
            target = int(m.group(1), 16)
            if target < address:
                body = [t for a, t in instructions if target <= a <= address]
                if best is None or len(body) > len(best):
                    best = body
    return best


def _signature(kernel) -> dict:
    """Argument name -> type for ASTSource: pointers filled in by the caller, constexprs as such, the rest i32."""
    sig = {}
    for param in kernel.params:
        if param.is_constexpr:
            sig[param.name] = "constexpr"
        else:
            sig[param.name] = None if param.name.endswith("_ptr") else "i32"
    return sig


def compile_report(kernel_name: str, share: str, dtype: str, arch: int, grid_size: int = 5, exact: bool = False,
                   workdir: str = "/tmp", layout: str = "planes") -> KernelReport:
    """Compile one configuration of ``_phi_kernel`` ("forward") or the backward (``_grad_kernel_rows`` for
    ``layout="planes"``, ``_grad_kernel_channels`` for per-channel splines with ``layout="channels_fastest"``) as
    the launchers in ``triton_spline`` would, and read its machine code."""
    per_channel = share != "layer"
    if layout not in ("planes", "channels_fastest"):
        raise ValueError(f"layout={layout!r}; allowed: 'planes', 'channels_fastest'")
    if layout == "channels_fastest" and (kernel_name != "backward" or not per_channel):
        raise ValueError("the channels-fastest kernel is the backward of per-channel splines (share='channel'); "
                         "share='layer' reads every layout as planes, and the forward's flat per-channel path "
                         "(channels_last, Linear) is not read here")
    data = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[dtype]
    if kernel_name == "forward":
        kernel = triton_spline._phi_kernel
        pointer_types = {"x_ptr": data, "table_ptr": "*fp32", "wb_ptr": "*fp32", "params_ptr": "*fp32",
                         "out_ptr": data}
        constants = {"GRID": grid_size, "BASE": 0, "PER_CHANNEL": per_channel, "PLANES": per_channel,
                     "BLOCK": triton_spline.PHI_BLOCK}
        values_per_trip = triton_spline.PHI_BLOCK
    else:
        pointer_types = {"x_ptr": data, "g_ptr": data, "table_ptr": "*fp32", "wb_ptr": "*fp32",
                         "params_ptr": "*fp32", "gx_ptr": data, "part_coef_ptr": "*fp32", "part_wb_ptr": "*fp32"}
        constants = {"GRID": grid_size, "BASE": 0, "EXACT": exact, "NEED_X": True, "NEED_PARAMS": True,
                     "NBP": triton.next_power_of_2(grid_size + 3)}
        if layout == "planes":
            kernel = triton_spline._grad_kernel_rows
            bm = triton_spline.BACKWARD_TILE
            constants.update(LAYOUT=2 if per_channel else 0, BM=bm)
            values_per_trip = bm
        else:  # as phi_grads launches it for (A, C, 1) views: 32 channels per tile
            kernel = triton_spline._grad_kernel_channels
            bc = 32
            bm = max(1, triton_spline.BACKWARD_TILE // bc)
            constants.update(BM=bm, BC=bc)
            values_per_trip = bm * bc
    signature = _signature(kernel)
    for name in signature:
        if name in pointer_types:
            signature[name] = pointer_types[name]
        elif signature[name] == "constexpr" and name not in constants:
            raise KeyError(f"{kernel.__name__}: no value for constexpr {name}")
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32))
    num_warps = compiled.metadata.num_warps
    instructions, resources = _sass(compiled.asm["cubin"], workdir)
    loop = main_loop(instructions)
    body = loop if loop is not None else [t for _, t in instructions]
    per_thread = values_per_trip / (32 * num_warps)
    spill_instructions = sum(1 for t in body if re.search(r"\b(LDL|STL)\b", t))
    return KernelReport(
        kernel=kernel_name, share=share, layout=layout, dtype=dtype, arch=arch, grid_size=grid_size, exact=exact,
        num_warps=num_warps, values_per_thread_per_trip=per_thread, loop_instructions=len(body),
        loop_instructions_per_element=len(body) / per_thread,
        loop_barriers=sum(1 for t in body if re.search(r"\bBAR\b", t)) if loop is not None else 0,
        registers=resources.get("registers", -1), shared_bytes=resources.get("shared", -1),
        spills=resources.get("local", 0) + spill_instructions, total_instructions=len(instructions))


def run(archs=(90, 80), shares=("layer", "channel"), dtypes=("fp16", "fp32"), workdir="/tmp") -> list[dict]:
    reports = []
    for arch in archs:
        for share in shares:
            for dtype in dtypes:
                for kernel in ("forward", "backward"):
                    reports.append(asdict(compile_report(kernel, share, dtype, arch, workdir=workdir)))
                if share != "layer":
                    reports.append(asdict(compile_report("backward", share, dtype, arch, workdir=workdir,
                                                         layout="channels_fastest")))
    return reports


def markdown(reports: list[dict]) -> str:
    lines = ["| kernel | share | layout | dtype | arch | warps | values / thread / trip | loop instr. | instr. / value | "
             "barriers in loop | registers | shared B | spills |", "|" + "---|" * 13]
    for r in reports:
        lines.append(f"| {r['kernel']} | {r['share']} | {r['layout']} | {r['dtype']} | sm_{r['arch']} | "
                     f"{r['num_warps']} | "
                     f"{r['values_per_thread_per_trip']:g} | {r['loop_instructions']} | "
                     f"{r['loop_instructions_per_element']:.0f} | {r['loop_barriers']} | {r['registers']} | "
                     f"{r['shared_bytes']} | {r['spills']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    parser.add_argument("--share", nargs="+", default=["layer", "channel"])
    parser.add_argument("--dtype", nargs="+", default=["fp16", "fp32"], help="dtype of x and dL/dphi")
    parser.add_argument("--json", help="write the records here (a list)")
    parser.add_argument("--workdir", default="/tmp")
    args = parser.parse_args(argv)
    reports = run(args.arch, args.share, args.dtype, args.workdir)
    print(f"triton {triton.__version__}")
    print(markdown(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2)
    return reports


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
