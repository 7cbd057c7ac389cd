"""Checkpoints: out_dir/checkpoints/step_000100/ is the state after 100 optimizer steps (steps 0..99 done; the next
step to run is 100). It holds model.pt, optimizer.pt, state.pt (step, data position, the run's settings, the W&B
run id), rng_rank<r>.pt and DONE. It is written as step_000100.tmp/ and renamed when complete, so a crash mid-save
leaves the previous checkpoint as the newest complete one; a checkpoint is read whole before any of it is applied.
"""
import os
import re
import shutil

import torch

from model import GPT, GPTConfig


class CheckpointError(ValueError):
    pass


# The settings that make a run the run it is: resuming with any of these changed, or with another number of tokens per
# step, would continue a different experiment. Everything else (backend, the split of a step into processes,
# micro-steps and batch_size, compile, evaluation, logging, max_steps) may change; a change of data is caught by the
# loader (its position is only valid on the same tokens).
MODEL_KEYS = ["block_size", "vocab_size", "n_layer", "n_head", "n_embd"]
SAME_RUN_KEYS = MODEL_KEYS + ["seq_len", "learning_rate", "lr_schedule", "warmup_steps", "min_lr", "weight_decay",
                              "decay_all_params", "beta1", "beta2", "adam_eps", "grad_clip", "seed"]


def checkpoint_dir(out_dir, step):
    return os.path.join(out_dir, "checkpoints", f"step_{step:06d}")


def complete_checkpoints(out_dir, clean=False):
    """Complete checkpoints, oldest first. Incomplete ones (an interrupted save) are named, and deleted if clean."""
    root = os.path.join(out_dir, "checkpoints")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if re.fullmatch(r"step_\d{6}", name) and os.path.exists(os.path.join(path, "DONE")):
            found.append(path)
        elif clean:
            print(f"skipping incomplete checkpoint {path} (interrupted save), and deleting it")
            shutil.rmtree(path, ignore_errors=True)
    return found


def save_checkpoint(out_dir, step, keep_last, raw_model, optimizer, state, rank, barrier):
    """Every rank saves its RNG state; rank 0 the model, optimizer and `state` (DDP keeps the first two identical on
    every rank). `barrier()` lines the ranks up between the phases."""
    final = checkpoint_dir(out_dir, step)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of an earlier interrupted save
        os.makedirs(tmp)
    barrier()
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save(raw_model.state_dict(), os.path.join(tmp, "model.pt"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save({"step": step, **state}, os.path.join(tmp, "state.pt"))
    barrier()
    if rank == 0:
        open(os.path.join(tmp, "DONE"), "w").close()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old)
        print(f"saved checkpoint {final} (the state after {step} steps)")
    barrier()


def read_checkpoint(path, rank=0):
    """All of a checkpoint's files (rank's RNG state among them), read into CPU memory before any is applied, so that
    a damaged file can never leave a run half restored."""
    files = {"state": "state.pt", "model": "model.pt", "optimizer": "optimizer.pt", "rng": f"rng_rank{rank}.pt"}
    ckpt = {}
    for key, name in files.items():
        file = os.path.join(path, name)
        if key == "rng" and not os.path.exists(file):  # resuming on more processes than saved
            ckpt[key] = None
            continue
        try:
            ckpt[key] = torch.load(file, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete") from None
        except Exception as e:  # truncated or corrupt: zip, pickle and EOF errors alike
            raise CheckpointError(f"{file} cannot be read ({type(e).__name__}): the file is damaged") from None
    return ckpt


def resolve_checkpoint(path):
    """A step folder as it is; a run folder (one holding checkpoints/) -> its newest complete checkpoint."""
    if os.path.isfile(os.path.join(path, "DONE")):
        return path
    no_checkpoint = (f"{path} is a run folder with no complete checkpoint: train with --checkpoint_interval N to save "
                     "one every N steps and after the last")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        found = complete_checkpoints(path)
        if not found:
            raise CheckpointError(no_checkpoint)
        return found[-1]
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "state.pt")):
        raise CheckpointError(f"{path} has no DONE marker: its save was interrupted, so it is incomplete")
    if os.path.isfile(os.path.join(path, "config.json")):  # the trainer writes it first: a run that saved nothing
        raise CheckpointError(no_checkpoint)
    raise CheckpointError(f"{path!r} is neither a checkpoint (a folder like out/run/checkpoints/step_000100) nor "
                          "a run folder holding checkpoints/")


def newest_readable(out_dir, clean=True):
    """(path, checkpoint) of the newest complete checkpoint that reads whole, or (None, None); a damaged one is
    named and the one before it tried. clean: delete incomplete ones (the trainer, which owns out_dir)."""
    for path in reversed(complete_checkpoints(out_dir, clean)):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            print(f"warning: skipping damaged checkpoint: {e}; trying the one before it")
    return None, None


def check_same_run(state, now, world, path):
    """Refuse to continue a run with the settings of another (see SAME_RUN_KEYS), or with another number of tokens per
    step: with total_batch_size 0 that number follows the number of processes. `state` is the checkpoint's."""
    saved = state["config"]
    differ = [k for k in SAME_RUN_KEYS if saved.get(k) != now[k]]
    if differ:
        what = "the model differs" if set(differ) & set(MODEL_KEYS) else "the run's settings differ"
        detail = "; ".join(f"{k} {saved.get(k)!r} (checkpoint) != {now[k]!r} (now)" for k in differ)
        raise CheckpointError(f"cannot resume from {path}: {what}: {detail}. Resume with the run's settings, or "
                              "start a new run in another --out_dir")
    (before, how_before), (after, how_now) = _tokens_per_step(saved, state["world_size"]), _tokens_per_step(now, world)
    if before != after:
        raise CheckpointError(f"cannot resume from {path}: it trained {before:,} tokens per step ({how_before}), this run "
                              f"would train {after:,} ({how_now}). Resume with --total_batch_size {before} (a multiple "
                              f"of batch_size x seq_len x processes), or on {state['world_size']} process(es)")


def _tokens_per_step(settings, world):
    """(tokens per optimizer step, how they come about) for a run's settings on `world` processes."""
    if settings["total_batch_size"]:
        return settings["total_batch_size"], f"total_batch_size {settings['total_batch_size']}"
    B, T = settings["batch_size"], settings["seq_len"]
    return B * T * world, f"total_batch_size 0: batch_size {B} x seq_len {T} x {world} process(es)"


def read_newest(path):
    """(step folder, its files read whole) of a step folder, or of a run folder's newest checkpoint that reads whole:
    as the trainer resumes, a damaged one is named and the one before it used. Incomplete saves are left alone (for
    the tools after training: their run may still be writing)."""
    step = resolve_checkpoint(path)  # raises the error that says what path lacks
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        return step, read_checkpoint(step)
    step, ckpt = newest_readable(path, clean=False)
    if step is None:
        raise CheckpointError(f"none of the complete checkpoints in {path} can be read")
    return step, ckpt


def load_model(path, device="cpu", attention=None):
    """A trained GPT from a checkpoint (a step folder, or a run folder: its newest that reads) -> (model, the run's
    settings, the step folder it came from)."""
    path, ckpt = read_newest(path)
    settings = ckpt["state"]["config"]
    config = GPTConfig(**{k: settings[k] for k in GPTConfig.__dataclass_fields__ if k in settings})
    if attention is not None:
        config.attention = attention
    model = GPT(config).to(device)
    model.load_state_dict(ckpt["model"])
    return model, settings, path
