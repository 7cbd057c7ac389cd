"""scripts/compare_attention.py and scripts/compare_settings.py end to end on the tiny configuration (CPU, compile
off)."""
import json
import os
import re
import sys
import time
from argparse import Namespace

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import compare_attention  # noqa: E402

SMALL = ["--vocab_size=128", "--n_layer=1", "--n_embd=32", "--seq_len=16", "--block_size=16", "--max_steps=4",
         "--timing_warmup=1", "--device=cpu"]


def test_table_json_and_plot_come_from_the_runs(data_dir, tmp_path, cpu_named):
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
    log = (tmp_path / "run" / "log.txt").read_bytes()
    with pytest.raises(SystemExit, match="^error: .*run holds an earlier run, kept"):  # never truncates its log
        compare_attention.run_one("sdpa", False, args, str(tmp_path / "run"))
    assert (tmp_path / "run" / "log.txt").read_bytes() == log


def files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_comparison_run_again_is_written_beside_the_earlier_one_and_a_failed_run_exits_1(data_dir, tmp_path,
                                                                                         monkeypatch, cpu_named):
    """The same arguments twice: the second comparison gets a dated name, and not one byte of the first changes. A
    run that fails is a row, and the script exits 1 naming its log."""
    results = tmp_path / "results"
    argv = ["--config", "tiny", "--backends", "naive", "sdpa", "--compile", "off", "--results_dir", str(results),
            "--", f"--data_dir={data_dir}", *SMALL]
    real_run = compare_attention.run_one

    def naive_runs_out_of_memory(backend, compile, args, out_dir):
        if backend != "naive":
            return real_run(backend, compile, args, out_dir)
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "log.txt"), "w") as f:
            f.write("torch.OutOfMemoryError: CUDA out of memory.\n")
        return compare_attention.read_run(backend, compile, out_dir, 1)

    monkeypatch.setattr(compare_attention, "run_one", naive_runs_out_of_memory)
    with pytest.raises(SystemExit) as first_exit:
        compare_attention.main(argv)
    assert first_exit.value.code.startswith("error: 1 of 2 runs failed: ")
    assert first_exit.value.code.endswith("naive-eager/log.txt: out of memory")
    report = json.load(open(results / "compare_tiny_cpu.json"))
    assert [r["status"] for r in report["rows"]] == ["out of memory", "ok"]
    assert "| naive | off | out of memory |" in (results / "compare_tiny_cpu.md").read_text()
    first = files(results)

    with pytest.raises(SystemExit):
        compare_attention.main(argv)
    assert {p: b for p, b in files(results).items() if p in first} == first
    dated = [p.name for p in results.glob("compare_tiny_*_cpu.json")]
    assert len(dated) == 1 and re.fullmatch(r"compare_tiny_\d{8}-\d{6}_cpu\.json", dated[0])
    name = dated[0][len("compare_"):-len("_cpu.json")]
    assert json.load(open(results / dated[0]))["rows"][1]["status"] == "ok"
    assert (results / "runs" / "cpu" / name / "sdpa-eager" / "summary.json").exists()


def test_a_comparison_whose_runs_all_fail_writes_no_table(tmp_path, cpu_named):
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as e:
        compare_attention.main(["--config", "tiny", "--backends", "sdpa", "--compile", "off", "--results_dir",
                                str(results), "--", f"--data_dir={tmp_path / 'missing'}", *SMALL])
    assert e.value.code.startswith("error: 1 of 1 runs failed: ") and "\n" not in e.value.code
    assert sorted(p.name for p in results.iterdir()) == ["runs"]
    assert "does not exist" in (results / "runs" / "cpu" / "tiny" / "sdpa-eager" / "log.txt").read_text()


