"""Sequence-length sweep: how time and memory of attention grow with T, per backend and head dim.

    python scripts/sweep_seq_len.py            # writes out/attention_sweep_<gpu>.json and .png (--out_dir results: the repo's)
    python scripts/sweep_seq_len.py --replot   # redraws the .png from the .json, measuring nothing
    python scripts/sweep_seq_len.py --variant v2=path/to/other_triton.py   # a kernel experiment beside the backends

T from 512 to 16384 with B·T fixed at 16384 tokens and H·D at 768 (D=64 with H=12, D=128 with H=6; bf16, causal),
so every point holds the same tokens and attention's cost per token grows with T. Attention FLOPs (∝ B·T²) then
grow linearly in T. So does the memory of naive attention's T×T matrices (∝ B·H·T², quadratic in T per sequence),
until they no longer fit (recorded as such), while a flash kernel's memory (∝ B·T, linear in T per sequence) stays
flat. Times (do_bench and GPU time), peak memory and the first call's time (autotuning) are measured by
bench_attention.measure, as in the kernel benchmark; `ratios` holds triton's speed relative to SDPA's default
(cuDNN on the H100) per head dim and T.
"""
import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402
from bench_attention import measure, vs_cudnn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from training.metrics import environment, write_report  # noqa: E402

TOKENS, WIDTH = 16384, 768
SEQ_LENS = [512, 1024, 2048, 4096, 8192, 16384]
# naive (eager) only at D=64: it shows the T×T memory growth once; the flash kernels are the comparison.
BACKENDS = {64: ["naive", "sdpa default", "sdpa FLASH_ATTENTION", "triton"],
            128: ["sdpa default", "sdpa FLASH_ATTENTION", "triton"]}


def group(D):
    return f"D={D} H={WIDTH // D}"


def plot(results, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.5 * len(results)), squeeze=False)
    for (name_group, by_t), (ax_ms, ax_mem) in zip(results.items(), axes):
        backends = list(next(iter(by_t.values())))
        for name in backends:
            points = [(int(T), rows[name]) for T, rows in by_t.items() if "error" not in rows[name]]
            ax_ms.plot([T for T, _ in points], [r["fwd_bwd_ms"] for _, r in points], marker="o", label=name)
            ax_mem.plot([T for T, _ in points], [r["peak_mib"] for _, r in points], marker="o", label=name)
            for T in [T for T, rows in by_t.items() if "error" in rows[name]]:
                ax_mem.annotate(f"{name}: {by_t[T][name]['error']}", (int(T), ax_mem.get_ylim()[1]), fontsize=7,
                                rotation=90, va="top")
        for ax, label in ((ax_ms, "forward+backward ms (do_bench)"), (ax_mem, "peak extra memory (MiB)")):
            ax.set(xscale="log", yscale="log", xlabel=f"sequence length T (B·T = {TOKENS})", ylabel=label)
            ax.set_xticks(SEQ_LENS, [str(T) for T in SEQ_LENS])
            ax.grid(True, which="both", alpha=0.3)
        ax_mem.legend(fontsize=8)
        ax_ms.set_title(f"{name_group}: time, attention FLOPs ∝ B·T², linear in T at fixed B·T")
        ax_mem.set_title(f"{name_group}: memory ∝ B·H·T² (naive) against ∝ B·T (flash)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def title(record):
    return f"causal attention, bf16, B·T={TOKENS}, H·D={WIDTH}, {record['gpu']}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out"), help="results/ for the repo's own figures")
    p.add_argument("--replot", action="store_true", help="redraw the plots of results/attention_sweep_*.json")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                   help="also sweep the causal_attention of a kernel experiment (as bench_attention.py --variant)")
    args = p.parse_args()
    if args.replot:
        for path in glob.glob(os.path.join(ROOT, "results", "attention_sweep_*.json")):
            with open(path) as f:
                record = json.load(f)
            plot(record["results"], title(record), path[:-5] + ".png")
            print(f"redrew {path[:-5]}.png")
        return
    if not torch.cuda.is_available():
        sys.exit("sweep_seq_len.py needs a CUDA GPU")
    env = environment(torch.device("cuda"))
    print(f"GPU: {env['gpu']} | torch {env['torch']} | triton {env['triton']} | cuDNN {env['cudnn']}", flush=True)
    variants = {n: bench_attention.load_variant(n, path) for n, path in (v.split("=", 1) for v in args.variant)}
    fns = bench_attention.backends(variants)
    results, ratios = {}, {}
    for D, names in BACKENDS.items():
        names = names + [f"triton {n}" for n in variants]
        H = WIDTH // D
        for T in SEQ_LENS:
            B = TOKENS // T
            rows = results.setdefault(group(D), {}).setdefault(str(T), {})
            for name in names:
                try:
                    rows[name] = measure(fns[name], B, H, T, D)
                except torch.cuda.OutOfMemoryError:
                    rows[name] = {"error": "out of memory"}
                torch.cuda.empty_cache()
                r = rows[name]
                print(f"D={D:3d} T={T:6d} B={B:3d} {name:22s} " + (r["error"] if "error" in r else
                      f"fwd+bwd {r['fwd_bwd_ms']:8.3f} ms (GPU {r['fwd_bwd_gpu_ms']:8.3f}), fwd {r['fwd_ms']:7.3f} "
                      f"(GPU {r['fwd_gpu_ms']:7.3f}), {r['fwd_bwd_gpu_tflops']:4.0f} TFLOP/s GPU, "
                      f"{r['peak_mib']:6.0f} MiB, first call {r['first_call_s']:5.1f} s"), flush=True)
            ratios.setdefault(group(D), {})[str(T)] = vs_cudnn(rows["triton"], rows["sdpa default"])
            for n in variants:
                ratios[group(D)][f"{T} {n}"] = vs_cudnn(rows[f"triton {n}"], rows["sdpa default"])

    print("\ntriton speed vs sdpa default (its time / ours; targets: fwd_bwd >= 1.0, goal 1.10; fwd >= 0.95, goal 1.0)")
    for name_group, by_t in ratios.items():
        for T, r in by_t.items():
            print(f"{name_group:12s} T={T:>5s} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
    record = {**env, "shape": dict(tokens=TOKENS, width=WIDTH, dtype="bfloat16"),
              "ratios_note": "sdpa default's time / triton's time (> 1: triton faster); gpu = summed kernel "
                             "durations (torch profiler), do_bench = median wall time between CUDA events",
              "ratios": ratios, "results": results}
    png = write_report(record, args.out_dir, "attention_sweep")[:-len(".json")] + ".png"
    plot(results, title(record), png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
