"""Sequence-length sweep: how time and memory of attention grow with T, per backend.

    python scripts/sweep_seq_len.py            # writes results/attention_sweep_<gpu>.json and .png
    python scripts/sweep_seq_len.py --replot   # redraws the .png from the .json, measuring nothing

T from 512 to 16384 with B·T fixed at 16384 tokens (H=12, D=64, bf16, causal), so every point holds the same
tokens and attention's cost per token grows with T. Attention FLOPs (∝ B·T²) then grow linearly in T. So does the
memory of naive attention's T×T matrices (∝ B·H·T², quadratic in T per sequence), until they no longer fit
(recorded as such), while a flash kernel's memory (∝ B·T, linear in T per sequence) stays flat.
Times and peak memory are measured by bench_attention.measure, as in the kernel benchmark.
"""
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402
from bench_attention import measure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_gpt2 import environment, gpu_slug  # noqa: E402

TOKENS, H, D = 16384, 12, 64
SEQ_LENS = [512, 1024, 2048, 4096, 8192, 16384]
BACKENDS = ["naive", "naive + torch.compile", "sdpa default", "sdpa FLASH_ATTENTION", "triton"]


def plot(results, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ms, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in BACKENDS:
        points = [(T, r) for T, r in ((int(T), rows[name]) for T, rows in results.items()) if "error" not in r]
        ax_ms.plot([T for T, _ in points], [r["fwd_bwd_ms"] for _, r in points], marker="o", label=name)
        ax_mem.plot([T for T, _ in points], [r["peak_mib"] for _, r in points], marker="o", label=name)
        failed = [T for T, rows in results.items() if "error" in rows[name]]
        for T in failed:
            ax_mem.annotate(f"{name}: {results[T][name]['error']}", (int(T), ax_mem.get_ylim()[1]), fontsize=7,
                            rotation=90, va="top")
    for ax, label in ((ax_ms, "forward+backward ms"), (ax_mem, "peak extra memory (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel=f"sequence length T (B·T = {TOKENS})", ylabel=label)
        ax.set_xticks(SEQ_LENS, [str(T) for T in SEQ_LENS])
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.legend(fontsize=8)
    ax_ms.set_title("time: attention FLOPs ∝ B·T², linear in T at fixed B·T")
    ax_mem.set_title("memory ∝ B·H·T² (naive) against ∝ B·T (flash)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def title(record):
    return f"causal attention, H={H} D={D} bf16, B·T={TOKENS}, {record['gpu']}"


def main():
    if "--replot" in sys.argv[1:]:
        for path in glob.glob(os.path.join(ROOT, "results", "attention_sweep_*.json")):
            with open(path) as f:
                record = json.load(f)
            plot(record["results"], title(record), path[:-5] + ".png")
            print(f"redrew {path[:-5]}.png")
        return
    if not torch.cuda.is_available():
        sys.exit("sweep_seq_len.py needs a CUDA GPU")
    fns = {name: fn for name, fn in bench_attention.backends({}).items() if name in BACKENDS}
    gpu = torch.cuda.get_device_name()
    results = {}
    for T in SEQ_LENS:
        B = TOKENS // T
        rows = results.setdefault(str(T), {})
        for name in BACKENDS:
            try:
                rows[name] = measure(fns[name], B, H, T, D)
            except torch.cuda.OutOfMemoryError:
                rows[name] = {"error": "out of memory"}
            torch.cuda.empty_cache()
            r = rows[name]
            print(f"T={T:6d} B={B:3d} {name:24s} " + (r["error"] if "error" in r else
                  f"{r['fwd_bwd_ms']:9.3f} ms {r['fwd_bwd_tflops']:6.0f} TFLOP/s {r['peak_mib']:9.0f} MiB"), flush=True)

    record = {**environment(torch.device("cuda")), "shape": dict(tokens=TOKENS, H=H, D=D, dtype="bfloat16"),
              "results": results}
    base = os.path.join(ROOT, "results", f"attention_sweep_{gpu_slug(gpu)}")
    with open(f"{base}.json", "w") as f:
        json.dump(record, f, indent=1)
    plot(results, title(record), f"{base}.png")
    print(f"wrote {base}.json and .png")


if __name__ == "__main__":
    main()
