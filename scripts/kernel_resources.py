"""What each config of a Triton kernel costs the GPU's resources, found without a GPU: registers, local memory (spills),
shared memory, and whether Triton software-pipelined its loops.

    python scripts/kernel_resources.py                       # attention/triton.py's three kernels, every config,
                                                             # through pointers and (the *_TMA_CONFIGS) descriptors
    python scripts/kernel_resources.py attention.triton:_attn_bwd_dq:DQ_CONFIGS --arch 80   # one kernel, for the A100

Each kernel is compiled for the target architecture with Triton's own compiler and ptxas (`triton.compile` with a
GPUTarget, no driver needed), bf16, at each head dim of its config list, with the integer arguments that the
model's strided views make divisible by 16 (strides, T) marked so, as they are at run time; registers and stack come
from `cuobjdump --dump-resource-usage`. A stack above 0 means spills. `async copies` counts the cp.async copies in
the kernel's TTGIR: 0 in a kernel with loops means none of its loads was software-pipelined. A config list whose name
ends in _TMA_CONFIGS is compiled with TMA=True, its descriptor arguments (attention.triton.TMA_TILES) typed as
host-side descriptors; its lines say "TMA" after the kernel's name and count the TMA copies instead.
"""
import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels are compiled here, never interpreted
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attention.triton import TMA_TILES, _meta  # noqa: E402

DEFAULT = ["attention.triton:_attn_fwd:FWD_CONFIGS", "attention.triton:_attn_bwd_dq:DQ_CONFIGS",
           "attention.triton:_attn_bwd_dkdv:DKDV_CONFIGS", "attention.triton:_attn_fwd:FWD_TMA_CONFIGS",
           "attention.triton:_attn_bwd_dq:DQ_TMA_CONFIGS", "attention.triton:_attn_bwd_dkdv:DKDV_TMA_CONFIGS"]
POINTER_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32", "LOCKS": "*i32"}  # the others: the inputs' bf16
INTEGERS = {"H", "T", "BH", "T_BUCKET"}  # upper-case like the tensors, after the paper's notation


