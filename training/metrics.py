"""What a run reports: the machine it ran on, MFU, the per-step log, the summary that results/ keeps, and W&B."""
import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

import torch


def gpu_benchmark(description, argv=None):
    """The command line the GPU benchmarks in scripts/ share (--out_dir) and the machine's record for their JSON; stops
    with a message on a machine without a CUDA GPU. Returns (args, environment)."""
    p = argparse.ArgumentParser(description=description)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--out_dir", default=os.path.join(root, "out"), help="results/ for the repo's own figures")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    return args, environment(torch.device("cuda"))


def environment(device):
    """What a figure depends on besides the code: recorded next to every result. cuda is None on a CPU run."""
    info = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                python=platform.python_version(), torch=torch.__version__, device=str(device), gpu=None,
                cuda=torch.version.cuda if device.type == "cuda" else None,
                cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# Dense bf16 tensor-core peak FLOP/s, from the vendors' datasheets (without sparsity), for MFU, keyed by the GPU's
# model as torch.cuda.get_device_name() spells it ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA L40S").
# A model is matched as a whole word, so "L4" is not found in "L40S"; variants come before their family. An unknown
# GPU gets no MFU rather than a guess.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12), ("H200", 989e12),
                   ("B200", 2250e12), ("A100", 312e12), ("A10G", 125e12), ("L40S", 362e12), ("L40", 181e12),
                   ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(gpu_name):
    return next((flops for name, flops in PEAK_BF16_FLOPS
                 if gpu_name and re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", gpu_name)), None)


def gpu_slug(gpu_name):
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA GeForce RTX 4090' -> 'geforce-rtx-4090'; None -> 'cpu'."""
    if not gpu_name:
        return "cpu"
    words = gpu_name.lower().replace("nvidia", "").split()
    n = next((i for i, w in enumerate(words) if re.search(r"\d", w)), len(words) - 1)
    return "-".join(words[: n + 1])


def write_report(report, out_dir, stem):
    """A measuring script's JSON, as <out_dir>/<stem>_<gpu>.json (results/ holds the repo's own); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}_{gpu_slug(report['gpu'])}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    return path


def peak_memory_gib(device):
    """Peak memory of this process: allocated GPU memory on CUDA, the process's peak RSS elsewhere (None where the
    platform cannot say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def traced_steps(cfg):
    """The steps that step_profiler traces: cfg.profile_steps of them after the timing warm-up. It writes the trace
    in the .step() call that ends the last of them."""
    return range(cfg.timing_warmup, cfg.timing_warmup + cfg.profile_steps)


def step_profiler(cfg):
    """A torch.profiler that traces GPU kernels over traced_steps(cfg) and writes out_dir/trace.json (Chrome trace
    format); None when profiling is off. Call .step() after every step."""
    if not cfg.profile_steps:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if torch.cuda.is_available() else [])
    schedule = torch.profiler.schedule(wait=max(0, cfg.timing_warmup - 1), warmup=min(1, cfg.timing_warmup),
                                       active=cfg.profile_steps, repeat=1)
    path = os.path.join(cfg.out_dir, "trace.json")
    profiler = torch.profiler.profile(activities=activities, schedule=schedule,
                                      on_trace_ready=lambda p: p.export_chrome_trace(path))
    profiler.start()
    return profiler


def open_log(path, start_step):
    """Open a JSON-lines log for writing. A resumed run keeps the rows before its first step (and drops those that
    the interrupted run wrote after its last checkpoint, and lines that do not parse, saying so); returns the file
    and the rows kept."""
    kept, dropped = [], 0
    for line in _read(path).splitlines():
        try:
            row = json.loads(line)
            step = row["step"]
        except (ValueError, TypeError, KeyError):
            print(f"warning: {path}: dropping a line that is not a log row: {line[:60]!r}")
            continue
        if step < start_step:
            kept.append(row)
        else:
            dropped += 1
    if dropped:
        print(f"{path}: dropped {dropped} row(s) from step {start_step} on, written after the checkpoint resumed from")
    f = open(path, "w")
    f.writelines(json.dumps(r) + "\n" for r in kept)
    return f, kept


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class RunLog:
    """Rank 0's record of the run: config.json, a row per step in metrics.jsonl (and its line printed), each
    evaluation in evals.jsonl, W&B, and summary.json at the end. A resumed run keeps the rows before its first step."""

    def __init__(self, cfg, settings, start_step, tokens_per_step, world, mfu, device, wandb_id):
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(settings, f, indent=2)
        self.metrics, self.rows = open_log(os.path.join(cfg.out_dir, "metrics.jsonl"), start_step)
        self.evals, _ = open_log(os.path.join(cfg.out_dir, "evals.jsonl"), start_step)
        self.run = start_wandb(cfg, settings, wandb_id) if cfg.wandb else None
        self.wandb_id = self.run.id if self.run else wandb_id
        self.cfg, self.settings, self.start_step, self.world = cfg, settings, start_step, world
        self.tokens_per_step, self.mfu, self.device = tokens_per_step, mfu, device
        self.seconds = []  # this process's step times, in order: the ETA's running mean

    def step(self, step, lr, loss, grad_norm, dt, read_at):
        mem = peak_memory_gib(self.device)
        row = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, dt_ms=1e3 * dt, tok_per_s=self.tokens_per_step / dt,
                   tok_per_s_per_gpu=self.tokens_per_step / dt / self.world, mfu=self.mfu(dt), peak_mem_gib=mem,
                   time=read_at)  # when the host had the step's figures (Unix time): lines the log up with others
        self.rows.append(row)
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.run:
            self.run.log({k: v for k, v in row.items() if k != "time"}, step=step)  # W&B keeps its own clock
        self.seconds.append(dt)
        # The warm-up left out once past it; within it, the process's first step (compilation: 32 s against 1 s
        # on the H100's full configuration) left out once a second one is read.
        recent = self.seconds[self.cfg.timing_warmup:] or self.seconds[1:] or self.seconds
        eta = (self.cfg.max_steps - 1 - step) * sum(recent) / len(recent)
        print(f"step {step:5d} | loss {loss:.6f} | lr {lr:.2e} | norm {grad_norm:.4f} | {1e3 * dt:8.2f} ms | "
              f"{row['tok_per_s']:10,.0f} tok/s | MFU {'n/a' if row['mfu'] is None else format(row['mfu'], '.1%')} | "
              f"{'n/a' if mem is None else format(mem, '.2f')} GiB | ETA {datetime.timedelta(seconds=round(eta))}")

    def evaluation(self, step, results):
        print(f"eval step {step:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "samples"))
        for text in results.get("samples", []):
            print(f"  sample: {text!r}")
        self.evals.write(json.dumps(dict(step=step, **results)) + "\n")
        self.evals.flush()
        if self.run:
            self.run.log({k: v for k, v in results.items() if k != "samples"}, step=step)

    def close(self, env, status):
        """Write summary.json (if a step was logged) and print the run's final line."""
        self.metrics.close()
        self.evals.close()
        if self.rows:
            summary = summarize(self.rows, self.start_step, self.cfg.timing_warmup, env, self.settings, self.world,
                                self.tokens_per_step, self.mfu, status)
            with open(os.path.join(self.cfg.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            ms = f"{summary['mean_ms']:.2f} ms/step, " if summary["mean_ms"] else ""
            print(f"final: step {summary['final_step']} loss {summary['final_loss']:.6f} | {ms}{summary['timing']}")
        if self.run:
            self.run.finish()


def summarize(rows, start_step, timing_warmup, env, settings, world, tokens_per_step, mfu, exit_status):
    """The run in one JSON object: what results/ keeps and the README's tables are built from. The mean ms/step
    leaves out the first `timing_warmup` steps of this process (compilation, autotuning), also after a resume.
    exit_status is the process's (0 done, 1 non-finite loss, 75 stopped): torchrun reports only 0 or 1."""
    timed = [r for r in rows if r["step"] >= start_step + timing_warmup]
    mean_ms = sum(r["dt_ms"] for r in timed) / len(timed) if timed else None
    if not timed:
        timing = f"no ms/step mean: all steps of this process are within timing_warmup={timing_warmup}"
    else:
        timing = f"mean over steps {timed[0]['step']}-{timed[-1]['step']}"
        if timing_warmup:
            timing += f" (the first {timing_warmup} of this process left out as warm-up)"
    memory = [r["peak_mem_gib"] for r in rows if r["peak_mem_gib"] is not None]
    return dict(**env, world_size=world, config=settings, exit_status=exit_status, final_step=rows[-1]["step"],
                final_loss=rows[-1]["loss"], mean_ms=mean_ms, timing=timing,
                mean_tok_per_s=tokens_per_step / (mean_ms / 1e3) if timed else None,
                mean_mfu=mfu(mean_ms / 1e3) if timed else None,
                peak_mem_gib=max(memory) if memory else None,
                loss=[r["loss"] for r in rows], dt_ms=[r["dt_ms"] for r in rows])


def start_wandb(cfg, settings, run_id=None):
    """A W&B run on rank 0 (offline without an API key), resuming `run_id` when given; None if W&B is unusable.
    W&B is never the reason a run stops."""
    try:
        import wandb
    except ImportError:
        print("warning: --wandb given but wandb is not installed (pip install wandb); logging locally only")
        return None
    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read(os.path.expanduser("~/.netrc"))
        mode = "online" if has_key else "offline"
        if not has_key:
            print(f"warning: no W&B API key (WANDB_API_KEY or `wandb login`): logging offline under {cfg.out_dir}/wandb; "
                  "upload later with `wandb sync`")
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=settings,
                          dir=cfg.out_dir, mode=mode, id=run_id, resume="allow" if run_id else None)
    except Exception as e:  # a W&B outage must not cost a training run
        print(f"warning: wandb.init failed ({type(e).__name__}: {e}); logging locally only")
        return None
