"""The step-time bookkeeping (training/timing.py) on a simulated GPU (tests/fake_gpu.py) whose stream runs apart from
the host, with the host's clock simulated too, so every figure is exact: each row's time is at least its step's GPU
time, and the rows of an uninterrupted stretch of steps sum to the stream's wall time over it, whether each step is
read at once or a step late (overlap_steps), also around a pause (an evaluation) and after a resume."""
import datetime
import re
from types import SimpleNamespace

import pytest
import torch

from fake_gpu import FakeGpu, HostTime
from training import metrics
from training.timing import Readout

GPU = [0.050, 0.020, 0.080, 0.030, 0.060, 0.010, 0.070, 0.040, 0.050, 0.020, 0.030, 0.090]  # per step, seconds


def simulate(overlap, start_step=0, pause_after=(), queue=0.025, log=0.004):
    """The trainer's loop over len(GPU) steps on the simulated GPU: the host takes `queue` seconds to queue a step
    (its work goes to the stream as the host finishes queueing it) and `log` seconds to log each row; with overlap
    a step is read once the next one is queued, at once before a pause (an evaluation: GPU work, then host work) and
    at the end. Returns the rows (step, seconds), the stream's end of each step's work, and the most steps in flight."""
    host = HostTime()
    gpu = FakeGpu(host.now, host.sleep)
    readout = Readout(gpu)
    rows, ends, in_flight = [], {}, 0
    last = start_step + len(GPU) - 1
    for step, work in enumerate(GPU, start_step):
        start = readout.start()
        host.advance(queue)
        ends[step] = gpu.queue(work)
        readout.finish(step, 1e-3, start, torch.tensor([2.0, 0.0, 1.0]))
        in_flight = max(in_flight, len(readout.waiting))
        pause = step in pause_after
        while figures := readout.next(every=not overlap or pause or step == last):
            rows.append((figures.step, figures.seconds))
            host.advance(log)
        if pause:
            gpu.wait(gpu.queue(0.3))
            host.advance(0.2)
            readout.pause()
    return rows, ends, in_flight


@pytest.mark.parametrize("overlap", [False, True])
def test_rows_tile_the_stream_and_none_is_below_its_gpu_time(overlap):
    rows, ends, in_flight = simulate(overlap, pause_after={5})
    assert [step for step, _ in rows] == list(range(len(GPU)))
    assert in_flight == (2 if overlap else 1)  # with overlap, steps were read late
    for (step, seconds), work in zip(rows, GPU):
        assert seconds >= work - 1e-12, (step, seconds, work)
    # Steps 1-5 and 7-11 follow the step before with no pause between: their rows sum to the stream's time from
    # that step's end to the stretch's last end. Step 6 follows the evaluation: its row starts with its own work.
    dt = dict(rows)
    for first, last in ((1, 5), (7, 11)):
        assert sum(dt[s] for s in range(first, last + 1)) == pytest.approx(ends[last] - ends[first - 1], abs=1e-12)
    assert dt[6] < 0.3  # the evaluation's 0.5 s is in no row
    if not overlap:  # the host logs each row before queueing the next step: the stream waits, and the row says so
        assert dt[1] == pytest.approx(0.004 + 0.025 + GPU[1], abs=1e-12)
    else:  # the host queues the next step while the stream works: the rows are the stream's own time
        assert dt[3] == pytest.approx(GPU[3], abs=1e-12)


@pytest.mark.parametrize("overlap", [False, True])
def test_the_summary_after_a_resume_is_the_stream_time_of_its_window(overlap):
    """A process that resumed at step 20 leaves out its own first timing_warmup (3) steps: the mean is the stream's
    time from the end of step 22 to the end of step 31 over those 9 steps (the forced read at the end of the
    warm-up, at an absolute step, once moved time out of this window)."""
    rows, ends, _ = simulate(overlap, start_step=20)
    logged = [dict(step=step, dt_ms=1e3 * seconds, loss=2.0, peak_mem_gib=None) for step, seconds in rows]
    summary = metrics.summarize(logged, 20, 3, {}, {}, 1, 32, lambda s: None, 0)
    assert summary["mean_ms"] == pytest.approx(1e3 * (ends[31] - ends[22]) / 9, abs=1e-9)
    assert "mean over steps 23-31" in summary["timing"]


def test_the_eta_is_the_running_mean_of_the_steps_after_the_warm_up(tmp_path, capsys):
    cfg = SimpleNamespace(out_dir=str(tmp_path), wandb=False, timing_warmup=2, max_steps=10)
    log = metrics.RunLog(cfg, {}, 0, 32, 1, lambda s: None, torch.device("cpu"), None)
    for step, seconds in enumerate([30.0, 10.0, 1.0, 3.0, 2.0]):
        log.step(step, 1e-3, 2.0, 1.0, seconds, 0.0)
    etas = [line.rsplit("ETA ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    # Steps 0-1 are the warm-up: step 0 (compilation) alone, then step 1 alone, then the mean of steps 2, 3, 4...
    expected = [9 * 30.0, 8 * 10.0, 7 * 1.0, 6 * 2.0, 5 * 2.0]
    assert etas == [str(datetime.timedelta(seconds=round(s))) for s in expected]
    assert all(re.fullmatch(r"\d+:\d\d:\d\d", eta) for eta in etas)
    log.close({}, 0)
