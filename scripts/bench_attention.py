"""Benchmark the causal attention backends on the GPU: forward, backward and forward+backward.

    python scripts/bench_attention.py                  # GPT-2 shape and a D=128 shape; writes out/attention_bench_<gpu>.json (--out_dir results: the repo's)
    python scripts/bench_attention.py --variant v2=path/to/other_triton.py   # extra rows for kernel experiments
    python scripts/bench_attention.py --paths          # each path of the triton backend, cuDNN and FA2 per D and T:
                                                       # GPU, wall and host time side by side
    python scripts/bench_attention.py --configs        # every candidate config of every triton kernel, per D and T:
                                                       # results/attention_configs_<gpu>.json
    python scripts/bench_attention.py --configs --tma  # the same through TMA descriptors and through pointers (Hopper):
                                                       # results/attention_configs_tma_<gpu>.json

Two times per call: the median of triton.testing.do_bench (wall clock between CUDA events, L2 flushed before each
repeat, so the host's launch overhead counts where the GPU waits for it), and the GPU time, the summed durations
of the kernels of one call under the torch profiler (what the GPU itself spends, without launch gaps). FLOPs:
forward 4·B·H·T²·D/2 (causal halves the dense count), backward 2.5× forward, forward+backward 3.5× forward. q, k, v
are the strided views the model makes (split of a (B, T, 3C) projection, view, transpose). Forward is timed in
training mode (inputs require grad, so every backend saves what its backward needs); backward is
torch.autograd.grad of the attention output w.r.t. q, k, v (no qkv gradient assembly); peak memory is the extra
allocation of one forward+backward.
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import torch
import torch._functorch.config
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from attention import naive, sdpa  # noqa: E402
from attention import triton as triton_attention  # noqa: E402
from training.metrics import environment, gpu_slug  # noqa: E402

SHAPES = {"gpt2 B16 H12 T1024 D64": (16, 12, 1024, 64), "B16 H6 T1024 D128": (16, 6, 1024, 128)}
SDPA_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def forced_sdpa(backend):
    def attn(q, k, v):
        # The forward picks the kernel and records its matching backward, so forcing the forward is enough.
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn


def load_variant(name, path):
    spec = importlib.util.spec_from_file_location(f"attention_variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backends(variants):
    # Lets the compiled naive backward be timed repeatedly on one graph (retain_graph=True).
    torch._functorch.config.donated_buffer = False
    rows = {"naive": naive.causal_attention,
            "naive + torch.compile": torch.compile(naive.causal_attention, fullgraph=True),
            "sdpa default": sdpa.causal_attention}
    rows.update({f"sdpa {b}": forced_sdpa(b) for b in SDPA_BACKENDS})
    rows["triton"] = triton_attention.causal_attention
    # The backend with each forward forced: the portable tl kernel, and the warp-specialised Gluon kernel (sm_90 with
    # Triton 3.6.0), which the default takes from GLUON_MIN_T on.
    rows["triton tl"] = lambda q, k, v: triton_attention._FlashAttention.apply(q, k, v, False)
    rows["triton gluon"] = lambda q, k, v: triton_attention._FlashAttention.apply(q, k, v, True)
    for name, module in variants.items():
        rows[f"triton {name}"] = module.causal_attention
    return rows


def views(B, H, T, D, dtype=torch.bfloat16):
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=dtype, requires_grad=True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    return qkv, q, k, v, torch.randn(B, H, T, D, device="cuda", dtype=dtype)


def gpu_ms(fn, n=20):
    """GPU time per call: the summed durations of the kernels it runs (torch profiler), without launch gaps."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / n / 1e3


def measure(fn, B, H, T, D):
    qkv, q, k, v, do = views(B, H, T, D)
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")  # noqa: E731
    fwd = lambda: fn(q, k, v)  # noqa: E731
    fwd_bwd = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)  # noqa: E731
    start = time.perf_counter()
    fwd_bwd()  # compile / autotune / pick kernels outside the timings (first_call_s: how long that took)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    out = fn(q, k, v)
    bwd = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # noqa: E731
    t_fwd, t_bwd, t_both = bench(fwd), bench(bwd), bench(fwd_bwd)
    g_fwd, g_bwd, g_both = gpu_ms(fwd), gpu_ms(bwd), gpu_ms(fwd_bwd)
    del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    flops = 4 * B * H * T * T * D / 2
    return {"fwd_ms": t_fwd, "bwd_ms": t_bwd, "fwd_bwd_ms": t_both, "peak_mib": peak,
            "fwd_tflops": flops / t_fwd * 1e-9, "bwd_tflops": 2.5 * flops / t_bwd * 1e-9,
            "fwd_bwd_tflops": 3.5 * flops / t_both * 1e-9,
            "fwd_gpu_ms": g_fwd, "bwd_gpu_ms": g_bwd, "fwd_bwd_gpu_ms": g_both,
            "fwd_bwd_gpu_tflops": 3.5 * flops / g_both * 1e-9, "first_call_s": first_s}


