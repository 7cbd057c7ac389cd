"""Experiment: the forward kernel with TMA tensor descriptors (and automatic warp specialisation) against the
pointer kernel and cuDNN, per config, GPU time of the forward kernel alone. Not part of the repo."""
import importlib.util, json, os, sys, time, traceback
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
import torch, triton
from bench_attention import kernel_ms, gpu_ms, views
from attention import triton as base, sdpa
from training.metrics import environment

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

mods = {"pointer": base, "tma": load("attn_tma", "scripts/experiment_fwd_tma/attn_tma.py"), "tma_ws": load("attn_tmaws", "scripts/experiment_fwd_tma/attn_tmaws.py")}
CFG = {64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 32, 4, 4)],
       128: [(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (64, 32, 4, 3)]}
out = {"env": environment(torch.device("cuda")), "results": {}}
for D in (64, 128):
    for T in (1024, 4096, 16384):
        B, H = 16384 // T, 768 // D
        qkv, q, k, v, do = views(B, H, T, D)
        flops = 4 * B * H * T * T * D / 2
        row = out["results"][f"D={D} T={T}"] = {}
        row["cudnn"] = gpu_ms(lambda: sdpa.causal_attention(q, k, v))
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        ref, _ = base.attention_forward(qd, kd, vd, triton.Config(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3))
        for name, m in mods.items():
            for bm, bn, w, s in CFG[D]:
                c = triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                label = f"{name} {bm}x{bn} w{w} s{s}"
                try:
                    t0 = time.perf_counter()
                    o, _ = m.attention_forward(qd, kd, vd, c)
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    err = (o.float() - ref.float()).abs().max().item()
                    ms = kernel_ms(lambda: m.attention_forward(qd, kd, vd, c), "_attn_fwd")
                    row[label] = dict(ms=ms, tflops=flops / ms * 1e-9, max_diff_vs_pointer=err, first_s=first)
                except Exception as e:
                    row[label] = dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")
                print(f"D={D} T={T} {label}: {row[label]}", flush=True)
        best = {n: min((r["ms"] for l, r in row.items() if l.startswith(n + " ") and isinstance(r, dict) and "ms" in r), default=None) for n in mods}
        print(f"== D={D} T={T} cudnn {row['cudnn']:.4f} ms; best " + ", ".join(f"{n} {b:.4f} ({row['cudnn']/b:.3f}x cudnn)" if b else f"{n} none" for n, b in best.items()), flush=True)
        json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "fwd_tma.json"), "w"), indent=1)
