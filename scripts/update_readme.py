"""Regenerate the result tables of README.md and results/README.md from the JSON in results/:

    python scripts/update_readme.py

Every figure in either file comes from here; nothing there is typed by hand. Each block sits between
`<!-- results:NAME -->` and `<!-- /results:NAME -->` markers and is replaced whole. README.md holds the headline
blocks (BLOCKS below), results/README.md one block per experiment, the current figures first and H100 before H200.
A file in results/ that neither file shows belongs in results/archive/, listed in its README (tests/test_readme.py).
"""
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from compare_attention import markdown_table  # noqa: E402
import compare_settings  # noqa: E402
import scaling  # noqa: E402


def load(path):
    with open(path) as f:
        return json.load(f)


def provenance(report):
    return (f"{report['gpu']}, torch {report['torch']}, triton {report['triton']}, CUDA {report['cuda']}, "
            f"cuDNN {report['cudnn']}, {report['date']}. Command: `{report['command']}`")


def timing(report):
    # Records written before the fix of 2026-11-24 start this text with the first run's ms/step: not every row's.
    return re.sub(r"^[\d.]+ ms/step, ", "", report["timing"])


# Each comparison experiment's tables in results/README.md, the current figures first and H100 before H200:
# (stem of results/compare_<stem>.json, what that run was). A new comparison is shown once it is listed here.
STEP49 = [
    ("step49_h100", "the classic run: every backend, torch.compile on and off"),
    ("step49_h200", "the classic run, torch.compile on"),
    ("step49_fast_h100", "with the speed settings the full configuration had then: `--bf16_params true --loss_chunk "
                         "16384`"),
    ("step49_fast_h200", "with the full configuration's speed settings: `--bf16_params true --loss_chunk 16384 "
                         "--recompute_gelu true --overlap_steps true`"),
    ("step49_eval_h200", "the classic run with an evaluation every 20 steps (`--eval_interval 20 --eval_batches 2`)"),
]
FULL = [
    ("gpt2_124m_short_h100", "the configuration before the cross-entropy kernel, `recompute_gelu` and `overlap_steps` "
                             "(the newest H100 run)"),
    ("gpt2_124m_short_h200", "the configuration, every speed setting of `configs/gpt2_124m_short.toml` on"),
    ("gpt2_124m_short_plain_h100", "the speed settings off (`--bf16_params false --loss_chunk 0`), in the same device "
                                   "call as the H100 table above"),
    ("gpt2_124m_short_seed1338_h100", "sdpa with seed 1338, the same call: the loss's spread between two seeds, beside "
                                      "which a backend's or a setting's Δloss is read"),
    ("gpt2_124m_short_bf16_lm_head_h200", "`--fp8_lm_head false`, the baseline of the next table (one device call)"),
    ("gpt2_124m_short_fp8_lm_head_h200", "`--fp8_lm_head true`, the opt-in FP8 LM head, the same call"),
    ("gpt2_124m_short_fp8_lm_head_triton_h200", "`--fp8_lm_head true` with the triton backend, the next call"),
    ("gpt2_124m_short_b16_val_fp8_false_h200", "B=16 (32 micro-steps per step) with an evaluation every 25 steps, "
                                               "`fp8_lm_head` off: the validation losses below"),
    ("gpt2_124m_short_b16_val_fp8_true_h200", "the same with `fp8_lm_head` on"),
]
LONG_CONTEXT = [("long_context_h200", "T = 8192, B = 2, torch.compile on")]


def comparison_table(stem, caption):
    """The table of scripts/compare_attention.py's results/compare_<stem>.json, with its provenance and plot."""
    report = load(os.path.join(ROOT, "results", f"compare_{stem}.json"))
    return [f"**{report['nproc']} x {report['gpu']}**, {caption} (`results/compare_{stem}.json`; ms/step: "
            f"{timing(report)}):", "", markdown_table(report["rows"]), "", f"<sub>{provenance(report)}</sub>", "",
            f"![loss curves and ms/step](results/compare_{stem}.png)", ""]


