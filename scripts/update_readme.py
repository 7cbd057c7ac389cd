"""Regenerate the README's results from the JSON files in results/: python scripts/update_readme.py

Every figure in the README's Results section comes from here; nothing there is typed by hand. Each block sits
between `<!-- results:NAME -->` and `<!-- /results:NAME -->` markers and is replaced whole.
"""
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from compare_attention import markdown_table  # noqa: E402


def load(path):
    with open(path) as f:
        return json.load(f)


def provenance(report):
    return (f"{report['gpu']}, torch {report['torch']}, triton {report['triton']}, CUDA {report.get('cuda')}, "
            f"cuDNN {report.get('cudnn')}, {report['date']}. Command: `{report['command']}`")


def step49_block():
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "compare_*.json"))):
        report = load(path)
        if not report.get("gpu"):
            continue  # CPU trial runs are not results
        name = os.path.basename(path)[:-5]
        out += [f"**{report['gpu']}** (`results/{name}.json`; {report['timing']}):", "",
                markdown_table(report["rows"]), "", f"<sub>{provenance(report)}</sub>", "",
                f"![loss curves and ms/step](results/{name}.png)", ""]
    ref = load(os.path.join(ROOT, "results", "reference_a100.json"))
    out += [f"For comparison, {ref['source']}: on an {ref['gpu']} with torch.compile, "
            f"{ref['naive_ms']} ms/step with naive attention and {ref['flash_ms']} ms/step with flash attention "
            f"({ref['naive_ms'] / ref['flash_ms']:.2f}×), at the same loss."]
    return "\n".join(out)


def bench_block():
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "attention_bench_*.json"))):
        report = load(path)
        out += [f"**{report['gpu']}** (`results/{os.path.basename(path)}`):", ""]
        for shape, rows in report["shapes"].items():
            out += [f"{shape}, bf16, causal: median ms (TFLOP/s)", "",
                    "| backend | forward | backward | forward+backward | peak memory (MiB) |", "|---|---|---|---|---|"]
            for name, r in rows.items():
                if r.get("error"):
                    out.append(f"| {name} | {r['error']} | | | |")
                    continue
                cells = [f"{r[k]['ms']:.3f} ({r[k]['tflops']:.0f})" if r.get(k) else "–" for k in ("fwd", "bwd", "fwd_bwd")]
                out.append(f"| {name} | {' | '.join(cells)} | {r['peak_mib']:.0f} |")
            out.append("")
        out.append(f"<sub>{provenance(report)}</sub>")
    return "\n".join(out)


def main():
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    for name, block in (("step49", step49_block), ("attention_bench", bench_block)):
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"README.md has no <!-- results:{name} --> ... <!-- /results:{name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + block() + "\n" + m.group(2), text)
    with open(path, "w") as f:
        f.write(text)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
