"""scripts/kernel_resources.py against a second path to the same facts: ptxas -v, run on the kernel's PTX. Both run
in processes without TRITON_INTERPRET (the kernels must be compiled, which the interpreter replaces)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

PTXAS_V = """
import os, subprocess, sys, torch, triton, triton.language as tl
sys.path.insert(0, {root!r})
from attention import triton as ta
kernel, config, D = ta.{kernel}, ta.{configs}[{D}][{i}], {D}
defaults = {{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}}  # TMA: the pointer path
constexprs = {{**defaults, **ta._meta(torch.bfloat16, D), **config.kwargs}}
types = {{n: "constexpr" if n in constexprs else "i32" if n in ("H", "T", "BH", "T_BUCKET") or not n.isupper()
         else "*fp32" if n in ("LSE", "DELTA") else "*bf16" for n in kernel.arg_names}}
attrs = {{(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
         if types[n].startswith("*") or n.startswith("stride") or n == "T"}}
compiled = triton.compile(triton.compiler.ASTSource(kernel, types, constexprs, attrs),
                          target=triton.backends.compiler.GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
open({ptx!r}, "w").write(compiled.asm["ptx"])
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
print(subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", {ptx!r}, "-o", os.devnull], capture_output=True, text=True,
                     check=True).stderr)
"""


def test_registers_and_spills_match_ptxas(tmp_path):
    # A config that fits and one that spills (the D=128 dK/dV kernel at 64x64 with 4 warps).
    cases = [("_attn_bwd_dq", "DQ_CONFIGS", 64, 0), ("_attn_bwd_dkdv", "DKDV_CONFIGS", 128, 1)]
    tool = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kernel_resources.py")], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.splitlines()
    for kernel, configs, D, i in cases:
        script = PTXAS_V.format(root=ROOT, kernel=kernel, configs=configs, D=D, i=i, ptx=str(tmp_path / "k.ptx"))
        ptxas = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True,
                               check=True).stdout
        registers = int(re.search(r"Used (\d+) registers", ptxas).group(1))
        spills = int(re.search(r"(\d+) bytes spill stores", ptxas).group(1))
        line = [ln for ln in tool if ln.startswith(f"{kernel} D={D} ")][i]
        assert f": {registers} registers, " in line, (line, ptxas)
        assert ("(spills)" in line) == (spills > 0), (line, ptxas)
        assert not line.endswith(" 0 async copies"), line  # both kernels' loops are software-pipelined


# The most shared memory one block may use (the CUDA programming guide's per-block limit), by compute capability.
SHARED_PER_BLOCK = {86: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
POINTER_LISTS = ["_attn_fwd:FWD_CONFIGS", "_attn_bwd_dq:DQ_CONFIGS", "_attn_bwd_dkdv:DKDV_CONFIGS"]
TMA_LISTS = ["_attn_fwd:FWD_TMA_CONFIGS", "_attn_bwd_dq:DQ_TMA_CONFIGS", "_attn_bwd_dkdv:DKDV_TMA_CONFIGS"]


def shared_bytes(arch, lists):
    """{(kernel [TMA], D): [shared bytes of each config]} from scripts/kernel_resources.py compiled for `arch`."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kernel_resources.py"), "--arch", str(arch),
                          *(f"attention.triton:{spec}" for spec in lists)], env=ENV, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    shared = {}
    for line in out.splitlines():
        shared.setdefault(line.split(" BLOCK")[0], []).append(int(re.search(r"(\d+) B shared", line).group(1)))
    return shared


def test_config_lists_fit_in_shared_memory():
    # A config that needs more shared memory than a block may have fails at launch (OutOfResources). The autotuner
    # skips such a config, so each pointer list needs one that fits on the smallest GPUs it serves (99 KB per block
    # on sm_86 and sm_89); a TMA list holds one config, which runs untuned on every GPU from sm_90 on (sm_120 has
    # 99 KB per block again).
    pointer = shared_bytes(86, POINTER_LISTS)
    assert len(pointer) == 6  # three kernels at D = 64 and 128
    for key, shared in pointer.items():
        assert min(shared) <= SHARED_PER_BLOCK[86], (key, shared)
    for arch in (90, 100, 120):
        tma = shared_bytes(arch, TMA_LISTS)
        assert len(tma) == 5 and all(len(s) == 1 for s in tma.values())  # fwd at D = 128, the backward at 64 and 128
        for key, (shared,) in tma.items():
            assert shared <= SHARED_PER_BLOCK[arch], (arch, key, shared)
