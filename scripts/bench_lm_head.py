"""The fused loss's three matmuls on one chunk, in bf16 and in FP8 (torch._scaled_mm), with what FP8 costs around them.

    python scripts/bench_lm_head.py --out_dir results   # writes results/lm_head_matmuls_<gpu>.json

One chunk as the GPT-2 (124M) configuration makes it: h (16,384 rows, 768) against the LM head's weight (50,304,
768). Per chunk the loss needs logits = h @ Wᵀ, then grad_h = grad @ W and grad_W = gradᵀ @ h. FP8 halves the bytes
per operand and doubles the tensor cores' rate on Hopper, but cuBLAS's FP8 matmul takes its second operand
column-major: W must be kept transposed too, and gradᵀ @ h needs the (rows, vocab) gradient and h transposed, a pass
over each (cross_entropy.transposed). Every FP8 row is timed with the casts and copies it needs listed beside it, and
its error against the fp32 product of the same bf16 inputs is reported (max |error| / max |reference|). Times are
medians of triton.testing.do_bench (L2 flushed).
"""
import os
import sys

import torch
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cross_entropy  # noqa: E402
from model import FP8_GRAD, FP8_GRAD_SCALE, _to_fp8 as to_fp8  # noqa: E402  (the model's per-tensor cast)
from training.metrics import gpu_benchmark, write_report  # noqa: E402

ROWS, VOCAB, C = 16384, 50304, 768
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def main(argv=None):
    args, env = gpu_benchmark(__doc__.splitlines()[0], argv)
    g = torch.Generator("cuda").manual_seed(0)
    h = torch.randn(ROWS, C, device="cuda", generator=g).bfloat16()
    w = (0.02 * torch.randn(VOCAB, C, device="cuda", generator=g)).bfloat16()
    probs = torch.softmax(4 * torch.randn(ROWS, VOCAB, device="cuda", generator=g), 1)
    grad = (probs / ROWS).bfloat16()
    h8, sh = to_fp8(h, E4M3)
    w8, sw = to_fp8(w, E4M3)
    w8t = w8.t().contiguous()
    g8, sg = to_fp8(grad, E5M2)
    g8t, h8t = g8.t().contiguous(), h8.t().contiguous()
    # The model's choice (model.FP8_GRAD, FP8_GRAD_SCALE): the gradient in e5m2 times 2^15, as the cross-entropy writes
    # it; and the one before it, e4m3 times 256, which rounds every probability below ~4e-6 to zero.
    g8m, sgm = (probs * FP8_GRAD_SCALE).to(FP8_GRAD), torch.full((), 1 / (FP8_GRAD_SCALE * ROWS), device="cuda")
    g8mt = g8m.t().contiguous()
    g8old, sgold = (probs * 256).to(E4M3), torch.full((), 1 / (256 * ROWS), device="cuda")
    g8oldt = g8old.t().contiguous()
    rowwise_h = (h.abs().amax(1, keepdim=True).float() / 448).clamp(min=1e-12)
    h8r = (h / rowwise_h).to(E4M3)
    rowwise_w = (w.abs().amax(1, keepdim=True).float() / 448).clamp(min=1e-12)
    w8r = (w / rowwise_w).to(E4M3)

    def mm8(a, b, sa, sb, fast=True):
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast)

    flops = 2 * ROWS * VOCAB * C
    reference = {"logits": h.float() @ w.float().t(), "grad_h": grad.float() @ w.float(),
                 "grad_w": grad.float().t() @ h.float()}
    cases = [  # (matmul, path, function, extra work an FP8 path needs for it)
        ("logits", "bf16", lambda: h @ w.t(), ""),
        ("logits", "fp8 e4m3, per-tensor scales, fast accumulation", lambda: mm8(h8, w8.t(), sh, sw), "h cast"),
        ("logits", "fp8 e4m3, per-tensor scales, exact accumulation", lambda: mm8(h8, w8.t(), sh, sw, False), "h cast"),
        ("logits", "fp8 e4m3, row-wise scales, fast accumulation",
         lambda: mm8(h8r, w8r.t(), rowwise_h, rowwise_w.t()), "h cast"),
        ("grad_h", "bf16", lambda: grad @ w, ""),
        ("grad_h", "fp8 e5m2 x e4m3, per-tensor scales, fast accumulation", lambda: mm8(g8, w8t.t(), sg, sw),
         "grad written in fp8; W transposed once per call"),
        ("grad_h", "fp8 e4m3 (grad x 256) x e4m3, fast accumulation", lambda: mm8(g8old, w8t.t(), sgold, sw),
         "grad written in fp8; W transposed once per call"),
        ("grad_h", "fp8 e4m3 (grad x 256) x e4m3, exact accumulation", lambda: mm8(g8old, w8t.t(), sgold, sw, False),
         "grad written in fp8; W transposed once per call"),
        ("grad_h", "fp8 e5m2 (grad x 2^15) x e4m3, exact accumulation (the model's)",
         lambda: mm8(g8m, w8t.t(), sgm, sw, False), "grad written in fp8; W transposed once per call"),
        ("grad_w", "bf16", lambda: grad.t() @ h, ""),
        ("grad_w", "fp8 e5m2 x e4m3, per-tensor scales, fast accumulation", lambda: mm8(g8t, h8t.t(), sg, sh),
         "grad and h transposed"),
        ("grad_w", "fp8 e4m3 (grad x 256) x e4m3, exact accumulation",
         lambda: mm8(g8oldt, h8t.t(), sgold, sh, False), "grad and h transposed"),
        ("grad_w", "fp8 e5m2 (grad x 2^15) x e4m3, exact accumulation (the model's)",
         lambda: mm8(g8mt, h8t.t(), sgm, sh, False), "grad and h transposed"),
    ]
    side = [  # the casts and copies around the FP8 matmuls, timed alone
        ("cast h to fp8 (amax + scale + cast)", lambda: to_fp8(h, E4M3)),
        ("cast W to fp8 and transpose (once per call, not per chunk)", lambda: to_fp8(w, E4M3)[0].t().contiguous()),
        ("cast grad to fp8 (amax + scale + cast)", lambda: to_fp8(grad, E5M2)),
        ("transpose the fp8 grad (torch)", lambda: g8.t().contiguous()),
        ("transpose the fp8 grad (cross_entropy.transposed)", lambda: cross_entropy.transposed(g8m)),
        ("transpose h (cross_entropy.transposed)", lambda: cross_entropy.transposed(h8)),
    ]
    rows = []
    for matmul, path, fn, extra in cases:
        out = fn()
        ref = reference[matmul]
        ms = do_bench(fn)
        rows.append(dict(matmul=matmul, path=path, ms=ms, tflops=flops / ms / 1e9, needs=extra,
                         rel_error=((out.float() - ref).abs().max() / ref.abs().max()).item()))
        print(f"{matmul:7s} {path:56s} {ms:7.3f} ms {rows[-1]['tflops']:6.0f} TFLOP/s  "
              f"error {rows[-1]['rel_error']:.1e}", flush=True)
    for name, fn in side:
        fn()
        ms = do_bench(fn)
        rows.append(dict(matmul=None, path=name, ms=ms))
        print(f"{'':7s} {name:56s} {ms:7.3f} ms", flush=True)
    report = dict(**env, rows_per_chunk=ROWS, vocab=VOCAB, n_embd=C, results=rows)
    write_report(report, args.out_dir, "lm_head_matmuls")


if __name__ == "__main__":
    main()
