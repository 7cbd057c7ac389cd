"""The run folder: an out_dir holds exactly one run, and one process (rank 0) writes it at a time.

A fresh run refuses a folder that holds another run's files, unless told to overwrite them; `--resume` continues
the run whose checkpoint it names. The folder is locked with flock(2) for as long as the process lives: the
operating system releases the lock when the process ends, crashed or not, so a crash never leaves it stuck.
"""
import json
import os
import shutil

from training.checkpoints import (CheckpointError, complete_checkpoints, newest_readable, read_checkpoint,
                                  resolve_checkpoint)

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder check below still applies
    fcntl = None

RUN_FILES = ("config.json", "metrics.jsonl", "evals.jsonl", "summary.json", "checkpoints", "wandb")
RESUME_HELP = "--resume takes auto, a run folder (its newest checkpoint) or a checkpoint folder (.../checkpoints/step_000100)"


class RunDirError(ValueError):
    pass


def lock(out_dir):
    """Create out_dir if needed and lock it; returns the open lock file, which must stay open for the run."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunDirError(f"out_dir {out_dir!r} is a file, not a folder; choose another --out_dir")
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise RunDirError(f"out_dir {out_dir!r} cannot be created or written ({e.strerror}); choose another --out_dir") from None
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunDirError(f"out_dir {out_dir!r} is in use by another training process (pid {f.read().strip() or '?'}); "
                              "wait for it to end or choose another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


class RunFinished(RunDirError):
    """The checkpoint to resume from is at max_steps: nothing to train."""


def previous_run(out_dir):
    """What out_dir holds of an earlier run that a new one would lose (a logged step or a complete checkpoint), in
    words, or None. The files of a run that ended before its first step hold nothing to lose."""
    last = None
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            last = max(json.loads(line)["step"] for line in f if line.strip())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    saved = complete_checkpoints(out_dir)
    if last is None and not saved:
        return None
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    reached = f"it logged steps up to {last}" if last is not None else "no step logged"
    return f"{', '.join(present)}; {reached}" + (f"; newest checkpoint {os.path.basename(saved[-1])}" if saved else "")


def claim(cfg):
    """Rank 0: lock out_dir and decide how this run uses it. Returns (lock file, checkpoint path, checkpoint) with
    path and checkpoint None for a fresh run. Raises RunDirError (RunFinished when there is nothing left to train)
    or CheckpointError before any work is done and before anything in out_dir is changed."""
    f = lock(cfg.out_dir)
    previous = previous_run(cfg.out_dir)
    choices = "choose another --out_dir, or delete its files and start afresh with --overwrite true"
    resumable = "continue it with --resume auto, " if complete_checkpoints(cfg.out_dir) else ""
    refusal = f"out_dir {cfg.out_dir!r} holds another run ({previous}); {resumable}{choices}"
    if cfg.resume == "auto":
        path, ckpt = newest_readable(cfg.out_dir)
        if path is not None:
            return f, path, steps_left(cfg, path, ckpt)
        if previous and not cfg.overwrite:
            raise RunDirError(f"--resume auto: out_dir {cfg.out_dir!r} holds a run ({previous}) but no complete "
                              f"checkpoint to continue it from (was checkpoint_interval 0?); {choices}")
        print(f"--resume auto: no checkpoint in {cfg.out_dir}; starting a fresh run")
    elif cfg.resume:
        if not os.path.isdir(cfg.resume):
            raise RunDirError(f"--resume {cfg.resume}: no such folder; {RESUME_HELP}")
        try:
            path = resolve_checkpoint(cfg.resume)
        except CheckpointError as e:
            raise RunDirError(f"--resume {cfg.resume}: {e}; {RESUME_HELP}") from None
        if os.path.isdir(os.path.join(cfg.resume, "checkpoints")):  # a run folder: fall back past a damaged one
            path, ckpt = newest_readable(cfg.resume)
            if path is None:
                raise RunDirError(f"--resume {cfg.resume}: none of its checkpoints can be read")
        else:
            ckpt = read_checkpoint(path)
        steps_left(cfg, path, ckpt)
        own = os.path.abspath(path).startswith(os.path.join(os.path.abspath(cfg.out_dir), ""))
        if own or not previous:
            return f, path, ckpt
        if not cfg.overwrite:
            raise RunDirError(f"--resume {cfg.resume} into another folder: {refusal}")
        _delete_run(cfg.out_dir, "--overwrite: deleted the earlier run's files")
        return f, path, ckpt
    if previous:
        if not cfg.overwrite:
            raise RunDirError(refusal)
        _delete_run(cfg.out_dir, "--overwrite: deleted the earlier run's files")
    elif any(os.path.exists(os.path.join(cfg.out_dir, name)) for name in RUN_FILES):
        _delete_run(cfg.out_dir, "replaced the files of a run that ended before its first step")
    return f, None, None


def steps_left(cfg, path, ckpt):
    """The checkpoint, if the run has steps left to train from it."""
    step = ckpt["state"]["step"]
    if step == cfg.max_steps:
        raise RunFinished(f"nothing to train: {path} is the state after {step} steps and max_steps is {cfg.max_steps}; "
                          "the run's files are left as they are (raise --max_steps to train further)")
    if step > cfg.max_steps:
        raise RunDirError(f"--max_steps {cfg.max_steps} is below the step of the checkpoint to resume from ({path}, the "
                          f"state after {step} steps); nothing was changed. Raise --max_steps above {step}, or start "
                          "a new run in another --out_dir")
    return ckpt


def _delete_run(out_dir, why):
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    print(f"{why} in {out_dir}")