def comparison_block(experiment):
    return "\n".join(line for stem, caption in experiment for line in comparison_table(stem, caption))


def reference_a100():
    ref = load(os.path.join(ROOT, "results", "reference_a100.json"))
    return (f"For comparison, {ref['source']}: on an {ref['gpu']} with torch.compile, {ref['naive_ms']} ms/step with "
            f"naive attention and {ref['flash_ms']} ms/step with flash attention "
            f"({ref['naive_ms'] / ref['flash_ms']:.2f}x), at the same loss (`results/reference_a100.json`).")


def step49_block():
    return comparison_block(STEP49) + "\n" + reference_a100()


def step49_headline_block():
    """README.md: the classic experiment, the first of STEP49 (the H100's)."""
    return "\n".join(comparison_table(*STEP49[0]) + [reference_a100()])


def full_training_block():
    return comparison_block(FULL)


def full_vs_llmc_block(stem="gpt2_124m_short_h100"):
    """README.md: the full configuration on the H100, this repository's run there (FULL's) beside llm.c's figures."""
    report = load(os.path.join(ROOT, "results", f"compare_{stem}.json"))
    ref = load(os.path.join(ROOT, "results", "reference_llmc_h100.json"))
    window = timing(report).split(" (")[0]
    lines = ["| trainer | measured | ms/step | tokens/s | memory (GiB) |", "|---|---|---|---|---|"]
    lines += [f"| this repository, {r['backend']}, torch.compile | {report['date'][:10]}, {window} | {r['ms']:.1f} "
              f"| {r['tok_per_s'] / 1e3:.1f}K | {r['peak_mem_gib']:.1f} peak allocated |"
              for r in report["rows"] if r["status"] == "ok"]
    lines += [f"| {run['trainer']} | {run['date']}, {run['window']} | {run['ms']} | {run['tokens_per_s_k']}K "
              f"| {run['memory_gib']} {run['memory']} |" for run in ref["runs"]]
    return "\n".join([f"**1 x {report['gpu']}**, {ref['configuration']}. This repository: {dict(FULL)[stem]} "
                      f"(`results/compare_{stem}.json`); llm.c: {ref['source']} (`results/reference_llmc_h100.json`). "
                      "One run per row; memory as each trainer reports it (PyTorch's peak allocated, llm.c's as "
                      "noted):", "", *lines, "", f"<sub>This repository: {provenance(report)}</sub>"])


def validation_block(config="gpt2_124m_short"):
    """The validation losses of the comparison runs that evaluated (evals.jsonl in each run's folder), per step."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "results", f"compare_{config}_*.json"))):
        report, name = load(path), os.path.basename(path)[len("compare_"):-len(".json")]
        gpu = name.rsplit("_", 1)[1]
        for row in report["rows"]:
            run = os.path.join(ROOT, "results", "runs", gpu, name.rsplit("_", 1)[0],
                               f"{row['backend']}-{'compile' if row['compile'] else 'eager'}", "evals.jsonl")
            evals = [json.loads(line) for line in open(run)] if os.path.exists(run) else []
            evals = [e for e in evals if e["step"] > 0 and "val_loss" in e]
            if evals:
                out.append((name, row["backend"], evals))
    if not out:
        return ""
    steps = sorted({e["step"] for _, _, evals in out for e in evals})
    lines = ["| run | backend | " + " | ".join(f"val loss, step {s}" for s in steps) + " |",
             "|---|---" + "|---:" * len(steps) + "|"]
    for name, backend, evals in out:
        by_step = {e["step"]: e["val_loss"] for e in evals}
        lines.append(f"| `{name}` | {backend} | " + " | ".join(f"{by_step[s]:.4f}" if s in by_step else "–"
                                                              for s in steps) + " |")
    return "\n".join(lines)


def long_context_block():
    return comparison_block(LONG_CONTEXT)


def scaling_block():
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "scaling_*.json"))):
        report = load(path)
        if not report.get("gpu"):
            continue
        out += [f"**{report['nproc']} x {report['gpu']}**, {report['config']}, {report['total_batch_size']:,} tokens per "
                f"step (`results/{os.path.basename(path)}`; {timing(report)}):", "", scaling.markdown_table(report), "",
                f"<sub>{provenance(report)}</sub>", ""]
    return "\n".join(out)


def cell(r, kind):
    return f"{r[kind + '_ms']:.3f} ({r[kind + '_tflops']:.0f})"


def bench_block():
    """scripts/bench_attention.py's tables per GPU, every shape."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "attention_bench_*.json"))):
        report = load(path)
        out += [f"**{report['gpu']}** (`results/{os.path.basename(path)}`): median ms (TFLOP/s)", ""]
        for shape, res in report["results"].items():
            out += [f"{shape}, bf16, causal:", "",
                    "| backend | forward | backward | forward+backward | peak memory (MiB) |", "|---|---|---|---|---|"]
            for name, r in res["rows"].items():
                out.append(f"| {name} | {r['error']} | | | |" if "error" in r else
                           f"| {name} | {cell(r, 'fwd')} | {cell(r, 'bwd')} | {cell(r, 'fwd_bwd')} | {r['peak_mib']:.0f} |")
            out += [""] + [f"- triton {k}: {v:.2f}" for k, v in res.get("ratios", {}).items()] + [""]
        out.append(f"<sub>{provenance(report)}</sub>")
    return "\n".join(out)


