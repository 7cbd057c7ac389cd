"""train_gpt2.py with a fault injected, for the fault tests. FAULT=KIND:RANK:STEP: with KIND nan, that rank's loss
is NaN at that step; with KIND stop, that rank receives SIGINT during that step; with KIND unreadable, that rank
cannot read the checkpoint it is asked to resume from. The trainer is patched from here, so no test-only code sits
in it. The tests run one micro-step per step, uncompiled."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import train_gpt2  # noqa: E402
from training import checkpoints  # noqa: E402

kind, fault_rank, fault_step = os.environ["FAULT"].split(":")
if int(os.environ.get("RANK", 0)) == int(fault_rank) and kind == "unreadable":
    def unreadable(path, rank=0):
        raise checkpoints.CheckpointError(f"{path}/model.pt cannot be read (injected fault)")

    checkpoints.read_checkpoint = unreadable
elif int(os.environ.get("RANK", 0)) == int(fault_rank):
    forward, steps = model.GPT.forward, []

    def faulty_forward(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training:
            steps.append(len(steps))
            if steps[-1] == int(fault_step):
                if kind == "nan":
                    loss = loss * float("nan")
                else:
                    os.kill(os.getpid(), signal.SIGINT)
        return logits, loss

    model.GPT.forward = faulty_forward
train_gpt2.main()
