"""Does a setting pay? One config trained with each value of a setting in turn, A B A B ..., with the GPU's clock and
power logged beside each run's timed steps.

    python scripts/compare_settings.py --config gpt2_124m_short --setting overlap_steps false true --repeat 2 \\
        -- --data_dir data/ts160 --max_steps 30 --eval_interval 0 --checkpoint_interval 0

Why alternate, and why the clock: a GPU at its power cap lowers its clock to stay under it (the H100 and H200 here
run the full configuration at 700 W), and the same run differs by 1-3% from one process to the next
(TRAINING_NOTES.md), so one run of each value cannot resolve a setting worth 1%, and a slower run may have had a lower
clock rather than more work. Alternating spreads the drift over every value; each row says its SM clock, its power
draw and the share of samples at the power cap over its timed steps (nvidia-smi every 0.2 s, averaged over the GPUs;
empty where there is no nvidia-smi), matched to the steps by the times in the run's metrics.jsonl.

Each run is its own process through train_gpt2.py (compare_attention.run_one) and keeps its files under
<results_dir>/runs/<gpu>/settings_<name>/<value>-<repeat>/. Writes <results_dir>/settings_<name>_<gpu>.json and .md;
name is the setting's and the config's unless --name gives another, with the date and time appended where an earlier
comparison holds those names (nothing is written over). Exits with status 1 when a run failed (no files but the runs'
logs when every run failed).
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from compare_attention import failures, fmt, run_info, run_one, unused_name  # noqa: E402
from training.config import ConfigError, load_config  # noqa: E402
from training.metrics import gpu_slug  # noqa: E402

POWER_CAP = 0x4  # nvidia-smi's clocks_throttle_reasons.active bit for "SW power cap"


class GpuSampler:
    """Samples (Unix time, SM clock MHz, power W, at the power cap 0/1), each the mean over the GPUs, every `period`
    seconds in a thread, for as long as it is open. No samples where nvidia-smi is missing or fails."""
    QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"

    def __init__(self, period=0.2):
        self.period, self.samples, self._done = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._done.is_set():
            try:
                out = subprocess.run(["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10, check=True).stdout
                gpus = [[field.strip() for field in line.split(",")] for line in out.strip().splitlines()]
                values = [(float(c), float(p), float(int(r, 16) & POWER_CAP != 0)) for c, p, r in gpus]
            except (OSError, subprocess.SubprocessError, ValueError):
                return
            if values:
                self.samples.append((time.time(), *[sum(v) / len(values) for v in zip(*values)]))
            self._done.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def timed_window(out_dir, summary):
    """(start, end) in Unix time of the steps that the run's mean ms/step covers (its last steps, all but the first
    timing_warmup), from its metrics.jsonl; None if there are none."""
    timed = len(summary["dt_ms"]) - summary["config"]["timing_warmup"]
    if summary["mean_ms"] is None or timed < 1:
        return None
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][-timed:]
    return rows[0]["time"] - rows[0]["dt_ms"] / 1e3, rows[-1]["time"]


def gpu_during(samples, window):
    """Mean SM clock, power and power-capped share of the samples within window (start, end); Nones where there are
    none."""
    inside = [s[1:] for s in samples if window and window[0] <= s[0] <= window[1]]
    if not inside:
        return dict(sm_clock_mhz=None, power_w=None, power_capped=None, gpu_samples=0)
    clock, power, capped = (sum(v) / len(inside) for v in zip(*inside))
    return dict(sm_clock_mhz=clock, power_w=power, power_capped=capped, gpu_samples=len(inside))


def mean_by_value(rows, values):
    """Per value: the mean of its runs' ms/step, and that mean against the first value's."""
    means = {}
    for v in values:
        ms = [r["ms"] for r in rows if r["value"] == v and r["status"] == "ok" and r["ms"]]
        means[v] = sum(ms) / len(ms) if ms else None
    base = means[values[0]]
    return {v: dict(ms=m, vs_first=m / base if m and base else None) for v, m in means.items()}


def markdown_table(setting, rows, means):
    lines = [f"| {setting} | run | ms/step | loss at last step | peak memory (GiB) | SM clock (MHz) | power (W) | at power cap |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['value']} | {r['repeat']} | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['value']} | {r['repeat']} | {fmt(r['ms'], '.1f')} | {r['loss']:.4f} (step {r['final_step']}) "
                     f"| {fmt(r['peak_mem_gib'], '.1f')} | {fmt(r['sm_clock_mhz'], '.0f')} | {fmt(r['power_w'], '.0f')} "
                     f"| {fmt(r['power_capped'], '.0%')} |")
    lines += ["", "Mean ms/step per value: " + ", ".join(
        f"{v} {fmt(m['ms'], '.1f')}" + (f" ({m['vs_first']:.3f}x)" if m["vs_first"] and i else "")
        for i, (v, m) in enumerate(means.items()))]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--setting", nargs="+", required=True, metavar=("KEY", "VALUE"),
                   help="a config key and two or more values, each passed as --KEY VALUE to train_gpt2.py")
    p.add_argument("--repeat", type=int, default=2, help="runs per value, alternating")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--compile", default="on", choices=["on", "off"])
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, through torchrun")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "out"), help="results/ for the repo's own figures")
    p.add_argument("--name", help="names the output files and run folders; default: <setting>_<config>")
    p.add_argument("overrides", nargs="*", help="flags for train_gpt2.py, after --")
    args = p.parse_args(argv)
    if len(args.setting) < 3:
        p.error("--setting takes a config key and at least two values, e.g. --setting overlap_steps false true")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    key, values = args.setting[0], args.setting[1:]
    for value in values:  # every run's settings, checked as the trainer checks them, before the first run starts
        try:
            load_config(["--config", args.config, *args.overrides, "--attention", args.attention, f"--{key}", value])
        except ConfigError as e:
            sys.exit(f"error: {e}")

    import torch  # after argument parsing, so that --help is instant

    gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    gpu = gpu_slug(gpu_name)
    name = unused_name(args.name or f"{key}_{os.path.splitext(os.path.basename(args.config))[0]}",
                       lambda n: [os.path.join(args.results_dir, f"settings_{n}_{gpu}.{ext}") for ext in ("json", "md")]
                       + [os.path.join(args.results_dir, "runs", gpu, f"settings_{n}")])
    rows, first = [], None
    for repeat in range(args.repeat):
        for value in values:
            out_dir = os.path.join(args.results_dir, "runs", gpu, f"settings_{name}", f"{value}-{repeat}")
            run_args = argparse.Namespace(config=args.config, nproc=args.nproc,
                                          overrides=[*args.overrides, f"--{key}", value])
            with GpuSampler() as sampler:
                row, summary = run_one(args.attention, args.compile == "on", run_args, out_dir)
            row.update(value=value, repeat=repeat)
            if summary:
                first = first or summary
                row.update(gpu_during(sampler.samples, timed_window(out_dir, summary)))
            rows.append(row)
    if first is None:
        sys.exit(f"error: {failures(rows)}")
    means = mean_by_value(rows, values)

    report = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), config=args.config, setting=key,
                  values=values, repeat=args.repeat, attention=args.attention, compile=args.compile,
                  nproc=args.nproc, overrides=args.overrides, **run_info(first), timing=first.get("timing"), rows=rows,
                  mean_ms=means)
    base = os.path.join(args.results_dir, f"settings_{name}_{gpu}")
    with open(f"{base}.json", "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(key, rows, means)
    title = f"{key} on {args.config}, {args.nproc} x {gpu_name or 'CPU'}"
    with open(f"{base}.md", "w") as f:
        f.write(f"{title}\n\n{table}\n")
    print(f"\n{title}\n{table}\nwrote {base}.json, .md")
    if failures(rows):
        sys.exit(f"error: {failures(rows)}")


if __name__ == "__main__":
    main()
