"""What does flash attention buy on this GPU? The step-49 experiment for every backend, compile on and off.

    python scripts/compare_attention.py                                   # naive, sdpa, triton x compile on, off
    python scripts/compare_attention.py --backends naive sdpa --compile on --nproc 8
    python scripts/compare_attention.py --config tiny -- --max_steps 5    # flags after -- go to train_gpt2.py
    python scripts/compare_attention.py --results_dir results             # the repo's own figures

Each run is its own process through the real entry point (train_gpt2.py, under torchrun when --nproc > 1) and
keeps its files under <results_dir>/runs/<gpu>/<name>/<backend>-<compile|eager>/. The table is built from those
runs' summary.json files only. A run that fails or runs out of memory becomes a row that says so, and the script
then exits with status 1 (no files but the runs' logs when every run failed).
Writes <results_dir>/compare_<name>_<gpu>.json, .md (the table) and .png (loss curves and ms/step bars); name is
the config's unless --name gives another (for the same config with other flags). results_dir is out/ unless given.
Nothing is written over: where an earlier comparison holds those names, this one's name gets the date and time.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from attention import BACKENDS  # noqa: E402
from training.metrics import gpu_slug  # noqa: E402


def run_one(backend, compile, args, out_dir):
    """Train once; return the table row for it and the run's summary (None if it failed)."""
    mode = "compile" if compile else "eager"
    launcher = [sys.executable] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd = launcher + [os.path.join(ROOT, "train_gpt2.py"), "--config", args.config, "--attention", backend,
                      "--compile", str(compile).lower(), "--out_dir", out_dir, *args.overrides]
    print(f"== {backend} {mode}: {' '.join(cmd)}", flush=True)
    if os.path.isdir(out_dir) and os.listdir(out_dir):  # the callers choose unused folders; this guards the rest
        sys.exit(f"error: {out_dir} holds an earlier run, kept; give this comparison another --name or --results_dir")
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "log.txt")
    with open(log_path, "x") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    row, summary = read_run(backend, compile, out_dir, proc.returncode)
    print(f"   {row['status']}: {row['error']}" if summary is None else f"   {row['ms']:.2f} ms/step, loss {row['loss']:.6f}",
          flush=True)
    return row, summary


def read_run(backend, compile, out_dir, returncode=0):
    """The table row of a finished run, from the files it wrote: its summary.json, or its log if it failed."""
    row = dict(backend=backend, compile=compile, out_dir=os.path.relpath(out_dir, ROOT))
    summary_path = os.path.join(out_dir, "summary.json")
    if returncode != 0 or not os.path.exists(summary_path):
        log_path = os.path.join(out_dir, "log.txt")
        lines = open(log_path).read().splitlines() if os.path.exists(log_path) else ["no log"]
        oom = any("out of memory" in line.lower() for line in lines)
        row.update(status="out of memory" if oom else f"failed (exit {returncode})",
                   error=next((l for l in reversed(lines) if l.strip()), ""))
        return row, None
    with open(summary_path) as f:
        summary = json.load(f)
    row.update(status="ok", final_step=summary["final_step"], loss=summary["final_loss"], ms=summary["mean_ms"],
               tok_per_s=summary["mean_tok_per_s"], mfu=summary["mean_mfu"], peak_mem_gib=summary["peak_mem_gib"],
               command=summary["command"])
    return row, summary


def unused_name(name, paths_of):
    """name, or name with the date and time appended where one of paths_of(name) exists: a comparison run again
    with the same arguments is written beside the earlier one, never over it."""
    earlier = [p for p in paths_of(name) if os.path.exists(p)]
    if not earlier:
        return name
    dated = f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    if any(os.path.exists(p) for p in paths_of(dated)):
        sys.exit(f"error: {earlier[0]} and its dated name {dated} are both taken; give another --name")
    print(f"{earlier[0]} holds an earlier comparison, kept: this one is {dated} (--name chooses the name)", flush=True)
    return dated


def failures(rows):
    """One line naming the runs that did not finish and where their logs are, or None."""
    failed = [r for r in rows if r["status"] != "ok"]
    if not failed:
        return None
    return (f"{len(failed)} of {len(rows)} runs failed: " +
            "; ".join(f"{os.path.join(r['out_dir'], 'log.txt')}: {r['status']}" for r in failed))


