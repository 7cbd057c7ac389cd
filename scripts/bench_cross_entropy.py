"""The fused loss's elementwise half on one chunk of logits: torch (compiled by Inductor) against the one-pass kernel.

    python scripts/bench_cross_entropy.py --out_dir results   # writes results/cross_entropy_<gpu>.json

One chunk as the GPT-2 (124M) configuration makes it: 16,384 rows of bf16 logits over the padded vocab of 50,304.
Both paths return each row's loss and the gradient (softmax - onehot) / N in bf16. Times are medians of
triton.testing.do_bench; GB/s counts what one pass must move (the logits read once, the gradient written once), so
a path whose second pass reads DRAM again shows as lower bandwidth. The kernel is also timed at other launch settings
(tile width, warps) than the ones it fixes.
"""
import functools
import os
import sys

import torch
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cross_entropy  # noqa: E402
from model import loss_and_grad  # noqa: E402
from training.metrics import gpu_benchmark, write_report  # noqa: E402

ROWS, VOCAB = 16384, 50304
LAUNCHES = [(block, warps) for block in (2048, 4096, 8192) for warps in (8, 16, 32)]  # (BLOCK_V, num_warps)


def main(argv=None):
    args, env = gpu_benchmark(__doc__.splitlines()[0], argv)
    g = torch.Generator("cuda").manual_seed(0)
    logits = (4 * torch.randn(ROWS, VOCAB, device="cuda", generator=g)).bfloat16()
    targets = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=g)
    one_pass_gb = 2 * logits.numel() * logits.element_size() / 1e9
    paths = {"torch (torch.compile)": torch.compile(loss_and_grad, fullgraph=True)}
    paths["kernel as the model calls it"] = cross_entropy.loss_and_grad
    for block, warps in LAUNCHES:
        paths[f"kernel BLOCK_V={block} num_warps={warps}"] = functools.partial(
            cross_entropy.loss_and_grad, block=block, num_warps=warps)
    reference_loss, reference_grad = loss_and_grad(logits, targets, 1 / ROWS)
    rows = []
    for name, fn in paths.items():
        loss, grad = fn(logits, targets, 1 / ROWS)
        ms = do_bench(lambda: fn(logits, targets, 1 / ROWS))
        rows.append(dict(path=name, ms=ms, gb_per_s=one_pass_gb / ms * 1e3,
                         max_loss_error=(loss - reference_loss).abs().max().item(),
                         max_grad_error=(grad.float() - reference_grad.float()).abs().max().item()))
        print(f"{name:44s} {ms:7.3f} ms {rows[-1]['gb_per_s']:7.0f} GB/s  max |loss - torch| "
              f"{rows[-1]['max_loss_error']:.1e}, |grad - torch| {rows[-1]['max_grad_error']:.1e}", flush=True)
    report = dict(**env, rows_per_chunk=ROWS, vocab=VOCAB, dtype="bfloat16", one_pass_gb=one_pass_gb, results=rows)
    write_report(report, args.out_dir, "cross_entropy")


if __name__ == "__main__":
    main()
