"""Generation speed with and without the KV cache: tokens/s of GPT.generate on a GPU.

    python scripts/bench_sample.py --out_dir results   # writes results/sample_speed_<gpu>.json; update_readme.py makes the table

GPT-2 (124M) with random weights: nothing to download, and the work of a step does not depend on the weights (top-k
50 sampling draws a token either way). A 16-token prompt, 512 new tokens, 1, 8 and 64 sequences at a time, through
sample.py's timed generate (bf16 autocast, as in training), sdpa attention (with the cache, the backend computes
only the prompt: each new token goes through the shared decode attention). Each case runs 3 times: the first, cold
run is what a single `sample.py` call sees (kernels loaded, per-shape plans built: cuDNN's sdpa builds one for each
new sequence length), the figure is the median of the other 2. tokens/s counts the new tokens of all sequences, the
prompt's pass included in the time.
Also records whether greedy decoding in fp32 gives the same tokens with and without the cache on this GPU.
"""
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from model import GPT, GPTConfig  # noqa: E402
from sample import generate_timed  # noqa: E402
from training.metrics import gpu_benchmark, write_report  # noqa: E402

PROMPT, NEW_TOKENS, BATCHES, REPEATS = 16, 512, (1, 8, 64), 2
CASES = [("sdpa", False), ("sdpa", True)]


def tokens_per_s(model, batch, use_cache, device):
    """tokens/s of a cold run, then of REPEATS warm runs."""
    idx = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device=device)
    generator = torch.Generator(device).manual_seed(0)
    runs = [batch * NEW_TOKENS / generate_timed(model, idx, device, max_new_tokens=NEW_TOKENS, top_k=50,
                                                generator=generator, use_cache=use_cache)[1] for _ in range(REPEATS + 1)]
    return runs[0], runs[1:]


def greedy_check(model, device):
    """New tokens equal with and without the cache, greedy in fp32: 4 sequences, 16-token prompts, 64 new tokens."""
    idx = torch.randint(0, model.config.vocab_size, (4, PROMPT), device=device)
    cached = model.generate(idx, 64, top_k=1)[:, PROMPT:]
    uncached = model.generate(idx, 64, top_k=1, use_cache=False)[:, PROMPT:]
    return dict(equal=int((cached == uncached).sum()), of=cached.numel())


def main(argv=None):
    args, env = gpu_benchmark(__doc__.splitlines()[0], argv)
    device = torch.device("cuda")
    rows, checks = [], {}
    for attention, use_cache in CASES:
        torch.manual_seed(0)  # the same weights for every backend
        model = GPT(GPTConfig(attention=attention)).to(device).eval()
        checks.setdefault(attention, greedy_check(model, device))
        for batch in BATCHES:
            cold, warm = tokens_per_s(model, batch, use_cache, device)
            rows.append(dict(attention=attention, cache=use_cache, batch=batch, tokens_per_s=statistics.median(warm),
                             warm_runs=warm, cold_tokens_per_s=cold))
            print(f"{attention:6s} cache={str(use_cache):5s} batch {batch:3d}: {rows[-1]['tokens_per_s']:10,.0f} tokens/s "
                  f"(warm runs {', '.join(f'{r:,.0f}' for r in warm)}; cold {cold:,.0f})", flush=True)
    for attention, check in checks.items():
        print(f"greedy fp32, {attention}: {check['equal']} of {check['of']} new tokens equal with and without the cache")
    report = dict(**env, model="GPT-2 124M, random weights", prompt_tokens=PROMPT, new_tokens=NEW_TOKENS, top_k=50,
                  repeats=REPEATS, rows=rows, greedy_fp32_cache_equals_no_cache=checks)
    write_report(report, args.out_dir, "sample_speed")


if __name__ == "__main__":
    main()
