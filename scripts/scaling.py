"""DDP scaling: one global batch on 1 GPU (N x more gradient accumulation) and on N GPUs, per backend.

    python scripts/scaling.py --nproc 8 -- --data_dir data/tinyshakespeare --eval_interval 0 --checkpoint_interval 0

Each run goes through train_gpt2.py (torchrun for N > 1) with the config's total_batch_size, so both runs of a
backend take the same optimizer steps on the same tokens (data/loader.py); a config without a fixed global batch is
refused. Writes <results_dir>/scaling_<N>x<gpu>.json (results_dir: out/ unless given)
and .md with, per backend: tokens/s in total and per GPU, scaling efficiency = tokens/s(N) / (N * tokens/s(1)),
and the largest per-step loss difference between the N-GPU and the 1-GPU run, next to the bf16 noise: the largest
per-step loss difference between the 1-GPU runs of two backends (the same math, differently rounded).
"""
import argparse
import json
import os
import sys
from argparse import Namespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from compare_attention import fmt, run_info, run_one  # noqa: E402
from training.config import ConfigError, grad_accum_steps, load_config  # noqa: E402
from training.metrics import gpu_slug  # noqa: E402


def check_same_global_batch(config, overrides, nproc):
    """Refuse, before any run, a comparison whose 1-GPU and N-GPU runs would not train on the same batches."""
    try:
        cfg = load_config(["--config", config, *overrides])
        if cfg.total_batch_size == 0:
            raise ConfigError(f"total_batch_size is 0 (B*T*processes), so 1 and {nproc} GPUs would train on different "
                              f"global batches; set --total_batch_size, e.g. {cfg.batch_size * cfg.seq_len * nproc}")
        for world in (1, nproc):  # divisible on both, or the error says how
            grad_accum_steps(cfg, world)
    except ConfigError as e:
        raise SystemExit(f"error: scaling needs one global batch for both runs: {e}") from None


def max_abs_diff(a, b):
    return max(abs(x - y) for x, y in zip(a, b)) if a and b and len(a) == len(b) else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, required=True, help="GPUs of the multi-GPU runs")
    p.add_argument("--backends", nargs="+", default=["sdpa", "triton"])
    p.add_argument("--config", default="gpt2_124m_short")
    p.add_argument("--compile", default="on", choices=["on", "off"])
    p.add_argument("--results_dir", default=os.path.join(ROOT, "out"), help="results/ for the repo's own figures")
    p.add_argument("overrides", nargs="*", help="flags for train_gpt2.py, after --")
    args = p.parse_args(argv)
    check_same_global_batch(args.config, args.overrides, args.nproc)

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    name = f"scaling_{args.nproc}x{gpu_slug(gpu)}"
    runs = {}
    for nproc in (1, args.nproc):
        for backend in args.backends:
            run_args = Namespace(nproc=nproc, config=args.config, overrides=args.overrides)
            out_dir = os.path.join(args.results_dir, "runs", name, f"{backend}-{nproc}gpu")
            row, summary = run_one(backend, args.compile == "on", run_args, out_dir)
            runs[(backend, nproc)] = (row, summary)

    one_gpu_losses = [s["loss"] for b in args.backends for r, s in [runs[(b, 1)]] if s]
    noise = max_abs_diff(*one_gpu_losses[:2]) if len(one_gpu_losses) >= 2 else None
    rows = []
    for backend in args.backends:
        (row1, s1), (rowN, sN) = runs[(backend, 1)], runs[(backend, args.nproc)]
        ok = s1 is not None and sN is not None
        rows.append(dict(
            backend=backend, status="ok" if ok else f"1 GPU: {row1['status']}; {args.nproc} GPUs: {rowN['status']}",
            tok_per_s_1gpu=s1 and s1["mean_tok_per_s"], tok_per_s=sN and sN["mean_tok_per_s"],
            tok_per_s_per_gpu=sN and sN["mean_tok_per_s"] / args.nproc,
            ms_1gpu=s1 and s1["mean_ms"], ms=sN and sN["mean_ms"], mfu=sN and sN["mean_mfu"],
            efficiency=sN["mean_tok_per_s"] / (args.nproc * s1["mean_tok_per_s"]) if ok else None,
            max_loss_diff_vs_1gpu=max_abs_diff(s1["loss"], sN["loss"]) if ok else None,
            steps=len(sN["loss"]) if ok else None))

    first = next((s for r, s in runs.values() if s), {})
    report = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), config=args.config,
                  nproc=args.nproc, overrides=args.overrides, timing=first.get("timing"),
                  **run_info(first),
                  total_batch_size=first.get("config", {}).get("total_batch_size"),
                  bf16_noise_between_backends_1gpu=noise, rows=rows)
    base = os.path.join(args.results_dir, name)
    with open(f"{base}.json", "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(report)
    with open(f"{base}.md", "w") as f:
        f.write(table + "\n")
    print(f"\n{table}\nwrote {base}.json and .md")


def markdown_table(report):
    n = report["nproc"]
    lines = [f"| backend | tokens/s, 1 GPU | tokens/s, {n} GPUs | per GPU | scaling efficiency | MFU ({n} GPUs) "
             f"| max per-step loss diff, {n} vs 1 GPU |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['backend']} | {r['tok_per_s_1gpu']:,.0f} | {r['tok_per_s']:,.0f} | {r['tok_per_s_per_gpu']:,.0f} "
                     f"| {r['efficiency']:.3f} | {fmt(r['mfu'], '.1%')} | {r['max_loss_diff_vs_1gpu']:.2e} |")
    lines.append("")
    lines.append(f"bf16 noise, the largest per-step loss difference between the 1-GPU runs of "
                 f"{' and '.join(r['backend'] for r in report['rows'])}: {fmt(report['bf16_noise_between_backends_1gpu'], '.2e')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