def add_comparisons(rows):
    """Δloss against sdpa and speed-up against naive, each within the same compile mode."""
    by_key = {(r["backend"], r["compile"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        sdpa, naive = by_key.get(("sdpa", r["compile"])), by_key.get(("naive", r["compile"]))
        r["dloss_vs_sdpa"] = r["loss"] - sdpa["loss"] if sdpa else None
        r["speedup_vs_naive"] = naive["ms"] / r["ms"] if naive and naive["ms"] and r["ms"] else None


def fmt(value, spec):
    """A table cell: the value formatted, or a dash where there is none."""
    return "–" if value is None else format(value, spec)


def run_info(summary):
    """What the figures depend on besides the code, as the first run recorded it (train_gpt2.environment)."""
    return {k: summary.get(k) for k in ("gpu", "torch", "triton", "cuda", "cudnn", "python", "date")}


SINGLE_RUNS = ("One run per row, not a mean of repeats: a difference within the run-to-run spread of ms/step "
               "(TRAINING_NOTES.md) is not resolved by it.")


def markdown_table(rows):
    lines = ["| backend | torch.compile | loss at last step | Δloss vs sdpa | ms/step | tokens/s | MFU | peak memory (GiB) | speed-up vs naive |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = "on" if r["compile"] else "off"
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {mode} | {r['status']} | | | | | | |")
            continue
        lines.append(f"| {r['backend']} | {mode} | {r['loss']:.4f} (step {r['final_step']}) | {fmt(r['dloss_vs_sdpa'], '+.4f')} "
                     f"| {fmt(r['ms'], '.1f')} | {fmt(r['tok_per_s'], ',.0f')} | {fmt(r['mfu'], '.1%')} | {r['peak_mem_gib']:.1f} "
                     f"| {fmt(r['speedup_vs_naive'], '.2f')}{'×' if r['speedup_vs_naive'] else ''} |")
    return "\n".join(lines + ["", SINGLE_RUNS])


MARKERS = "osD^vP*X"
BAR_COLOURS = {True: ("C0", "torch.compile on"), False: ("C7", "torch.compile off (eager)")}


def figure(rows, summaries, title):
    """The loss curves of the runs that finished and a bar of ms/step per run, as a matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_ms) = plt.subplots(1, 2, figsize=(12, 4.5))
    finished = [r for r in rows if r["status"] == "ok"]
    for i, r in enumerate(finished):
        s = summaries[(r["backend"], r["compile"])]
        steps = range(s["final_step"] - len(s["loss"]) + 1, s["final_step"] + 1)
        # Backends often give the same losses: each curve is drawn narrower than the one before and over it, with
        # its own markers at steps of its own, so curves that coincide still show each one.
        every, width = max(len(steps) // 8, 1), 1 + 1.2 * (len(finished) - 1 - i)
        ax_loss.plot(steps, s["loss"], label=f"{r['backend']} ({'compile' if r['compile'] else 'eager'})",
                     linestyle="-" if r["compile"] else "--", linewidth=width, zorder=2 + i,
                     marker=MARKERS[i % len(MARKERS)], markersize=width + 5,
                     markevery=(i * every // len(finished), every))
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss per step")
    ax_loss.legend()
    labels = [f"{r['backend']}\n{'compile' if r['compile'] else 'eager'}" for r in rows]
    heights = [r["ms"] if r["status"] == "ok" and r["ms"] else 0 for r in rows]
    bars = ax_ms.bar(labels, heights, color=[BAR_COLOURS[r["compile"]][0] for r in rows])
    for bar, r in zip(bars, rows):
        ax_ms.annotate(f"{r['ms']:.1f}" if r["status"] == "ok" and r["ms"] else r["status"],
                       (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax_ms.legend(handles=[Patch(color=colour, label=label) for mode, (colour, label) in BAR_COLOURS.items()
                          if any(r["compile"] == mode for r in rows)])
    ax_ms.set(ylabel="ms per step (mean after warm-up)", title="time per step (one run each)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(rows, summaries, title, path):
    import matplotlib.pyplot as plt

    fig = figure(rows, summaries, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--compile", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--config", default="step49")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, through torchrun")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "out"), help="results/ for the repo's own figures")
    p.add_argument("--name", help="names the output files and run folders; default: the config's name")
    p.add_argument("overrides", nargs="*", help="flags for train_gpt2.py, after --")
    args = p.parse_args(argv)

    import torch  # after argument parsing, so that --help is instant

    gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    gpu = gpu_slug(gpu_name)
    name = unused_name(args.name or os.path.splitext(os.path.basename(args.config))[0],
                       lambda n: [os.path.join(args.results_dir, f"compare_{n}_{gpu}.{ext}") for ext in ("json", "md", "png")]
                       + [os.path.join(args.results_dir, "runs", gpu, n)])
    rows, summaries = [], {}
    for compile in [c == "on" for c in args.compile]:
        for backend in args.backends:
            out_dir = os.path.join(args.results_dir, "runs", gpu, name, f"{backend}-{'compile' if compile else 'eager'}")
            row, summary = run_one(backend, compile, args, out_dir)
            rows.append(row)
            if summary:
                summaries[(backend, compile)] = summary
    add_comparisons(rows)
    if not summaries:
        sys.exit(f"error: {failures(rows)}")

    first = next(iter(summaries.values()))
    env = run_info(first)
    title = f"{name} on {args.nproc} x {gpu_name or 'CPU'}"
    report = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), config=args.config,
                  nproc=args.nproc, overrides=args.overrides, **env,
                  timing=first.get("timing"), rows=rows)
    base = os.path.join(args.results_dir, f"compare_{name}_{gpu}")
    with open(f"{base}.json", "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(rows)
    with open(f"{base}.md", "w") as f:
        f.write(f"{title}\n\n{table}\n")
    plot(rows, summaries, title, f"{base}.png")
    print(f"\n{title}\n{table}\nwrote {base}.json, .md, .png")
    if failures(rows):
        sys.exit(f"error: {failures(rows)}")


if __name__ == "__main__":
    main()
