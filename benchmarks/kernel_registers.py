#!/usr/bin/env python3
"""Registers, spills and shared memory of the fused norm's kernels, compiled for a GPU
architecture on any machine (no GPU needed): Triton compiles each kernel for the target and
`cuobjdump --dump-resource-usage` (shipped with Triton) reads the binary.

    python benchmarks/kernel_registers.py --channels 128,256 --warps 4,8 --out regs.json

Each row is one kernel at one tile (`C` channels × `tile // C` positions, channels-last), one
number of warps and one loop depth (the one-kernel forward and backward, `one_pass` and
`one_pass_backward`, with `--groups` groups per program and `--single-tile`), with the programs of that kernel that fit one SM by
registers (65,536 per SM, at most 64 warps): a memory-bound kernel with few resident warps
keeps few loads in flight. The counts come from the Triton installed here, which may differ
from the GPU machine's (docs/performance.md says which was used).
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import diffunet  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffunet.accel import norm as fused
from diffunet.accel import triton_runtime
from harness.layers import int_list, write_json_result

#: Pointer arguments holding activations (bf16 in a model's bf16 step); every other pointer
#: is float32 (statistics, partial sums, affine parameters), every other argument an i32.
ACTIVATION_POINTERS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "scale_ptr", "sh_ptr"}
#: Registers per SM and resident warps per SM of the sm_80 / sm_90 GPUs.
REGISTERS_PER_SM = 65536
WARPS_PER_SM = 64


def norm_kernels() -> dict[str, object]:
    """The four streaming kernels a large norm call launches, then the one-kernel forward and
    backward of smaller calls, by name."""
    return {
        "statistics": fused.kernels._stats_kernel,
        "normalize": fused.kernels._normalize_kernel,
        "backward_reduce": fused.kernels._backward_reduce_kernel,
        "backward_dx": fused.kernels._backward_dx_kernel,
        "one_pass": fused.kernels._one_pass_kernel,
        "one_pass_backward": fused.kernels._one_pass_backward_kernel,
    }


#: The kernels run unless `--kernels` names others.
STREAMING = ("statistics", "normalize", "backward_reduce", "backward_dx")


def signature(kernel: object, constexprs: dict[str, object]) -> dict[str, str]:
    """Triton's signature of `kernel`'s arguments: activation pointers bf16, other pointers
    float32, the rest i32, and the constexprs as such."""
    names = list(kernel.arg_names)  # type: ignore[attr-defined]
    types = {}
    for name in names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*bf16" if name in ACTIVATION_POINTERS else "*fp32"
        else:
            types[name] = "i32"
    return types


def resource_usage(kernel: object, constexprs: dict[str, object], warps: int, arch: int) -> dict:
    """Registers per thread, local (spilled) and shared bytes of `kernel` compiled for
    `sm_{arch}` with `constexprs`, in `warps` warps."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    wanted = set(kernel.arg_names)  # type: ignore[attr-defined]
    constexprs = {k: v for k, v in constexprs.items() if k in wanted}
    source = ASTSource(fn=kernel, signature=signature(kernel, constexprs), constexprs=constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}
    )
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as binary:
        binary.write(compiled.asm["cubin"])
        binary.flush()
        report = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", binary.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", report)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report:\n{report}")
    registers, shared, local = (int(v) for v in found.groups())
    by_registers = REGISTERS_PER_SM // (registers * 32 * warps)
    return {
        "registers": registers,
        "shared_bytes": shared,
        "spilled_bytes": local,
        "programs_per_sm_by_registers": min(by_registers, WARPS_PER_SM // warps),
    }


def main(argv: list[str] | None = None) -> int:
    """Compile every combination and print one row per kernel; writes JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--channels", type=int_list, default=[128], help="C of the tiles")
    parser.add_argument("--tile", type=int_list, default=[4096], help="elements per tile")
    parser.add_argument("--warps", type=int_list, default=[4, 8], help="num_warps values")
    parser.add_argument("--stages", type=int_list, default=[3], help="loop depths (STAGES)")
    parser.add_argument(
        "--kernels", default=",".join(STREAMING), help=f"any of {', '.join(norm_kernels())}"
    )
    parser.add_argument(
        "--groups", type=int, default=8, help="groups per program (BLOCK_G) of the one-kernel pair"
    )
    parser.add_argument(
        "--single-tile",
        action="store_true",
        help="the one-kernel pair with all positions in one tile",
    )
    parser.add_argument("--film", action="store_true", help="with FiLM's scale and shift")
    parser.add_argument("--add", action="store_true", help="with an added embedding (ADD)")
    parser.add_argument("--no-act", dest="act", action="store_false", help="without the SiLU")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: H100)")
    parser.add_argument("--out", help="JSON path (default: $OUT/kernel_registers.json if set)")
    args = parser.parse_args(argv)
    kernels = norm_kernels()
    unknown = sorted(set(args.kernels.split(",")) - set(kernels))
    if unknown:
        parser.error(f"unknown kernels {unknown}; choose from {', '.join(kernels)}")
    if triton_runtime.triton is None:
        parser.error("Triton is not installed")
    rows = []
    print(
        f"{'kernel':16} {'C':>5} {'tile':>6} {'warps':>5} {'stages':>6} "
        f"{'regs':>5} {'spill B':>7} {'smem B':>7} {'progs/SM':>8}"
    )
    for name, channels, tile, warps, stages in itertools.product(
        args.kernels.split(","), args.channels, args.tile, args.warps, args.stages
    ):
        constexprs = {
            "FILM": args.film,
            "ACT": args.act,
            "ADD": args.add,
            "BLOCK_C": channels,
            "BLOCK_N": max(1, tile // channels),
            "BLOCK_G": args.groups,
            "STAGES": stages,
            "SINGLE_TILE": args.single_tile,
        }
        usage = resource_usage(kernels[name], constexprs, warps, args.arch)
        row = {
            "kernel": name,
            "channels": channels,
            "tile": tile,
            "warps": warps,
            "stages": stages,
            **usage,
        }
        rows.append(row)
        print(
            f"{name:16} {channels:5d} {tile:6d} {warps:5d} {stages:6d} {usage['registers']:5d} "
            f"{usage['spilled_bytes']:7d} {usage['shared_bytes']:7d} "
            f"{usage['programs_per_sm_by_registers']:8d}"
        )
    meta = {
        "triton": triton_runtime.triton.__version__,
        "arch": args.arch,
        "film": args.film,
        "act": args.act,
        "add": args.add,
        "groups": args.groups,
        "single_tile": args.single_tile,
    }
    write_json_result({"meta": meta, "rows": rows}, args.out, "kernel_registers.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
