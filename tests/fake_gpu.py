"""A GPU simulated beside the host, with the clock interface of training/timing.py (mark, wait, seconds), so the
step-time bookkeeping can be checked on a CPU where a step's work runs apart from the host's queueing of it.

The stream runs the work queued on it in order: each piece starts once the host has queued it and the stream has
finished the piece before. A mark is timed when the stream reaches it; waiting for a mark holds the host until
then. The host's clock is `now`, the real one by default (waiting then sleeps) or a simulated one (HostTime)."""
import time


class FakeGpu:
    def __init__(self, now=time.perf_counter, sleep=time.sleep):
        self.now, self.sleep = now, sleep
        self.free = 0.0  # when the stream will have finished all the work queued so far

    def queue(self, seconds):
        """Queue `seconds` of work; returns when the stream will have done it."""
        self.free = max(self.free, self.now()) + seconds
        return self.free

    def mark(self):
        self.free = max(self.free, self.now())
        return self.free

    def wait(self, mark):
        if mark > self.now():
            self.sleep(mark - self.now())

    def seconds(self, start, end):
        return end - start


class HostTime:
    """A simulated host clock: it moves only when the host works (advance) or waits (sleep)."""

    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds

    sleep = advance
