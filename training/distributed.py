"""Several processes (torchrun): they must agree on the settings and the checkpoint, and stop together."""
import hashlib
import json
import signal
import threading

import torch
import torch.distributed as dist

# The exit status of a run that stopped early on request (SIGINT, SIGTERM), so that job scripts can tell it from a
# finished run (0) and from a failure (1): EX_TEMPFAIL, "try again later", since `--resume auto` continues it.
STOPPED_EXIT_CODE = 75


def barrier(world):
    if world > 1:
        dist.barrier()


def broadcast(obj, world):
    """Rank 0's obj (anything picklable) on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag, world, device):
    """True on every rank if `flag` is true on any rank."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def check_same_config(settings, world, device):
    """Every rank must train with the same settings; compare a hash of them across ranks."""
    if world == 1:
        return True
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:7], "little")], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return len({t.item() for t in everyone}) == 1


class StopRequest:
    """SIGTERM (a scheduler's pre-emption) or SIGINT (Ctrl-C) asks to stop: the run finishes the current step (or
    cuts an evaluation short), saves a checkpoint if checkpointing is on, and exits with STOPPED_EXIT_CODE. The
    request is all-reduced with the step's loss, so every rank stops after the same step. A second signal takes
    the default action: it stops the process at once."""

    def __init__(self, announce):
        self.signalled = False
        self.announce = announce  # the line printed at the first signal (rank 0), None elsewhere
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True
        signal.signal(signum, signal.SIG_DFL)
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: {self.announce}; signal again to stop at once", flush=True)

    def flag(self, device):
        # A fill kernel, not torch.tensor(): no host-to-device copy in the training step.
        return torch.full((), float(self.signalled), device=device)
