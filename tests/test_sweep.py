"""scripts/sweep_seq_len.py's bookkeeping on the CPU, the GPU measurement replaced by made-up times: every backend and
kernel experiment (--variant) gets a row per head dim and T, the ratios against cuDNN are its time over theirs, and
update_readme.py shows the experiment's column."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import sweep_seq_len  # noqa: E402
import update_readme  # noqa: E402

SPEED = {"naive": 10.0, "sdpa default": 1.0, "sdpa FLASH_ATTENTION": 1.5, "triton": 1.25, "triton v2": 0.8}


def made_up(name, B, H, T, D):
    """Times proportional to T (B·T fixed) and to the backend's factor in SPEED."""
    t = SPEED[name] * T / 1000
    return {"fwd_ms": t, "bwd_ms": 2 * t, "fwd_bwd_ms": 3 * t, "fwd_gpu_ms": 0.9 * t, "bwd_gpu_ms": 1.8 * t,
            "fwd_bwd_gpu_ms": 2.7 * t, "peak_mib": 100.0, "fwd_tflops": 1.0, "bwd_tflops": 1.0, "fwd_bwd_tflops": 1.0,
            "fwd_bwd_gpu_tflops": 1.0, "first_call_s": 0.1}


def test_a_variant_gets_rows_ratios_and_a_readme_column(tmp_path, monkeypatch):
    env = dict(gpu="NVIDIA H200", torch="2.11", triton="3.6", cuda="13.0", cudnn=91900, date="today",
               command="python scripts/sweep_seq_len.py")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sweep_seq_len, "environment", lambda device: env)
    monkeypatch.setattr(sweep_seq_len.bench_attention, "load_variant", lambda name, path: path)
    monkeypatch.setattr(sweep_seq_len.bench_attention, "backends", lambda variants: {n: n for n in SPEED})
    monkeypatch.setattr(sweep_seq_len, "measure", made_up)
    monkeypatch.setattr(sys, "argv", ["sweep_seq_len.py", "--out_dir", str(tmp_path / "results"),
                                      "--variant", "v2=path/to/other_triton.py"])
    sweep_seq_len.main()

    record = json.load(open(tmp_path / "results" / "attention_sweep_h200.json"))
    assert (tmp_path / "results" / "attention_sweep_h200.png").stat().st_size > 10_000
    for group, names in (("D=64 H=12", ["naive", "sdpa default", "sdpa FLASH_ATTENTION", "triton", "triton v2"]),
                         ("D=128 H=6", ["sdpa default", "sdpa FLASH_ATTENTION", "triton", "triton v2"])):
        assert list(record["results"][group]) == [str(T) for T in sweep_seq_len.SEQ_LENS]
        for T in sweep_seq_len.SEQ_LENS:
            assert list(record["results"][group][str(T)]) == names
            ratios = record["ratios"][group]
            assert ratios[str(T)]["fwd_bwd gpu"] == pytest.approx(1.0 / 1.25)
            assert ratios[f"{T} v2"]["fwd_bwd gpu"] == pytest.approx(1.0 / 0.8)
            assert ratios[f"{T} v2"]["fwd do_bench"] == pytest.approx(1.0 / 0.8)

    monkeypatch.setattr(update_readme, "ROOT", str(tmp_path))
    table = update_readme.sweep_block()
    assert "| T | sdpa default | sdpa FLASH_ATTENTION | triton | triton v2 |" in table
    # D=128 at T=1024: fwd+bwd = 3 x SPEED x 1.024 ms; triton against sdpa default 1 / 1.25 in both clocks
    assert "| 1024 | 3.07 / 100 | 4.61 / 100 | 3.84 / 100 | 2.46 / 100 | 0.80 / 0.80 | 0.80 / 0.80 |" in table
