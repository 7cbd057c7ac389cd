"""The run folder: an out_dir holds exactly one run, and one process (rank 0) writes it at a time.

A fresh run refuses a folder that holds another run's files, unless told to overwrite them; `--resume` continues
the run whose checkpoint it names. The folder is locked with flock(2) for as long as the process lives: the
operating system releases the lock when the process ends, crashed or not, so a crash never leaves it stuck.
"""
import json
import os
import shutil

from training.checkpoints import CheckpointError, newest_readable, read_checkpoint, resolve_checkpoint

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


def previous_run(out_dir):
    """What out_dir holds of an earlier run, in words, or None."""
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not present:
        return None
    last = None
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            last = max(json.loads(line)["step"] for line in f if line.strip())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    reached = f"it logged steps up to {last}" if last is not None else "no step logged"
    return f"{', '.join(present)}; {reached}"


def claim(cfg):
    """Rank 0: lock out_dir and decide how this run uses it. Returns (lock file, checkpoint path, checkpoint) with
    path and checkpoint None for a fresh run. Raises RunDirError or CheckpointError before any work is done."""
    f = lock(cfg.out_dir)
    previous = previous_run(cfg.out_dir)
    refusal = (f"out_dir {cfg.out_dir!r} holds another run ({previous}). Continue it with --resume auto, choose "
               "another --out_dir, or delete its files and start afresh with --overwrite true")
    if cfg.resume == "auto":
        path, ckpt = newest_readable(cfg.out_dir)
        if path is not None:
            return f, path, ckpt
        if previous and not cfg.overwrite:
            raise RunDirError(f"--resume auto found no complete checkpoint to resume from; {refusal}")
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
        own = os.path.abspath(path).startswith(os.path.join(os.path.abspath(cfg.out_dir), ""))
        if own or not previous:
            return f, path, ckpt
        if not cfg.overwrite:
            raise RunDirError(f"--resume {cfg.resume} into another folder: {refusal}")
        _delete_run(cfg.out_dir)
        return f, path, ckpt
    if previous:
        if not cfg.overwrite:
            raise RunDirError(refusal)
        _delete_run(cfg.out_dir)
    return f, None, None


def _delete_run(out_dir):
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    print(f"--overwrite: deleted the earlier run's files in {out_dir}")