# Candidates for the --configs survey, (block sizes, num_warps, num_stages); attention/triton.py's per-head-dim
# lists are chosen from their results.
CANDIDATES = {
    "_attn_fwd": (("BLOCK_M", "BLOCK_N"), [
        (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3),
        (128, 128, 8, 2), (128, 32, 4, 4), (128, 32, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2),
        (64, 32, 4, 4), (64, 16, 2, 3)]),
    "_attn_bwd_dq": (("BLOCK_M2", "BLOCK_N2"), [
        (128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 4, 4),
        (64, 64, 4, 3), (64, 64, 4, 2), (64, 16, 4, 3), (64, 32, 2, 3), (32, 16, 2, 3)]),
    "_attn_bwd_dkdv": (("BLOCK_N1", "BLOCK_M1"), [
        (128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2),
        (64, 64, 4, 3), (64, 64, 4, 2), (64, 16, 4, 3), (64, 16, 2, 3), (64, 32, 8, 3), (32, 16, 2, 3)]),
}
SURVEY_TOKENS, SURVEY_WIDTH = 16384, 768  # B·T and H·D of the T sweep (scripts/sweep_seq_len.py)


def kernel_ms(fn, name, n=10):
    """GPU time per call of the kernel called `name` within fn (torch profiler)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.key.startswith(name)) / n / 1e3


def survey(module, seq_lens, kernels=tuple(CANDIDATES), tma=None):
    """Every candidate config of each kernel, alone, at each head dim and T (B·T and H·D fixed): the kernel's GPU
    time, or why it could not run. The other two kernels run their first candidate. tma: True or False forces the
    TMA or the pointer path (Hopper; our backend only), None lets the backend choose."""
    configs = {name: [triton.Config(dict(zip(names, blocks)), num_warps=w, num_stages=s) for *blocks, w, s in shapes]
               for name, (names, shapes) in CANDIDATES.items()}
    fwd0, dq0, dkdv0 = (c[0] for c in configs.values())
    path = {} if tma is None else {"tma": tma}
    calls = {"_attn_fwd": lambda q, k, v, do, o, lse, c: module.attention_forward(q, k, v, c, **path),
             "_attn_bwd_dq": lambda q, k, v, do, o, lse, c: module.attention_backward(do, q, k, v, o, lse, c, dkdv0,
                                                                                      **path),
             "_attn_bwd_dkdv": lambda q, k, v, do, o, lse, c: module.attention_backward(do, q, k, v, o, lse, dq0, c,
                                                                                        **path)}
    calls = {name: calls[name] for name in kernels}
    results = {}
    for D in (64, 128):
        for T in seq_lens:
            B, H = SURVEY_TOKENS // T, SURVEY_WIDTH // D
            _, q, k, v, do = views(B, H, T, D)
            q, k, v = q.detach(), k.detach(), v.detach()
            o, lse = module.attention_forward(q, k, v, fwd0)
            row = results.setdefault(f"D={D}", {}).setdefault(str(T), {})
            for name, call in calls.items():
                times = row.setdefault(name, {})
                for c in configs[name]:
                    label = " ".join(f"{v}" for v in c.kwargs.values()) + f" w{c.num_warps} s{c.num_stages}"
                    try:
                        call(q, k, v, do, o, lse, c)
                        times[label] = kernel_ms(lambda: call(q, k, v, do, o, lse, c), name)
                    except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError) as e:
                        times[label] = type(e).__name__
                ok = {lbl: t for lbl, t in times.items() if isinstance(t, float)}
                best = min(ok, key=ok.get)
                print(f"D={D:3d} T={T:5d} {name:15s} best {best:16s} {ok[best]:.4f} ms  " +
                      "  ".join(f"{lbl}:{t:.4f}" if isinstance(t, float) else f"{lbl}:{t}" for lbl, t in times.items()),
                      flush=True)
    return results


PATHS = ("triton", "triton tl", "triton gluon", "sdpa default", "sdpa FLASH_ATTENTION")


def path_sweep(seq_lens, fns):
    """Each path of causal attention at each head dim and T (B·T and H·D fixed): GPU time (torch profiler: summed kernel
    durations) of a forward and of an eager forward+backward, that call's wall time (do_bench median: host overhead
    counts where the GPU waits for it), the host's enqueue time of one forward+backward (the GPU left to catch up
    after the loop) and the first call's time (compilation, autotuning)."""
    results = {}
    for D in (64, 128):
        for T in seq_lens:
            B, H = SURVEY_TOKENS // T, SURVEY_WIDTH // D
            _, q, k, v, do = views(B, H, T, D)
            row = results.setdefault(f"D={D}", {}).setdefault(str(T), {})
            for name, fn in fns.items():
                fwd = lambda: fn(q, k, v)  # noqa: E731
                fwd_bwd = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)  # noqa: E731
                start = time.perf_counter()
                fwd_bwd()
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                for _ in range(5):
                    fwd_bwd()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(50):
                    fwd_bwd()
                host = (time.perf_counter() - start) / 50 * 1e3
                torch.cuda.synchronize()
                wall = triton.testing.do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
                r = row[name] = {"fwd_gpu_ms": gpu_ms(fwd), "fwd_bwd_gpu_ms": gpu_ms(fwd_bwd), "fwd_bwd_ms": wall,
                                 "fwd_bwd_host_ms": host, "first_call_s": first}
                print(f"D={D:3d} T={T:5d} {name:22s} fwd GPU {r['fwd_gpu_ms']:.4f}  fwd+bwd GPU {r['fwd_bwd_gpu_ms']:.4f}"
                      f"  wall {wall:.4f}  host {host:.4f} ms  first {first:.1f} s", flush=True)
            cudnn = row["sdpa default"]
            row["ratios"] = {name: {k: cudnn[k] / row[name][k] for k in ("fwd_gpu_ms", "fwd_bwd_gpu_ms", "fwd_bwd_ms")}
                             for name in fns if name != "sdpa default"}
    return results


