"""One run per out_dir: a second run never destroys the first one's files; resume continues only the same run;
damaged checkpoints and logs are named and stepped over; every such mistake is one line on stderr."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, read_metrics, train
from data.shards import write_shard
from training.distributed import STOPPED_EXIT_CODE


def snapshot(folder):
    """Every file under folder with its bytes: to show that nothing was changed or deleted."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name != ".lock":
                with open(os.path.join(root, name), "rb") as f:
                    files[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return files


def one_error_line(run):
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


def test_a_fresh_run_refuses_a_folder_holding_another_run(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--checkpoint_interval=2", f"--out_dir={tmp_path}"]
    assert train(*common, "--max_steps=4").returncode == 0
    before = snapshot(tmp_path)
    line = one_error_line(train(*common, "--max_steps=2"))
    assert str(tmp_path) in line and "steps up to 3" in line
    assert "--resume auto" in line and "another --out_dir" in line and "--overwrite true" in line
    assert snapshot(tmp_path) == before  # the first run's checkpoints, logs and summary, byte for byte

    run = train(*common, "--max_steps=2", "--overwrite=true")  # asked for: the old run goes, the new one is whole
    assert run.returncode == 0, run.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000002"]


def test_two_runs_at_once_into_one_folder(data_dir, tmp_path):
    common = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--config", "tiny", f"--data_dir={data_dir}",
              "--batch_size=2", "--seq_len=16", "--device=cpu", "--compile=false", "--max_steps=30",
              "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=128",
              f"--out_dir={tmp_path}"]
    runs = [subprocess.Popen(common + [f"--seed={seed}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for seed in (1, 2)]
    results = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    refused = next(err for code, err in results if code)
    assert "in use by another training process" in refused or "holds another run" in refused
    rows = read_metrics(tmp_path)  # every line parses: one writer
    assert [r["step"] for r in rows] == list(range(30))
    winner = 1 if results[0][0] == 0 else 2
    assert json.load(open(tmp_path / "config.json"))["seed"] == json.load(open(tmp_path / "summary.json"))["config"]["seed"] == winner


def test_a_crashed_run_leaves_no_stale_lock(data_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {ROOT!r}); "
                               f"from training.run_dir import lock; f = lock({str(tmp_path)!r}); print('locked', flush=True); "
                               "time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    line = one_error_line(train(f"--data_dir={data_dir}", "--batch_size=2", "--max_steps=1", f"--out_dir={tmp_path}"))
    assert f"in use by another training process (pid {holder.pid})" in line
    holder.kill()  # a crash: no clean-up code runs
    holder.wait()
    run = train(f"--data_dir={data_dir}", "--batch_size=2", "--max_steps=1", f"--out_dir={tmp_path}")
    assert run.returncode == 0, run.stderr


def test_resume_continues_only_the_same_run(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--checkpoint_interval=2", f"--out_dir={tmp_path}"]
    assert train(*common, "--max_steps=2").returncode == 0
    line = one_error_line(train(*common, "--max_steps=4", "--resume=auto", "--learning_rate=0.01"))
    assert "the run's settings differ: learning_rate 0.001 (checkpoint) != 0.01 (now)" in line
    run = train(*common, "--max_steps=4", "--resume=auto", "--attention=naive")  # the backend may change
    assert run.returncode == 0, run.stderr


def test_resume_auto_with_nothing_to_resume(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--resume=auto", "--checkpoint_interval=0",
              f"--out_dir={tmp_path}"]
    run = train(*common, "--max_steps=2")
    assert run.returncode == 0, run.stderr
    assert "no checkpoint in" in run.stdout and "starting a fresh run" in run.stdout
    # The same again: the folder now holds a run (no checkpoints were asked for), so there is nothing to continue,
    # and --resume auto is no advice
    before = snapshot(tmp_path)
    line = one_error_line(train(*common, "--max_steps=4"))
    assert "holds a run" in line and "steps up to 1" in line and "no complete checkpoint to continue it from" in line
    assert "checkpoint_interval" in line and "--resume auto," not in line and "--overwrite true" in line
    assert snapshot(tmp_path) == before


def test_a_finished_run_resumed_trains_nothing_and_changes_nothing(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--checkpoint_interval=2", "--resume=auto",
              f"--out_dir={tmp_path}"]
    assert train(*common, "--max_steps=4").returncode == 0
    before = snapshot(tmp_path)
    run = train(*common, "--max_steps=4")  # a job script started again after the run's end
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.strip() == (f"nothing to train: {tmp_path}/checkpoints/step_000004 is the state after 4 steps "
                                  "and max_steps is 4; the run's files are left as they are (raise --max_steps to "
                                  "train further)")
    line = one_error_line(train(*common, "--max_steps=3"))
    assert "--max_steps 3 is below the step of the checkpoint to resume from" in line and "above 4" in line
    assert snapshot(tmp_path) == before  # summary.json, config.json, the logs and checkpoints, byte for byte


def test_a_run_that_died_before_its_first_step_leaves_nothing_in_the_way(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--max_steps=2", f"--out_dir={tmp_path}"]
    died = train(*common, fault="nan:0:0")  # ends at its first step: config.json and empty logs left behind
    assert died.returncode == 1 and "non-finite loss at step 0" in died.stdout
    assert (tmp_path / "config.json").exists() and read_metrics(tmp_path) == []
    run = train(*common)  # the same command again
    assert run.returncode == 0, run.stderr
    assert f"replaced the files of a run that ended before its first step in {tmp_path}" in run.stdout
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]


@pytest.mark.parametrize("value", ["atuo", "true"])
def test_resume_values_that_are_not_checkpoints(data_dir, tmp_path, value):
    line = one_error_line(train(f"--data_dir={data_dir}", "--batch_size=2", f"--resume={value}", f"--out_dir={tmp_path}"))
    assert f"--resume {value}: no such folder" in line and "--resume takes auto, a run folder" in line
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_resume_from_a_run_folder_means_its_newest_checkpoint(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--checkpoint_interval=1", "--keep_last=3"]
    assert train(*common, "--max_steps=3", f"--out_dir={tmp_path / 'a'}").returncode == 0
    run = train(*common, "--max_steps=4", f"--resume={tmp_path / 'a'}", f"--out_dir={tmp_path / 'a'}")
    assert run.returncode == 0, run.stderr
    assert "step_000003 at step 3" in run.stdout


def test_a_damaged_checkpoint_falls_back_to_the_one_before(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--checkpoint_interval=1", "--keep_last=3", f"--out_dir={tmp_path}"]
    assert train(*common, "--max_steps=3").returncode == 0
    model = tmp_path / "checkpoints" / "step_000003" / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated, though its DONE marker is there
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 3, "loss": 1.0, "dt\n')  # and a half-written log line
    run = train(*common, "--max_steps=4", "--resume=auto")
    assert run.returncode == 0, run.stderr
    assert "skipping damaged checkpoint" in run.stdout and "step_000003/model.pt cannot be read" in run.stdout
    assert "weights_only" not in run.stdout + run.stderr
    assert "resumed from" in run.stdout and "step_000002 at step 2" in run.stdout
    assert "dropping a line that is not a log row" in run.stdout
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_out_dir_that_is_a_file(data_dir, tmp_path):
    (tmp_path / "f").write_text("keep me")
    line = one_error_line(train(f"--data_dir={data_dir}", "--batch_size=2", f"--out_dir={tmp_path / 'f'}"))
    assert "is a file, not a folder" in line and (tmp_path / "f").read_text() == "keep me"


def test_summary_after_resume_leaves_out_the_resumed_process_warm_up(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--checkpoint_interval=3", "--timing_warmup=2",
              f"--out_dir={tmp_path}"]
    assert train(*common, "--max_steps=3").returncode == 0
    assert train(*common, "--max_steps=7", "--resume=auto").returncode == 0
    rows = read_metrics(tmp_path)
    summary = json.load(open(tmp_path / "summary.json"))
    # This process ran steps 3..6: its first two (3, 4) are warm-up, so the mean is over 5 and 6 alone.
    assert summary["mean_ms"] == pytest.approx((rows[5]["dt_ms"] + rows[6]["dt_ms"]) / 2)
    assert "mean over steps 5-6" in summary["timing"]


def test_sigint_during_evaluation_stops_the_run(tmp_path):
    write_shard(tmp_path / "s_train_000000.bin", np.random.default_rng(0).integers(0, 128, 2000))
    write_shard(tmp_path / "s_val_000000.bin", np.random.default_rng(1).integers(0, 128, 2000))
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--config", "tiny", f"--data_dir={tmp_path}",
           "--batch_size=2", "--seq_len=16", "--device=cpu", "--compile=false", "--max_steps=5", "--n_layer=2",
           "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=128", "--eval_interval=1",
           "--eval_batches=1000000", "--sample_count=0", "--checkpoint_interval=10", f"--out_dir={tmp_path / 'out'}"]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "attention backend" not in run.stdout.readline():  # set-up done: the step-0 evaluation is next
        pass
    time.sleep(2)  # well inside an evaluation of a million batches
    run.send_signal(signal.SIGINT)
    started = time.perf_counter()
    out, err = run.communicate(timeout=120)
    assert run.returncode == STOPPED_EXIT_CODE, err
    assert time.perf_counter() - started < 60
    assert "SIGINT: the run stops after the current step and saves a checkpoint" in out
    assert out.splitlines()[-1] == f"stopped on request: exit status {STOPPED_EXIT_CODE}; continue with --resume auto"
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [0]  # the step in progress, then the stop
    assert os.listdir(tmp_path / "out" / "checkpoints") == ["step_000001"]
    assert (tmp_path / "out" / "evals.jsonl").read_text() == ""  # the cut evaluation left no figures


def test_out_dir_that_cannot_be_created(data_dir, tmp_path):
    (tmp_path / "f").write_text("keep me")
    line = one_error_line(train(f"--data_dir={data_dir}", "--batch_size=2", f"--out_dir={tmp_path / 'f' / 'run'}"))
    assert "cannot be created or written" in line and "choose another --out_dir" in line


def test_triton_backend_without_the_triton_package(data_dir, tmp_path):
    fake = tmp_path / "site" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named triton')\n")  # as on macOS
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    line = one_error_line(train(f"--data_dir={data_dir}", "--attention=triton", f"--out_dir={tmp_path / 'out'}", env=env))
    assert "--attention triton needs the triton package" in line and "--attention sdpa" in line
