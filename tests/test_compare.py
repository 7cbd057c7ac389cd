"""scripts/compare_attention.py end to end on the tiny configuration (CPU, compile off)."""
import json
import os
import sys
from argparse import Namespace

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import compare_attention  # noqa: E402

SMALL = ["--vocab_size=128", "--n_layer=1", "--n_embd=32", "--seq_len=16", "--block_size=16", "--max_steps=4",
         "--timing_warmup=1", "--device=cpu"]


def test_table_json_and_plot_come_from_the_runs(data_dir, tmp_path):
    results = tmp_path / "results"
    compare_attention.main(["--config", "tiny", "--backends", "naive", "sdpa", "--compile", "off",
                            "--results_dir", str(results), "--", f"--data_dir={data_dir}", *SMALL])
    report = json.load(open(results / "compare_tiny_cpu.json"))
    assert (results / "compare_tiny_cpu.png").stat().st_size > 10_000
    table = (results / "compare_tiny_cpu.md").read_text()
    rows = {r["backend"]: r for r in report["rows"]}
    assert set(rows) == {"naive", "sdpa"}
    for backend, row in rows.items():
        metrics = [json.loads(line) for line in open(results / "runs" / "cpu" / "tiny" / f"{backend}-eager" / "metrics.jsonl")]
        assert row["status"] == "ok" and row["final_step"] == 3 == metrics[-1]["step"]
        assert row["loss"] == metrics[-1]["loss"]
        assert row["ms"] == pytest.approx(np.mean([m["dt_ms"] for m in metrics[1:]]))
        assert row["peak_mem_gib"] == max(m["peak_mem_gib"] for m in metrics)
        assert row["mfu"] is None and "| – |" in table  # no peak FLOP/s for a CPU
        assert f"| {backend} | off | {row['loss']:.4f} (step 3) |" in table
    assert rows["sdpa"]["dloss_vs_sdpa"] == 0.0
    assert rows["naive"]["dloss_vs_sdpa"] == rows["naive"]["loss"] - rows["sdpa"]["loss"]
    assert rows["sdpa"]["speedup_vs_naive"] == pytest.approx(rows["naive"]["ms"] / rows["sdpa"]["ms"])


def test_a_failing_run_becomes_a_row(tmp_path):
    args = Namespace(nproc=1, config="tiny", overrides=[f"--data_dir={tmp_path / 'missing'}", *SMALL])
    row, summary = compare_attention.run_one("sdpa", False, args, str(tmp_path / "run"))
    assert summary is None and row["status"] == "failed (exit 1)" and "does not exist" in row["error"]
    compare_attention.add_comparisons([row])
    assert "| sdpa | off | failed (exit 1) | | | | | | |" in compare_attention.markdown_table([row])


def test_validation_losses_reach_the_readme_table(data_dir, tmp_path, monkeypatch):
    """update_readme.validation_block reads each compared run's evals.jsonl: every evaluation after step 0, by step."""
    import update_readme
    results = tmp_path / "results"
    compare_attention.main(["--config", "tiny", "--backends", "sdpa", "--compile", "off", "--results_dir",
                            str(results), "--", f"--data_dir={data_dir}", *SMALL, "--eval_interval=2", "--eval_batches=1",
                            "--sample_count=0"])
    evals = [json.loads(line) for line in open(results / "runs" / "cpu" / "tiny" / "sdpa-eager" / "evals.jsonl")]
    evals = [e for e in evals if e["step"] > 0]
    assert [e["step"] for e in evals] == [2, 3]
    monkeypatch.setattr(update_readme, "ROOT", str(tmp_path))
    table = update_readme.validation_block("tiny")
    assert "| run | backend | val loss, step 2 | val loss, step 3 |" in table
    assert f"| `tiny_cpu` | sdpa | {evals[0]['val_loss']:.4f} | {evals[1]['val_loss']:.4f} |" in table
