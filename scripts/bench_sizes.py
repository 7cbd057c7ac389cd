"""What does each GPT-2 size cost? Tokens/s, MFU and peak memory of each size on one GPU, with each attention
backend, and the time and cost of the size's full run on 8 GPUs that they imply (an estimate).

    python scripts/bench_sizes.py --results_dir results                      # 124m 350m 774m 1558m x sdpa, triton
    python scripts/bench_sizes.py --sizes 1558m --results_dir results        # one size (one device call each, below)
    python scripts/bench_sizes.py --sizes 1558m --name no_recompute -- --recompute_gelu false

Each run is the size's _short configuration through train_gpt2.py (compare_attention.run_one), with one GPU's share
of the 8-GPU run's global batch as its global batch: the micro-batch and the gradient accumulation that each GPU of
the 8-GPU run has (DDP's all-reduce, which overlaps the backward, left out), so that 8 x its tokens/s is the 8-GPU
run's speed, its optimizer step amortised as there. The tokens are random (the speed does not depend on them: no
data to prepare); no evaluation, no checkpoints. Flags after -- go to every run and to the full configuration that
the estimate is of (--total_batch_size there is the 8-GPU run's).

Time: each run compiles the model first, over a minute for the 124M model (TRAINING_NOTES.md) and more for the
deeper ones, so all eight runs take longer than one 10-minute device call: give each call a few sizes.

Writes, per size, <results_dir>/sizes_<config>[_<name>]_<gpu>.json and .md, and refuses to start where one of them
or a run folder already exists: an earlier measurement is never overwritten.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from compare_attention import fmt, run_info, run_one  # noqa: E402
from data.shards import write_shard  # noqa: E402
from model import GPT2_VOCAB  # noqa: E402
from training.config import ConfigError, grad_accum_steps, load_config  # noqa: E402
from training.metrics import gpu_slug  # noqa: E402

SIZES = ("124m", "350m", "774m", "1558m")
GPUS = 8  # the full run's, for the estimate
# llm.c's price for 8X H100 80GB SXM, $28 an hour (karpathy/llm.c, scripts/run_gpt2_1558M.sh): an assumption,
# recorded with every estimate; --usd_per_gpu_hour for another.
USD_PER_GPU_HOUR = 3.5


def plan_run(size, backend, steps, warmup, data_dir, overrides):
    """One run: its config, the trainer's flags, its resolved settings, its gradient accumulation, and the full run's
    settings; ConfigError where the trainer would refuse them or 8 GPUs cannot share the full run's global batch."""
    config = f"gpt2_{size}_short"
    full = load_config(["--config", f"gpt2_{size}", *overrides])
    grad_accum_steps(full, GPUS)
    short = load_config(["--config", config, *overrides])
    # The schedule's warm-up is clipped to the run's steps (the trainer refuses a longer one); speed does not depend
    # on the learning rate.
    flags = [*overrides, "--total_batch_size", str(full.total_batch_size // GPUS), "--max_steps", str(steps),
             "--warmup_steps", str(min(short.warmup_steps, steps)), "--timing_warmup", str(warmup),
             "--eval_interval", "0", "--checkpoint_interval", "0", "--data_dir", data_dir]
    cfg = load_config(["--config", config, "--attention", backend, *flags])
    return dict(backend=backend, config=config, flags=flags, cfg=cfg, accum=grad_accum_steps(cfg, 1), full=full)


def estimate(row, full, usd_per_gpu_hour):
    """The full run on 8 GPUs at 8 x this run's tokens/s: hours and dollars (training steps only, no evaluations)."""
    tokens = full.max_steps * full.total_batch_size
    hours = tokens / (GPUS * row["tok_per_s"]) / 3600
    return dict(full_run_steps=full.max_steps, full_run_tokens=tokens, est_hours_8gpu=hours,
                est_usd_8gpu=hours * GPUS * usd_per_gpu_hour)


def markdown_table(rows):
    lines = ["| size | attention | micro-batch | accumulation (1 of 8 GPUs) | tokens/s (1 GPU) | MFU | peak memory (GiB) "
             "| full run on 8 GPUs (estimate) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['size']} | {r['backend']} | {r['batch_size']} | {r['accum']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | |")
            continue
        run = (f"{r['est_hours_8gpu']:.1f} h, ${r['est_usd_8gpu']:,.0f} ({r['full_run_tokens'] / 1e9:.1f}B tokens)"
               if r.get("est_hours_8gpu") else "–")
        lines.append(f"{head} {fmt(r['tok_per_s'], ',.0f')} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_mem_gib'], '.1f')} "
                     f"| {run} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    p.add_argument("--backends", nargs="+", default=["sdpa", "triton"])
    p.add_argument("--steps", type=int, default=20, help="steps per run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing (compilation)")
    p.add_argument("--usd_per_gpu_hour", type=float, default=USD_PER_GPU_HOUR, help="price for the cost estimate")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "out"), help="results/ for the repo's own figures")
    p.add_argument("--name", help="added to the output files' and run folders' names, for another set of flags")
    p.add_argument("overrides", nargs="*", help="flags for train_gpt2.py, after --")
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup ({args.warmup}) must leave steps to time: 0 <= warmup < steps ({args.steps})")

    import torch  # after argument parsing, so that --help is instant

    gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    gpu = gpu_slug(gpu_name)
    suffix = f"_{args.name}" if args.name else ""
    data_dir = tempfile.mkdtemp(prefix="bench_sizes_")
    try:  # every run's settings and every output path checked before the first run starts
        plans = []
        for size in args.sizes:
            base = os.path.join(args.results_dir, f"sizes_gpt2_{size}{suffix}_{gpu}")
            runs = os.path.join(args.results_dir, "runs", gpu, f"sizes_gpt2_{size}{suffix}")
            for path in (f"{base}.json", f"{base}.md", runs):
                if os.path.exists(path):
                    raise ConfigError(f"{os.path.relpath(path)} exists (an earlier measurement); give --name for a "
                                      "new one, or move it away")
            plans.append((size, base, runs, [plan_run(size, b, args.steps, args.warmup, data_dir, args.overrides)
                                             for b in args.backends]))
    except ConfigError as e:
        shutil.rmtree(data_dir)
        sys.exit(f"error: {e}")

    vocab = min([GPT2_VOCAB] + [run["cfg"].model.vocab_size for *_, planned in plans for run in planned])
    write_shard(os.path.join(data_dir, "random_train_000001.bin"), np.random.default_rng(0).integers(0, vocab, 2**21))
    all_rows = []
    try:
        for size, base, runs, backends in plans:
            rows, first = [], None
            for run in backends:
                row, summary = run_one(run["backend"], run["cfg"].compile,
                                       argparse.Namespace(config=run["config"], nproc=1, overrides=run["flags"]),
                                       os.path.join(runs, run["backend"]))
                row.update(size=size, config=run["config"], batch_size=run["cfg"].batch_size, accum=run["accum"])
                if summary and row["tok_per_s"]:
                    first = first or summary
                    row.update(estimate(row, run["full"], args.usd_per_gpu_hour))
                rows.append(row)
            report = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), size=size,
                          overrides=args.overrides, **run_info(first or {}), timing=(first or {}).get("timing"),
                          estimate=f"the full run on {GPUS} GPUs at {GPUS} x one GPU's tokens/s, training steps only, "
                                   f"at ${args.usd_per_gpu_hour} per GPU-hour", rows=rows)
            with open(f"{base}.json", "w") as f:
                json.dump(report, f, indent=2)
            with open(f"{base}.md", "w") as f:
                f.write(f"GPT-2 {size} on 1 x {gpu_name or 'CPU'} ({report['estimate']})\n\n{markdown_table(rows)}\n")
            print(f"wrote {base}.json, .md", flush=True)
            all_rows += rows
    finally:
        shutil.rmtree(data_dir)
    print(f"\n{markdown_table(all_rows)}")


if __name__ == "__main__":
    main()