def paths_block(headline=False):
    """scripts/bench_attention.py --paths per GPU: with headline, the triton backend's default path against cuDNN
    (sdpa's default) as ratios, cuDNN's time over ours (> 1: ours is faster), per head dim and T; else every path's
    times."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "attention_paths_*.json")))[:1 if headline else None]:
        report = load(path)
        out += [f"**{report['gpu']}** (`results/{os.path.basename(path)}`), causal, bf16, B·T = 16,384, H·D = 768, "
                "the model's strided q/k/v views. " + (
                    "cuDNN's time over the triton backend's (above 1: ours is faster) in GPU time (the kernels' "
                    "summed durations) and, for an eager call, wall time:" if headline else
                    "Milliseconds per call: forward GPU time / forward+backward GPU time / eager forward+backward "
                    "wall time / host time to enqueue it:"), ""]
        for group, by_t in report["results"].items():
            names = [n for n in next(iter(by_t.values())) if n != "ratios"]
            if headline:
                out += [f"| {group}, T | " + " | ".join(by_t) + " |", "|---" * (len(by_t) + 1) + "|"]
                for key, label in (("fwd_gpu_ms", "forward, GPU"), ("fwd_bwd_gpu_ms", "forward+backward, GPU"),
                                   ("fwd_bwd_ms", "forward+backward, eager wall")):
                    out.append(f"| {label} | " + " | ".join(f"{rows['ratios']['triton'][key]:.2f}"
                                                           for rows in by_t.values()) + " |")
            else:
                out += [f"| {group}, T | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
                for T, rows in by_t.items():
                    out.append(f"| {T} | " + " | ".join(
                        "{fwd_gpu_ms:.3f} / {fwd_bwd_gpu_ms:.3f} / {fwd_bwd_ms:.3f} / {fwd_bwd_host_ms:.3f}".format(
                            **rows[n]) for n in names) + " |")
            out.append("")
        out.append(f"<sub>{provenance(report)}</sub>")
    return "\n".join(out)


def sweep_block():
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "attention_sweep_*.json"))):
        report = load(path)
        name = os.path.basename(path)[:-5]
        for group, by_t in report["results"].items():
            backends = list(next(iter(by_t.values())))
            out += [f"**{report['gpu']}** (`results/{name}.json`), B·T = {report['shape']['tokens']}, {group}: "
                    "forward+backward ms (do_bench) / "
                    "peak extra memory (MiB); triton's speed against sdpa default (its time / triton's) in GPU time and "
                    "do_bench time", "",
                    "| T | " + " | ".join(backends) + " | triton vs sdpa default: fwd+bwd GPU / do_bench | fwd GPU / "
                    "do_bench |", "|---" * (len(backends) + 3) + "|"]
            for T, rows in by_t.items():
                r = report["ratios"][group][T]
                out.append(f"| {T} | " + " | ".join(rows[b]["error"] if "error" in rows[b] else
                                                     f"{rows[b]['fwd_bwd_ms']:.2f} / {rows[b]['peak_mib']:.0f}"
                                                     for b in backends) +
                           f" | {r['fwd_bwd gpu']:.2f} / {r['fwd_bwd do_bench']:.2f} | {r['fwd gpu']:.2f} / "
                           f"{r['fwd do_bench']:.2f} |")
            out.append("")
        out += [f"![time and memory against T](results/{name}.png)", "", f"<sub>{provenance(report)}</sub>"]
    return "\n".join(out)


def sample_speed_block():
    """Generation tokens/s with and without the KV cache (scripts/bench_sample.py), per GPU."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "sample_speed_*.json"))):
        report = load(path)
        table = {}
        for r in report["rows"]:
            table.setdefault((r["attention"], r["cache"]), {})[r["batch"]] = r
        batches = sorted({r["batch"] for r in report["rows"]})
        out += [f"**{report['gpu']}** (`results/{os.path.basename(path)}`): {report['model']}, "
                f"{report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, top-k {report['top_k']}; "
                f"tokens/s of all B sequences together, median of {report['repeats']} warm runs (the first, cold run's in "
                f"brackets: what one sample.py call sees)", "",
                "| attention | KV cache | " + " | ".join(f"B={b}" for b in batches) + " |",
                "|---|---|" + "---:|" * len(batches)]
        out += [f"| {attention} | {'yes' if cache else 'no'} | " + " | ".join(
                    f"{row[b]['tokens_per_s']:,.0f} ({row[b]['cold_tokens_per_s']:,.0f})" for b in batches) + " |"
                for (attention, cache), row in table.items()]
        if ("sdpa", True) in table and ("sdpa", False) in table:
            out += ["", "KV cache speed-up (sdpa): " + ", ".join(
                f"{table['sdpa', True][b]['tokens_per_s'] / table['sdpa', False][b]['tokens_per_s']:.1f}x at B={b}"
                for b in batches) + "."]
        out += ["", "Greedy fp32 decoding, new tokens equal with and without the cache: " + ", ".join(
            f"{a} {c['equal']}/{c['of']}" for a, c in report["greedy_fp32_cache_equals_no_cache"].items()) + ".",
                "", f"<sub>{provenance(report)}</sub>", ""]
    return "\n".join(out)