def tuned_configs(module):
    """The autotuner's winners, per (key, dtypes), for the record."""
    out = {}
    for (kernel, _), tuned in module._TUNED.items():
        out.setdefault(kernel.__name__, {}).update({str(k): str(c) for k, c in tuned.cache.items()})
    return out


def vs_cudnn(t, cudnn):
    """Triton's speed relative to SDPA's default (cuDNN on the H100): its time over triton's, in GPU time and in
    do_bench time. Targets (issue 11): fwd+bwd must >= 1.0, goal >= 1.10; fwd must >= 0.95, goal >= 1.0."""
    return {f"{kind} {clock}": cudnn[f"{kind}{suffix}"] / t[f"{kind}{suffix}"]
            for kind in ("fwd_bwd", "fwd", "bwd") for clock, suffix in (("gpu", "_gpu_ms"), ("do_bench", "_ms"))}


def ratios(rows):
    """The figures the targets refer to: triton vs SDPA's default (no Python context manager around the call,
    unlike the forced rows) and vs its FlashAttention-2 backend."""
    t, cudnn, flash = rows.get("triton"), rows.get("sdpa default"), rows.get("sdpa FLASH_ATTENTION")
    if not t or "error" in t:
        return {}
    r = {"fwd+bwd time / (fwd + bwd)": t["fwd_bwd_ms"] / (t["fwd_ms"] + t["bwd_ms"])}
    if cudnn and "error" not in cudnn:
        r.update({f"{k} vs sdpa default": v for k, v in vs_cudnn(t, cudnn).items()})
    if flash and "error" not in flash:
        r["fwd vs FLASH (must >= 1.2)"] = t["fwd_tflops"] / flash["fwd_tflops"]
        r["bwd vs FLASH (must >= 1.2)"] = t["bwd_tflops"] / flash["bwd_tflops"]
    return r


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                        help="also time the causal_attention of another copy of the triton backend (its custom ops "
                             "need their own namespace)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of: " + ", ".join(SHAPES))
    parser.add_argument("--paths", action="store_true", help="each path (triton as it chooses, its tl kernels, its "
                        "Gluon kernels on sm_90, cuDNN, FlashAttention-2) per head dim and T: GPU time and eager wall "
                        "and host time side by side: <out_dir>/attention_paths_<gpu>.json")
    parser.add_argument("--configs", action="store_true", help="survey every candidate config of every triton kernel "
                        "(and of each variant) per head dim and T instead")
    parser.add_argument("--seq-lens", default="512,1024,2048,4096,8192,16384", help="T values of the --configs survey")
    parser.add_argument("--kernels", default=",".join(CANDIDATES), help="the kernels the --configs survey covers")
    parser.add_argument("--tma", action="store_true", help="--configs: survey our kernels through TMA descriptors "
                        "as well as through pointers (Hopper), as the rows 'triton tma' and 'triton pointer'")
    parser.add_argument("--out_dir", default=os.path.join(ROOT, "out"), help="where the JSON goes (results/ for the "
                        "repo's own figures)")
    parser.add_argument("--out", default=None, help="JSON path (default <out_dir>/attention_bench_<gpu>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")

    env = environment(torch.device("cuda"))
    gpu = env["gpu"]
    print(f"GPU: {gpu} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | cuDNN {env['cudnn']}", flush=True)
    variants = {n: load_variant(n, p) for n, p in (v.split("=", 1) for v in args.variant)}
    if args.configs:
        seq_lens = [int(t) for t in args.seq_lens.split(",")]
        record = {**env, "timing": "GPU time of each kernel (torch profiler), bf16, strided q/k/v views; B·T = "
                  f"{SURVEY_TOKENS}, H·D = {SURVEY_WIDTH}", "candidates": CANDIDATES,
                  "results": {}}
        kernels = args.kernels.split(",")
        paths = {"triton tma": True, "triton pointer": False} if args.tma else {"triton": None}
        for name, tma in paths.items():
            record["results"][name] = survey(triton_attention, seq_lens, kernels, tma)
        for name, module in variants.items():
            record["results"][name] = survey(module, seq_lens, kernels)
        filename = f"attention_configs{'_tma' if args.tma else ''}_{gpu_slug(gpu)}.json"
        out = args.out or os.path.join(args.out_dir, filename)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {out}")
        return
    fns = backends(variants)
    if args.paths:
        gluon = triton_attention.GLUON and torch.cuda.get_device_capability() == (9, 0)
        names = [n for n in (*PATHS, *(f"triton {n}" for n in variants)) if gluon or n != "triton gluon"]
        record = {**env, "timing": "bf16, strided q/k/v views, B·T = 16384, H·D = 768; GPU: torch profiler, summed "
                  "kernel durations; wall: do_bench median (L2 flushed); host: enqueue time of one eager fwd+bwd; "
                  "ratios: sdpa default's (cuDNN) time over the path's", "results": path_sweep(
                      [int(t) for t in args.seq_lens.split(",")], {n: fns[n] for n in names})}
        out = args.out or os.path.join(args.out_dir, f"attention_paths_{gpu_slug(gpu)}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {out}")
        return

    results = {}
    for shape_name in args.shapes.split(","):
        B, H, T, D = SHAPES[shape_name]
        rows = results.setdefault(shape_name, {"shape": dict(B=B, H=H, T=T, D=D, dtype="bfloat16"), "rows": {}})["rows"]
        for name, fn in fns.items():
            try:
                rows[name] = measure(fn, B, H, T, D)
            except torch.cuda.OutOfMemoryError:
                rows[name] = {"error": "out of memory"}
            except RuntimeError as e:  # e.g. a forced SDPA backend that cannot run this shape
                rows[name] = {"error": str(e).strip().splitlines()[0][:160]}
            torch.cuda.empty_cache()
            print(f"  {shape_name:24s} {name:28s} {rows[name]}", flush=True)
        results[shape_name]["ratios"] = ratios(rows)

    record = {**env, "flops": "fwd = 4*B*H*T^2*D/2 (causal); bwd = 2.5 x fwd; fwd+bwd = 3.5 x fwd",
              "timing": "triton.testing.do_bench median, L2 flushed; bf16; strided q/k/v views",
              "results": results, "triton_autotuned": tuned_configs(triton_attention),
              "variants": {n: p for n, p in (v.split("=", 1) for v in args.variant)}}
    out = args.out or os.path.join(args.out_dir, f"attention_bench_{gpu_slug(gpu)}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)

    print(f"\n{gpu} | torch {env['torch']} | triton {env['triton']} | cuDNN {env['cudnn']}")
    for shape_name, res in results.items():
        print(f"\n{shape_name}, bf16, causal   (ms and TFLOP/s)")
        print(f"{'backend':28s} {'fwd':>15s} {'bwd':>15s} {'fwd+bwd':>15s} {'peak MiB':>9s}")
        for name, r in res["rows"].items():
            if "error" in r:
                print(f"{name:28s} unavailable: {r['error']}")
                continue
            cells = [f"{r[k + '_ms']:.3f} ({r[k + '_tflops']:4.0f})" for k in ("fwd", "bwd", "fwd_bwd")]
            print(f"{name:28s} {cells[0]:>15s} {cells[1]:>15s} {cells[2]:>15s} {r['peak_mib']:9.0f}")
        for k, v in res["ratios"].items():
            print(f"  triton {k}: {v:.3f}")
    print(f"\nautotuned: {json.dumps(record['triton_autotuned'], indent=1)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
