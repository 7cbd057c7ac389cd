"""Where a training step's time goes: GPU kernel time by category, per step, from a torch.profiler trace.

    python scripts/profile_step.py --config gpt2_124m_short -- --data_dir data/ts160   # flags after -- go to the trainer
    python scripts/profile_step.py --config step49 --out_dir results                  # the repo's own figures

The run goes through train_gpt2.py with `--profile_steps N` (N steps traced after the timing warm-up, Chrome
trace format). Each GPU kernel is put in one category by its name; the categories' totals per step, the GPU's
busy time (the union of kernel intervals), its idle time within the traced steps and the largest idle gaps (with
the kernels on either side) are written to <out_dir>/profile_<config>[_<tag>]_<gpu>.json, with the run's summary
(command, GPU, versions, date).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from training.config import ConfigError, load_config  # noqa: E402
from training.metrics import write_report  # noqa: E402

# First match wins. Inductor names its kernels after the ops it fused (triton_red_fused__log_softmax_..., ...).
CATEGORIES = [
    ("attention", r"flash|fmha|cudnn|attn|sdpa|_fwd_kernel|_bwd_|cutlass.*(fprop|dgrad)"),
    ("communication", r"nccl|allreduce|all_reduce"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("matmul", r"nvjet|gemm|gemv|sm\d+_xmma|cutlass|cublas|wgmma|matmul|_mm_"),
    ("LM head + cross-entropy", r"softmax|nll|cross_entropy|logsumexp|fused_loss|linear_cross"),
    ("LayerNorm (+ residual)", r"layer_norm|native_layer_norm|rsqrt|var_mean"),
    ("GELU", r"gelu|tanh"),
    ("copies (cat, transpose, clone)", r"cat|clone|transpose|copy_|contiguous|permute"),
    ("casts", r"_to_copy|convert|cast"),
    ("fill", r"fill|zero"),
]


def category(name):
    low = name.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, low)), "other")


def analyse(trace_path, steps):
    """Per-step kernel time by category, GPU busy and idle time, from a Chrome trace of `steps` steps."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not kernels:
        raise SystemExit(f"{trace_path}: no GPU kernels in the trace (a CPU run?); profile on a GPU")
    totals, names = {}, {}
    for k in kernels:
        cat = category(k["name"])
        totals[cat] = totals.get(cat, 0.0) + k["dur"]
        names.setdefault(cat, {}).setdefault(k["name"][:80], 0.0)
        names[cat][k["name"][:80]] += k["dur"]
    kernels.sort(key=lambda k: k["ts"])
    spans = [(k["ts"], k["ts"] + k["dur"]) for k in kernels]
    busy, end, gaps = 0.0, spans[0][0], []
    for i, (start, stop) in enumerate(spans):  # the union of the intervals: overlapping kernels (streams) count once
        if start > end:  # the GPU idles from `end` to `start`: say between which kernels
            gaps.append((start - end, kernels[i - 1]["name"][:60], kernels[i]["name"][:60]))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    wall = spans[-1][1] - spans[0][0]
    per_step = {cat: us / steps / 1e3 for cat, us in sorted(totals.items(), key=lambda kv: -kv[1])}
    kernel_ms = sum(per_step.values())
    return dict(steps=steps, wall_ms_per_step=wall / steps / 1e3, gpu_busy_ms_per_step=busy / steps / 1e3,
                gpu_idle_ms_per_step=(wall - busy) / steps / 1e3,
                categories={cat: dict(ms=ms, share=ms / kernel_ms) for cat, ms in per_step.items()},
                top_kernels={cat: sorted(((n, us / steps / 1e3) for n, us in d.items()), key=lambda x: -x[1])[:5]
                             for cat, d in names.items()},
                largest_idle_gaps=[dict(ms=us / 1e3, after=a, before=b) for us, a, b in sorted(gaps, reverse=True)[:8]])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="step49")
    p.add_argument("--steps", type=int, default=3, help="steps traced, after the config's timing_warmup")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out"), help="where the JSON goes (results/ for the repo's)")
    p.add_argument("--tag", default="", help="added to the file name, e.g. before / after a change")
    p.add_argument("overrides", nargs="*", help="flags for train_gpt2.py, after --")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as run_dir:
        try:
            warmup = load_config(["--config", args.config, *args.overrides]).timing_warmup  # the run's own
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--config", args.config,
               f"--max_steps={warmup + args.steps + 1}", f"--profile_steps={args.steps}", f"--out_dir={run_dir}",
               "--checkpoint_interval=0", "--eval_interval=0", *args.overrides]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        profile = analyse(os.path.join(run_dir, "trace.json"), args.steps)

    record = {k: summary[k] for k in ("date", "python", "torch", "triton", "cuda", "cudnn", "gpu", "world_size")}
    record.update(command=" ".join(["python"] + sys.argv), trainer_command=" ".join(cmd[1:]), config=summary["config"],
                  mean_ms=summary["mean_ms"], mean_tok_per_s=summary["mean_tok_per_s"],
                  peak_mem_gib=summary["peak_mem_gib"], profile=profile)
    write_report(record, args.out_dir, f"profile_{args.config}" + (f"_{args.tag}" if args.tag else ""))
    print(f"step {profile['wall_ms_per_step']:.1f} ms traced, GPU busy {profile['gpu_busy_ms_per_step']:.1f} ms, "
          f"idle {profile['gpu_idle_ms_per_step']:.1f} ms")
    for cat, d in profile["categories"].items():
        print(f"  {cat:32s} {d['ms']:8.1f} ms  {d['share']:6.1%}")
    print(f"largest GPU idle gaps of the {args.steps} steps:")
    for gap in profile["largest_idle_gaps"]:
        print(f"  {gap['ms']:6.2f} ms between {gap['after']} and {gap['before']}")


if __name__ == "__main__":
    main()