# The profiles of TRAINING_NOTES.md's levers, in the order they were added: tag -> what the run had on.
# One table per GPU, one column per profile (results/profile_gpt2_124m_short_<tag>_<gpu>.json), in this order.
PROFILES = {
    "h100": [("chunk0", "plain (before)"), ("chunk8192", "+ fused loss, 8192-row chunks"), ("loader", "+ pinned loader"),
             ("bf16", "+ bf16_params"), ("chunk16k", "+ 16384-row chunks"),
             # a later device call: the same configuration measured again, then with the cross-entropy kernel
             ("before_ce", "the same, later call"), ("ce_kernel", "+ cross-entropy kernel")],
    "h200": [("before", "the above"), ("lossop", "+ loss as one op"), ("budget08", "+ activation_memory_budget 0.8"),
             # the next device call: the loss-op column measured again, then with recompute_gelu
             ("lossop_again", "+ loss as one op, next call"), ("gelu", "+ recompute_gelu (the config)"),
             # a later session: the configuration measured again, then with the FP8 LM head (a setting, off)
             ("fp8_before", "the config, later call"), ("fp8", "+ fp8_lm_head"),
             # the last call of that session: fp8_lm_head as committed, then with grad_W in FP8 too
             ("fp8_again", "fp8_lm_head, later call"), ("fp8_grad_w", "+ grad_W in FP8"),
             # the next session: the gradient in e5m2 times 2^15 instead of e4m3 times 256 (not the same call)
             ("fp8_e5m2", "fp8_lm_head, e5m2 gradient")],
}