def test_the_plot_has_integer_steps_a_legend_for_its_bars_and_coinciding_curves_stay_visible():
    """Three runs with the same losses over 4 steps: the step axis ticks whole steps only, the curves are drawn
    each narrower than the one before and over it with markers of their own, and the bars' colours are named."""
    rows = [dict(backend=b, compile=c, status="ok", ms=ms) for b, c, ms in
            (("naive", True, 3.0), ("sdpa", True, 2.0), ("sdpa", False, 4.0))]
    summaries = {(r["backend"], r["compile"]): dict(final_step=3, loss=[4.0, 3.5, 3.2, 3.0]) for r in rows}
    fig = compare_attention.figure(rows, summaries, "test")
    ax_loss, ax_ms = fig.axes
    fig.canvas.draw()
    ticks = [t for t in ax_loss.get_xticks() if ax_loss.get_xlim()[0] <= t <= ax_loss.get_xlim()[1]]
    assert ticks and all(t == int(t) for t in ticks)
    lines = ax_loss.get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[0, 1, 2, 3]] * 3
    widths, orders = [line.get_linewidth() for line in lines], [line.get_zorder() for line in lines]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 3 and orders == sorted(set(orders))
    assert len({line.get_marker() for line in lines}) == 3
    assert [t.get_text() for t in ax_ms.get_legend().get_texts()] == ["torch.compile on", "torch.compile off (eager)"]


def test_validation_losses_reach_the_readme_table(data_dir, tmp_path, monkeypatch, cpu_named):
    """update_readme.validation_block reads each compared run's evals.jsonl: every evaluation after step 0, by step."""
    import update_readme
    results = tmp_path / "results"
    compare_attention.main(["--config", "tiny", "--backends", "sdpa", "--compile", "off", "--results_dir",
                            str(results), "--", f"--data_dir={data_dir}", *SMALL, "--eval_interval=2", "--eval_batches=1",
                            "--sample_count=0"])
    evals = [json.loads(line) for line in open(results / "runs" / "cpu" / "tiny" / "sdpa-eager" / "evals.jsonl")]
    evals = [e for e in evals if e["step"] > 0]
    assert [e["step"] for e in evals] == [2, 4]  # the last one after the last step: of the final weights
    monkeypatch.setattr(update_readme, "ROOT", str(tmp_path))
    table = update_readme.validation_block("tiny")
    assert "| run | backend | val loss, step 2 | val loss, step 4 |" in table
    assert f"| `tiny_cpu` | sdpa | {evals[0]['val_loss']:.4f} | {evals[1]['val_loss']:.4f} |" in table


def test_settings_runs_alternate_and_their_gpu_figures_cover_the_timed_steps(data_dir, tmp_path, monkeypatch,
                                                                          cpu_named):
    """scripts/compare_settings.py: runs in the order A B A B, each row from its own run's files; the GPU figures are
    the means of the samples taken during the steps that the run's mean ms/step covers, and none without samples."""
    import compare_settings
    failing = tmp_path / "bin" / "nvidia-smi"  # as on a machine without a working nvidia-smi, also on a GPU machine
    failing.parent.mkdir()
    failing.write_text("#!/bin/sh\nexit 9\n")
    failing.chmod(0o755)
    monkeypatch.setenv("PATH", f"{failing.parent}{os.pathsep}{os.environ['PATH']}")
    results = tmp_path / "results"
    compare_settings.main(["--config", "tiny", "--setting", "batch_size", "2", "4", "--repeat", "2", "--compile", "off",
                           "--results_dir", str(results), "--", f"--data_dir={data_dir}", *SMALL])
    report = json.load(open(results / "settings_batch_size_tiny_cpu.json"))
    rows = report["rows"]
    assert [(r["value"], r["repeat"]) for r in rows] == [("2", 0), ("4", 0), ("2", 1), ("4", 1)]
    for r in rows:
        run_dir = results / "runs" / "cpu" / "settings_batch_size_tiny" / f"{r['value']}-{r['repeat']}"
        metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        assert r["status"] == "ok" and r["ms"] == pytest.approx(np.mean([m["dt_ms"] for m in metrics[1:]]))
        assert f"--batch_size {r['value']}" in r["command"]
        assert r["gpu_samples"] == 0 and r["sm_clock_mhz"] is None
    for value in ("2", "4"):
        ms = [r["ms"] for r in rows if r["value"] == value]
        assert report["mean_ms"][value]["ms"] == pytest.approx(np.mean(ms))
    assert report["mean_ms"]["4"]["vs_first"] == pytest.approx(report["mean_ms"]["4"]["ms"] / report["mean_ms"]["2"]["ms"])
    assert "| 4 | 1 |" in (results / "settings_batch_size_tiny_cpu.md").read_text()

    # The window: from the start of the first timed step (its logged time less its dt) to the last step's time.
    run_dir = results / "runs" / "cpu" / "settings_batch_size_tiny" / "2-0"
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    summary = json.load(open(run_dir / "summary.json"))
    start, end = compare_settings.timed_window(str(run_dir), summary)
    assert start == pytest.approx(metrics[1]["time"] - metrics[1]["dt_ms"] / 1e3) and end == metrics[-1]["time"]
    samples = [(start - 1, 1000.0, 300.0, 0.0), (start, 1500.0, 690.0, 1.0), (end, 1700.0, 700.0, 0.0),
               (end + 1, 1980.0, 100.0, 0.0)]
    assert compare_settings.gpu_during(samples, (start, end)) == dict(sm_clock_mhz=1600.0, power_w=695.0,
                                                                       power_capped=0.5, gpu_samples=2)
    assert compare_settings.gpu_during(samples, None)["sm_clock_mhz"] is None


