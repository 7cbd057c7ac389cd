"""Evaluate a checkpoint or OpenAI's GPT-2: validation loss and HellaSwag acc_norm.

    python scripts/evaluate.py out/gpt2_124m                      # the run's data folder and HellaSwag
    torchrun --standalone --nproc_per_node=8 scripts/evaluate.py --init gpt2 --data_dir data/fineweb_edu
    python scripts/evaluate.py out/gpt2_124m --tasks hellaswag --hellaswag_limit 1000

The model: a step folder, a run folder (its newest complete checkpoint that reads) or --init, as in sample.py.
Without --tasks, each task runs where it can and is skipped, saying why and how to get it, where it cannot (no data
folder, no HellaSwag file, no tokenizer offline); a task named in --tasks that cannot run is an error. Validation loss
is the mean cross-entropy of val_batches batches of batch_size x seq_len tokens read from the start of the data
folder's val split (data/loader.py: the rows do not depend on the number of processes), by default the run's own
data folder. HellaSwag is scored by data/hellaswag.py (prepare the file with python -m data.hellaswag). Under
torchrun each process takes its share of batches and examples and the figures are summed over processes. bf16
autocast on CUDA, as in training. Writes the figures with the command, machine and versions as JSON: eval.json in
the checkpoint's folder, or --out.
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from data import hellaswag  # noqa: E402
from data.loader import ShardLoader  # noqa: E402
from data.tokenizer import gpt2_encoding  # noqa: E402
from sample import add_model_args, load  # noqa: E402
from train_gpt2 import autocast_context, val_loss  # noqa: E402
from training.metrics import environment  # noqa: E402


TASKS = ["val", "hellaswag"]


def cannot_run(task, args):
    """Why task cannot run here, with how to make it run, or None."""
    if task == "val" and args.checkpoint is None and args.data_dir is None:
        return "no data folder for the validation loss: pass --data_dir (a checkpoint's run names its own)"
    if task == "hellaswag":
        if not os.path.isfile(args.hellaswag):
            return (f"{args.hellaswag} does not exist: prepare it with python -m data.hellaswag, or pass "
                    "--hellaswag PATH")
        try:
            gpt2_encoding()
        except RuntimeError as e:
            return f"HellaSwag needs GPT-2's tokenizer: {e}"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="default: every task that can run here (the others "
                   "are skipped, saying why)")
    p.add_argument("--data_dir", help="folder with *_val_*.bin shards; default: the checkpoint's data_dir")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, help="default: the model's block_size")
    p.add_argument("--val_batches", type=int, default=20, help="batches in all (a multiple of the processes)")
    p.add_argument("--hellaswag", default=os.path.join(ROOT, "data", "hellaswag", "hellaswag_val.jsonl"),
                   help="HellaSwag's validation file (python -m data.hellaswag writes it)")
    p.add_argument("--hellaswag_limit", type=int, help="score only the first this many examples")
    p.add_argument("--out", help="the JSON to write; default: eval.json in the checkpoint, out/eval_<init>.json")
    args = p.parse_args(argv)
    ddp = "RANK" in os.environ  # set by torchrun
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)

    # The mistakes that can be found before the model is loaded are found here, on every rank alike.
    asked = args.tasks or TASKS
    if "val" in asked and (args.val_batches < 1 or args.val_batches % world):
        raise SystemExit(f"error: --val_batches {args.val_batches} must be a positive multiple of the {world} processes")
    cannot = {task: why for task in asked if (why := cannot_run(task, args))}
    if args.tasks and cannot:
        raise SystemExit(f"error: {next(iter(cannot.values()))}")
    tasks = [task for task in asked if task not in cannot]
    if not tasks:
        raise SystemExit(f"error: nothing to evaluate here: {'; '.join(cannot.values())}")
    if rank == 0:
        for task, why in cannot.items():
            print(f"skipping {task}: {why}")

    model, device, name, settings = load(args, local_rank)
    out = args.out or (os.path.join(name, "eval.json") if args.checkpoint else
                       os.path.join("out", f"eval_{os.path.basename(os.path.normpath(name))}.json"))
    seq_len = args.seq_len or model.config.block_size
    data_dir = args.data_dir or settings.get("data_dir")
    if "val" in tasks:
        if seq_len > model.config.block_size:
            raise SystemExit(f"error: --seq_len {seq_len} is longer than {name}'s block_size {model.config.block_size}")
        try:
            loader = ShardLoader(data_dir, "val", args.batch_size, seq_len, rank, world, model.config.vocab_size)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        needed = args.val_batches * args.batch_size * seq_len + 1
        if loader.starts[-1] < needed:
            raise SystemExit(f"error: {data_dir} holds {loader.starts[-1]:,} val tokens, {args.val_batches} batches "
                             f"of {args.batch_size}x{seq_len} need {needed:,}; lower --val_batches or --batch_size")
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    try:
        autocast = autocast_context(device)
        results = dict(model=name, checkpoint=name if args.checkpoint else None, processes=world, skipped=cannot,
                       **environment(device))
        if "val" in tasks:
            # each process reads its rows of val_batches / world global batches
            results.update(val_loss=val_loss(model, loader, args.val_batches // world, device, autocast, rank, world),
                           val_data_dir=data_dir, val_tokens=args.val_batches * args.batch_size * seq_len)
            if rank == 0:
                print(f"val loss {results['val_loss']:.4f} over {results['val_tokens']:,} tokens of {data_dir}")
        if "hellaswag" in tasks:
            if rank == 0:
                print(f"HellaSwag: scoring {args.hellaswag} on {world} process(es)...", flush=True)
            t0 = time.time()
            acc, correct, total = hellaswag.evaluate(model, args.hellaswag, device, rank, world, autocast,
                                                     args.hellaswag_limit)
            results.update(hellaswag_acc_norm=acc, hellaswag_correct=correct, hellaswag_total=total)
            if rank == 0:
                print(f"HellaSwag acc_norm {acc:.4f} ({correct}/{total}) in {time.time() - t0:.0f} s")
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                json.dump(results, f, indent=2)
            print(f"wrote {out}")
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