def profile_block():
    """GPU time per step by category (scripts/profile_step.py), one column per lever, for the full config."""
    out = []
    for gpu, columns in PROFILES.items():
        paths = [(label, path) for tag, label in columns
                 for path in glob.glob(os.path.join(ROOT, "results", f"profile_gpt2_124m_short_{tag}_{gpu}.json"))]
        if not paths:
            continue
        reports = [(label, load(path)) for label, path in paths]
        categories = list(dict.fromkeys(c for _, r in reports for c in r["profile"]["categories"]))
        cell = lambda r, c: f"{r['profile']['categories'][c]['ms']:.0f}" if c in r["profile"]["categories"] else "–"
        out += [f"**{reports[0][1]['gpu']}**", "",
                "| ms per step | " + " | ".join(label for label, _ in reports) + " |",
                "|---" + "|---:" * len(reports) + "|"]
        out += [f"| {c} | " + " | ".join(cell(r, c) for _, r in reports) + " |" for c in categories]
        out += ["| GPU idle | " + " | ".join(f"{r['profile']['gpu_idle_ms_per_step']:.0f}" for _, r in reports) + " |",
                "| **step (trainer's mean)** | " + " | ".join(f"**{r['mean_ms']:.0f}**" for _, r in reports) + " |",
                "| peak memory (GiB) | " + " | ".join(f"{r['peak_mem_gib']:.1f}" for _, r in reports) + " |",
                "", "Columns from " + ", ".join(f"`results/{os.path.basename(path)}`" for _, path in paths) + ".", "",
                f"<sub>The last column: {provenance(reports[-1][1])}</sub>", ""]
    return "\n".join(out)


def settings_block():
    """The tables of scripts/compare_settings.py: each setting's alternating runs with the GPU's clock and power."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "settings_*.json"))):
        report = load(path)
        if not report.get("gpu"):
            continue  # CPU trial runs are not results
        means = report["mean_ms"]
        out += [f"**{report['setting']}**, `{report['config']}`, {report['nproc']} x {report['gpu']}, {report['attention']} "
                f"(`results/{os.path.basename(path)}`; ms/step: {timing(report)}):", "",
                compare_settings.markdown_table(report["setting"], report["rows"], means), "",
                f"<sub>{provenance(report)}</sub>", ""]
    return "\n".join(out)


# file -> its blocks: (marker name, the function that writes the block). The names are stable: the README's
# kernel section is attention_paths, the sequence-length sweep seq_len_sweep.
BLOCKS = {
    "README.md": [("step49_headline", step49_headline_block), ("full_vs_llmc", full_vs_llmc_block),
                  ("attention_paths", lambda: paths_block(headline=True))],
    os.path.join("results", "README.md"): [
        ("step49", step49_block), ("full_training", full_training_block), ("validation", validation_block),
        ("profile", profile_block), ("settings", settings_block), ("scaling", scaling_block),
        ("long_context", long_context_block), ("attention_bench", bench_block),
        ("attention_paths", paths_block), ("seq_len_sweep", sweep_block),
        ("sample_speed", sample_speed_block)],
}


def render(name):
    """The text of ROOT/name with its blocks regenerated from results/."""
    with open(os.path.join(ROOT, name)) as f:
        text = f.read()
    for marker, block in BLOCKS[name]:
        pattern = re.compile(rf"(<!-- results:{marker} -->\n).*?(<!-- /results:{marker} -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"{name} has no <!-- results:{marker} --> ... <!-- /results:{marker} --> markers")
        content = block().strip() or "_No results yet._"
        if os.path.dirname(name) == "results":  # the blocks link files as seen from the repository's root
            content = content.replace("](results/", "](")
        text = pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(2), text)
    return text


def main():
    for name in BLOCKS:
        path = os.path.join(ROOT, name)
        text = render(name)
        with open(path) as f:
            if f.read() == text:
                print(f"{path} is up to date: its results blocks already match results/")
                continue
        with open(path, "w") as f:
            f.write(text)
        print(f"updated {path}")


if __name__ == "__main__":
    main()
