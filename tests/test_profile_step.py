"""scripts/profile_step.py's trace analysis on a hand-made Chrome trace whose busy time, idle gaps and categories are
known by construction."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import profile_step  # noqa: E402


def kernel(name, ts, dur):
    return {"cat": "kernel", "ph": "X", "name": name, "ts": ts, "dur": dur}


def test_busy_time_idle_gaps_and_categories(tmp_path):
    # Two steps, times in microseconds. Kernels on two streams overlap from 150 to 200 (counted once); the GPU
    # idles from 300 to 400 and from 700 to 1000.
    events = [kernel("nvjet_sm90_gemm", 0, 200), kernel("cudnn_generated_fort_native_sdpa_fprop", 150, 150),
              kernel("triton_poi_fused_gelu_3", 400, 300), kernel("_cross_entropy_kernel", 1000, 500),
              {"cat": "cpu_op", "ph": "X", "name": "aten::mm", "ts": 0, "dur": 5000}]  # not a GPU kernel
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    p = profile_step.analyse(str(path), steps=2)
    assert p["wall_ms_per_step"] == pytest.approx(1.5 / 2)
    assert p["gpu_busy_ms_per_step"] == pytest.approx(1.1 / 2)  # 0-300, 400-700, 1000-1500
    assert p["gpu_idle_ms_per_step"] == pytest.approx(0.4 / 2)
    assert [(g["ms"], g["after"], g["before"]) for g in p["largest_idle_gaps"]] == [
        (pytest.approx(0.3), "triton_poi_fused_gelu_3", "_cross_entropy_kernel"),
        (pytest.approx(0.1), "cudnn_generated_fort_native_sdpa_fprop", "triton_poi_fused_gelu_3")]
    assert {cat: d["ms"] for cat, d in p["categories"].items()} == {
        "matmul": pytest.approx(0.1), "attention": pytest.approx(0.075), "GELU": pytest.approx(0.15),
        "LM head + cross-entropy": pytest.approx(0.25)}


def test_a_written_profile_reaches_the_readme_table(tmp_path, monkeypatch):
    """write_report names the file as update_readme.py looks for it: the profile shows up in the README's table."""
    import update_readme
    from training.metrics import write_report

    record = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11", triton="3.6", cuda="13.0", cudnn=91900, date="today",
                  command="python scripts/profile_step.py", mean_ms=964.4, peak_mem_gib=28.3,
                  profile={"categories": {"matmul": {"ms": 561.0}}, "gpu_idle_ms_per_step": 14.0})
    path = write_report(record, str(tmp_path / "results"), "profile_gpt2_124m_short_ce_kernel")
    assert os.path.basename(path) == "profile_gpt2_124m_short_ce_kernel_h100.json"
    assert json.load(open(path)) == record
    assert write_report({"gpu": None}, str(tmp_path), "sample_speed").endswith("sample_speed_cpu.json")
    monkeypatch.setattr(update_readme, "ROOT", str(tmp_path))
    table = update_readme.profile_block()
    assert "| matmul | 561 |" in table and "**964**" in table and "NVIDIA H100 80GB HBM3" in table