def signature(kernel, constexprs):
    """Argument types: upper-case names are tensors (pointers, or with TMA host-side descriptors of the kernel's
    tiles) but for INTEGERS, the rest 32-bit integers; and which are divisible by 16."""
    types = {n: "constexpr" if n in constexprs else "i32" if n in INTEGERS or not n.isupper() else
             POINTER_TYPES.get(n, "*bf16") for n in kernel.arg_names}
    if constexprs.get("TMA"):
        for name, block in TMA_TILES[kernel].items():
            types[name] = f"tensordesc<bf16[1, 1, {constexprs[block]}, {constexprs['HEAD_DIM']}]>"
    aligned = [n for n in kernel.arg_names if types[n].startswith("*") or n.startswith("stride") or n == "T"]
    return types, {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def constexprs_for(kernel, head_dim, config, tma=False):
    """The kernel's constexprs as a bf16 call on the GPU sets them (also where the interpreter is on: it computes in
    fp32), with those that have a default at it but TMA: the descriptor path or the pointer path."""
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    return {**defaults, **_meta(torch.bfloat16, head_dim), "COMPUTE": tl.bfloat16, **config.kwargs,
            **({"TMA": True} if tma else {})}


def resources(kernel, constexprs, config, arch):
    types, attrs = signature(kernel, constexprs)
    compiled = triton.compile(ASTSource(kernel, types, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return dict(**_usage(compiled), async_copies=compiled.asm["ttgir"].count("async_copy_global_to_local"),
                tma_copies=compiled.asm["ttgir"].count("async_tma_copy_global_to_local"))


def gluon_forward(head_dim, arch=90, dtype="bf16"):
    """attention/hopper.py's warp-specialised forward compiled as attention/hopper.forward launches it: its resources,
    and the instructions that make it what it is (counted in its PTX)."""
    from attention import hopper

    block_n = hopper.CONSUMERS * hopper.WG_ROWS
    constexprs = dict(QK_SCALE=head_dim**-0.5 * hopper.LOG2E, HEAD_DIM=head_dim, STAGES=hopper.FWD_CONFIGS[head_dim],
                      CONSUMERS=hopper.CONSUMERS, WG_ROWS=hopper.WG_ROWS)
    tiles = dict(q_desc=hopper.WG_ROWS, k_desc=block_n, v_desc=block_n, o_desc=hopper.WG_ROWS)
    return _gluon(hopper._attn_fwd_ws, head_dim, tiles, constexprs, arch, dtype)


def gluon_backward(head_dim, arch=90, dtype="bf16"):
    """attention/hopper.py's warp-specialised backward kernel compiled as attention/hopper.backward launches it."""
    from attention import hopper

    config = hopper.BWD_CONFIGS[head_dim]
    constexprs = dict(QK_SCALE=head_dim**-0.5 * hopper.LOG2E, SM_SCALE=head_dim**-0.5, HEAD_DIM=head_dim, **config,
                      CONSUMERS=hopper.CONSUMERS, WG_ROWS=hopper.WG_ROWS)
    rows, keys = config["BLOCK_M"], hopper.WG_ROWS
    tiles = dict(q_desc=rows, k_desc=keys, v_desc=keys, do_desc=rows, dq_desc=(rows, "fp32", head_dim), dk_desc=keys,
                 dv_desc=keys)
    return _gluon(hopper._attn_bwd_ws, head_dim, tiles, constexprs, arch, dtype)


def _gluon(kernel, head_dim, tiles, constexprs, arch, dtype):
    """A Gluon kernel of attention/hopper.py compiled for `arch`: its resources, and the instructions that make it what
    it is (counted in its PTX). tiles: each descriptor argument's tile rows (or rows, dtype, columns, if not the
    inputs' dtype and head_dim)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    gl_dtypes = {"bf16": gl.bfloat16, "fp16": gl.float16, "fp32": gl.float32}

    def desc(rows, tile_dtype=dtype, cols=head_dim):
        layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, cols], gl_dtypes[tile_dtype])
        return f"tensordesc<{tile_dtype}[1, 1, {rows}, {cols}],{layout!r}>"

    types = {name: desc(*tile) if isinstance(tile, tuple) else desc(tile) for name, tile in tiles.items()}
    types.update({name: "constexpr" if name in constexprs else "i32" if name in INTEGERS else "*fp32"
                  for name in kernel.arg_names if name not in types})
    types = {name: types[name] for name in kernel.arg_names}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in kernel.arg_names
             if types[name] == "*fp32"}
    compiled = triton.compile(GluonASTSource(kernel, types, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=4))
    ptx = compiled.asm["ptx"]
    return dict(**_usage(compiled), warps=compiled.metadata.num_warps,
                registers_per_partition=sorted(set(map(int, re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)",
                                                                         ptx)))),
                wgmma=ptx.count("wgmma.mma_async"), overlapped_waits=ptx.count("wgmma.wait_group.sync.aligned 1;"),
                tma_loads=ptx.count("cp.async.bulk.tensor"), tma_reduce_adds=ptx.count("cp.reduce.async.bulk.tensor"))


def _usage(compiled):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return dict(registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                stack=int(re.search(r"STACK:(\d+)", usage).group(1)), shared=compiled.metadata.shared)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernels", nargs="*", default=DEFAULT, metavar="MODULE:KERNEL:CONFIGS",
                   help="a kernel and its per-head-dim config dict (default: attention/triton.py's three)")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200) or 80 (A100)")
    args = p.parse_args()
    for spec in args.kernels:
        module_name, kernel_name, configs_name = spec.split(":")
        module = importlib.import_module(module_name)
        kernel, configs = getattr(module, kernel_name), getattr(module, configs_name)
        tma = configs_name.endswith("_TMA_CONFIGS")
        for head_dim, config_list in configs.items():
            for config in config_list:
                r = resources(kernel, constexprs_for(kernel, head_dim, config, tma), config, args.arch)
                label = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
                copies = f"{r['tma_copies']} TMA copies" if tma else f"{r['async_copies']} async copies"
                print(f"{kernel_name}{' TMA' if tma else ''} D={head_dim} {label} w{config.num_warps} "
                      f"s{config.num_stages} (sm_{args.arch}): {r['registers']} registers, {r['stack']} B stack"
                      f"{' (spills)' if r['stack'] else ''}, {r['shared']} B shared, {copies}", flush=True)


if __name__ == "__main__":
    main()
