"""train_gpt2.py with a fault injected, for the fault tests. FAULT=KIND:RANK:N: with KIND nan, that rank's loss is
NaN at training step N; with KIND stop, that rank receives SIGINT during training step N; with KIND evalstop, that
rank receives SIGINT during its N-th forward in evaluation mode (0: the first); with KIND unreadable, that rank
cannot read the checkpoint it is asked to resume from; with KIND slowgpu, that rank's steps are timed on a simulated
GPU (tests/fake_gpu.py) that takes N ms for each step's work, apart from the host (N = STEP/EVAL: and EVAL ms for
each evaluation's). The trainer is patched from here,
so no test-only code sits in it. The tests run one micro-step per step, uncompiled. With EXIT_STATUS_DIR set, each
rank writes its exit status to EXIT_STATUS_DIR/rank<r>."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import train_gpt2  # noqa: E402
from training import checkpoints, timing  # noqa: E402

kind, fault_rank, n = os.environ["FAULT"].split(":")
if int(os.environ.get("RANK", 0)) != int(fault_rank):
    pass
elif kind == "unreadable":
    def unreadable(path, rank=0):
        raise checkpoints.CheckpointError(f"{path}/model.pt cannot be read (injected fault)")

    checkpoints.read_checkpoint = unreadable
elif kind == "slowgpu":
    from fake_gpu import FakeGpu
    step_ms, eval_ms = (int(ms) for ms in (n + "/0").split("/")[:2])
    gpu, step, evaluate = FakeGpu(), train_gpt2.train_step, train_gpt2.evaluate

    def slow_step(*args, **kwargs):
        figures = step(*args, **kwargs)
        gpu.queue(step_ms / 1e3)  # the step's work, on the stream once the host has queued it
        return figures

    def slow_evaluate(*args, **kwargs):
        results = evaluate(*args, **kwargs)
        gpu.wait(gpu.queue(eval_ms / 1e3))  # its work, which the host waits for as it reads the figures
        return results

    timing.clock = lambda device: gpu
    train_gpt2.train_step, train_gpt2.evaluate = slow_step, slow_evaluate
else:
    forward, calls = model.GPT.forward, {True: 0, False: 0}  # forward calls in training mode and in evaluation mode

    def faulty_forward(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        mode = self.training
        if mode == (kind != "evalstop") and calls[mode] == int(n):
            if kind == "nan":
                loss = loss * float("nan")
            else:
                os.kill(os.getpid(), signal.SIGINT)
        calls[mode] += 1
        return logits, loss

    model.GPT.forward = faulty_forward
try:
    train_gpt2.main()
except SystemExit as e:  # torchrun reports the first rank's failure only: each rank writes its status if asked
    if os.environ.get("EXIT_STATUS_DIR"):
        with open(os.path.join(os.environ["EXIT_STATUS_DIR"], f"rank{os.environ.get('RANK', 0)}"), "w") as f:
            f.write(str(e.code))
    raise
