"""scripts/scaling.py end to end on the CPU: 2 processes against 1 process with twice the accumulation."""
import json
import os
import sys

import numpy as np
import pytest

from data.shards import write_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import scaling  # noqa: E402


def test_scaling_report_comes_from_the_runs(tmp_path, cpu_named):
    write_shard(tmp_path / "s_train_000000.bin", np.random.default_rng(0).integers(0, 128, 3000))
    results = tmp_path / "results"
    scaling.main(["--nproc", "2", "--backends", "naive", "sdpa", "--config", "tiny", "--compile", "off",
                  "--results_dir", str(results), "--", f"--data_dir={tmp_path}", "--vocab_size=128", "--n_layer=1",
                  "--n_embd=32", "--seq_len=16", "--block_size=16", "--batch_size=2", "--total_batch_size=64",
                  "--max_steps=4", "--timing_warmup=1", "--device=cpu"])
    report = json.load(open(results / "scaling_2xcpu.json"))
    for row in report["rows"]:
        runs = results / "runs" / "scaling_2xcpu"
        one = json.load(open(runs / f"{row['backend']}-1gpu" / "summary.json"))
        two = json.load(open(runs / f"{row['backend']}-2gpu" / "summary.json"))
        assert "2 micro-step(s)" in open(runs / f"{row['backend']}-1gpu" / "log.txt").read()
        assert two["world_size"] == 2 and one["world_size"] == 1
        assert row["efficiency"] == pytest.approx(two["mean_tok_per_s"] / (2 * one["mean_tok_per_s"]))
        assert row["max_loss_diff_vs_1gpu"] == max(abs(a - b) for a, b in zip(one["loss"], two["loss"])) < 1e-5
    assert report["bf16_noise_between_backends_1gpu"] is not None
    assert "| naive |" in (results / "scaling_2xcpu.md").read_text()


def test_runs_with_different_global_batches_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"scaling needs one global batch for both runs: total_batch_size is 0"):
        scaling.main(["--nproc", "2", "--config", "tiny", "--results_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"not a multiple of batch_size\*seq_len\*processes"):
        scaling.main(["--nproc", "2", "--config", "tiny", "--results_dir", str(tmp_path), "--",
                      "--total_batch_size=256", "--batch_size=4", "--seq_len=64"])
    assert not os.listdir(tmp_path)  # refused before any run