def test_gpu_sampler_averages_the_gpus_and_reads_the_power_cap_bit(tmp_path, monkeypatch):
    """GpuSampler on a stand-in nvidia-smi that reports two GPUs: one at its power cap (bit 0x4, with another reason
    beside it), one idle (0x1)."""
    import compare_settings
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '1500, 700.00, 0x0000000000000005'\necho '1980, 100.50, 0x0000000000000001'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with compare_settings.GpuSampler(period=0.01) as sampler:
        deadline = time.time() + 30
        while len(sampler.samples) < 2 and time.time() < deadline:
            time.sleep(0.01)
    assert len(sampler.samples) >= 2 and all(s[1:] == (1740.0, 400.25, 0.5) for s in sampler.samples)


def test_settings_run_again_get_a_dated_name_and_all_failed_runs_write_no_table(tmp_path, monkeypatch, cpu_named):
    import compare_settings
    results = tmp_path / "results"
    results.mkdir()
    (results / "settings_batch_size_tiny_cpu.md").write_text("an earlier comparison")
    used = []

    def failing_run(backend, compile, args, out_dir):
        used.append(out_dir)
        os.makedirs(out_dir)
        return compare_attention.read_run(backend, compile, out_dir, 1)

    monkeypatch.setattr(compare_settings, "run_one", failing_run)
    with pytest.raises(SystemExit) as e:
        compare_settings.main(["--config", "tiny", "--setting", "batch_size", "2", "4", "--repeat", "1",
                               "--results_dir", str(results)])
    assert e.value.code.startswith("error: 2 of 2 runs failed: ") and "\n" not in e.value.code
    stamp = re.fullmatch(r".*settings_batch_size_tiny_(\d{8}-\d{6})", os.path.dirname(used[0])).group(1)
    assert used == [str(results / "runs" / "cpu" / f"settings_batch_size_tiny_{stamp}" / v) for v in ("2-0", "4-0")]
    assert sorted(p.name for p in results.iterdir()) == ["runs", "settings_batch_size_tiny_cpu.md"]
    assert (results / "settings_batch_size_tiny_cpu.md").read_text() == "an earlier comparison"


@pytest.mark.parametrize("setting, message", [(["overlap_stepz", "false", "true"], "did you mean --overlap_steps?"),
                                              (["overlap_steps", "false", "maybe"], "must be true or false"),
                                              (["batch_size", "2", "0"], "batch_size must be at least 1")])
def test_settings_refuses_a_bad_setting_before_any_run(tmp_path, capsys, setting, message):
    """Each value is checked as the trainer checks its settings, before the first run: one line, exit 1, nothing
    written (a typo would otherwise cost every run its start-up)."""
    import compare_settings
    with pytest.raises(SystemExit) as exit_info:
        compare_settings.main(["--config", "tiny", "--setting", *setting, "--results_dir", str(tmp_path / "r")])
    assert exit_info.value.code.startswith("error: ") and message in exit_info.value.code
    assert "\n" not in exit_info.value.code and not (tmp_path / "r").exists()
