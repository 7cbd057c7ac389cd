"""Each step's time, and its figures (loss, gradient norm, stop flag) on their way to the host.

A step's time runs from a start mark to an end mark. The end mark is set when the host has queued the step's work;
the start mark is the end mark of the step before, unless other work ran between the two (an evaluation, a
checkpoint, the profiler's trace), in which case it is a mark of its own, set as the step begins. On a GPU the marks
are CUDA events on the step's stream, timed when the GPU reaches them, not when the host queues them. So:
- when the host reads a step's figures does not change the step's time (with overlap_steps it reads them a step
  late): the marks were set when the work was queued;
- the rows of consecutive steps tile the stream's timeline: their times sum to the time from the first one's start
  to the last one's end, neither more nor less;
- no row is below its step's GPU time: all of the step's kernels run between its two marks.
Elsewhere (CPU) a step's work is done when the host's code for it returns, so a mark is the host's clock then.
"""
import time
from dataclasses import dataclass

import torch


class HostClock:
    """Marks from the host's clock, for devices whose work is done when the host's code for it returns (the CPU);
    on MPS the host waits for the device at each mark."""

    def __init__(self, device):
        self.device_sync = torch.mps.synchronize if device.type == "mps" else None

    def mark(self):
        if self.device_sync:
            self.device_sync()
        return time.perf_counter()

    def wait(self, mark):
        pass

    def seconds(self, start, end):
        return end - start


class CudaClock:
    """Marks on the current CUDA stream: events that the GPU times when it reaches them."""

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wait(self, mark):
        mark.synchronize()

    def seconds(self, start, end):
        return start.elapsed_time(end) / 1e3


def clock(device):
    return CudaClock() if device.type == "cuda" else HostClock(device)


@dataclass
class StepFigures:
    step: int
    lr: float
    values: list  # [mean loss over the ranks, stop requests summed over the ranks, gradient norm]
    seconds: float  # the step's time
    read_at: float  # when the host had them (Unix time)


class Readout:
    """The steps in flight, read in order: each as soon as it is queued, or (overlap_steps) once the next one is.

    start() gives the mark a step starts from, finish() queues the step's figures (a 1-D tensor on the device) behind
    its end mark, pause() says that other work comes before the next step, and next(every) reads the oldest step
    in flight, waiting for its work to end: every step in flight if `every`, else all but the newest."""

    def __init__(self, clock):
        self.clock, self.waiting, self.last_end = clock, [], None

    def start(self):
        return self.clock.mark() if self.last_end is None else self.last_end

    def finish(self, step, lr, start, values):
        if values.is_cuda:  # to pinned memory without blocking: the host waits only when it reads them
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values = host.copy_(values, non_blocking=True)
        self.last_end = self.clock.mark()
        self.waiting.append((step, lr, start, self.last_end, values))

    def pause(self):
        self.last_end = None

    def next(self, every):
        if len(self.waiting) <= (0 if every else 1):
            return None
        step, lr, start, end, values = self.waiting.pop(0)
        self.clock.wait(end)
        values = values.tolist()
        return StepFigures(step, lr, values, self.clock.seconds(start, end), time.time())
