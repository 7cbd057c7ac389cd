"""Prepare FineWeb-Edu: python -m data.fineweb [--input PATH ...] [--out_dir DIR] [--shard_size N] [--workers N]

Tokenizes FineWeb-Edu's sample-10BT (about 10B GPT-2 tokens, from Hugging Face through the `datasets` package) or,
with --input, local .jsonl / .parquet files whose records have a `text` field, in the order given. Every document is
preceded by the end-of-text token, which marks where one document ends and the next begins. The token stream is cut
into shards of --shard_size tokens, a document that crosses a boundary continuing in the next shard. The first shard
is the validation split (fineweb_edu_val_000000.bin), the rest are training shards (fineweb_edu_train_000001.bin...).

The run can be interrupted and started again with the same arguments: it continues after the last complete shard and
writes exactly the files an uninterrupted run would have written.
"""
import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from data.shards import read_shard, write_shard
from data.tokenizer import gpt2_encoding, gpt2_encoding_or_exit

HF_DATASET, HF_NAME = "HuggingFaceFW/fineweb-edu", "sample-10BT"
PROGRESS = "progress.json"


# ----------------------------------------------------------------------------------------------------------
# The documents, in a fixed order: a resumed run skips the ones it has already stored by counting them.

def check_inputs(paths):
    """Fail before any work on a path that cannot be read, rather than hours into the run."""
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"--input {path}: no such file")
        if path.endswith(".parquet"):
            names = parquet_file(path).schema_arrow.names
            if "text" not in names:
                raise SystemExit(f"--input {path}: no 'text' column (columns: {', '.join(names)})")
        elif not path.endswith(".jsonl"):
            raise SystemExit(f"--input {path}: expected a .jsonl file (one JSON object per line) or a .parquet file")


def parquet_file(path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise SystemExit(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pyarrow.parquet.ParquetFile(path)


# These generators run in Pool.imap's feeder thread, which passes an Exception on to the loop that consumes the
# results but would die silently on a SystemExit, leaving that loop waiting forever: hence ValueError, and inputs
# (pyarrow included) checked beforehand by check_inputs.

def jsonl_texts(path):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_no}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}, line {line_no}: the record has no 'text' string; every record needs one")
            yield record["text"]


def parquet_texts(path):
    row = 0
    for batch in parquet_file(path).iter_batches(columns=["text"]):
        for text in batch.column("text").to_pylist():
            if not isinstance(text, str):
                raise ValueError(f"{path}, row {row}: 'text' is {text!r}, not a string; every row needs one")
            yield text
            row += 1


def local_documents(paths):
    for path in paths:
        yield from jsonl_texts(path) if path.endswith(".jsonl") else parquet_texts(path)


def fineweb_edu():
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("downloading FineWeb-Edu needs the datasets package: pip install datasets "
                         "(or, offline, pass local .jsonl/.parquet files with --input)") from None
    try:
        dataset = load_dataset(HF_DATASET, name=HF_NAME, split="train")
    except Exception as e:  # whatever the Hugging Face client raised: network, disk, authentication
        raise SystemExit(f"could not load {HF_DATASET} ({HF_NAME}): {type(e).__name__}: {e}\n"
                         "Download its parquet files elsewhere and pass them with --input.") from e
    return (row["text"] for row in dataset)


def tokenize(text):
    """One document's tokens, end-of-text first. Runs in the worker processes."""
    enc = gpt2_encoding()  # tiktoken caches the encoding: loaded once per worker, not once per document
    tokens = np.array([enc.eot_token] + enc.encode_ordinary(text), dtype=np.uint32)
    assert tokens.max() < 2**16, "GPT-2 token ids fit in uint16"
    return tokens.astype(np.uint16)


# ----------------------------------------------------------------------------------------------------------
# Resuming. progress.json lists, for every complete shard, its token count and where the stream continues after
# it: the index of the next document and how many of that document's tokens are already stored. It is replaced
# atomically after each shard, so it never lists a shard that was not completely written. A run stopped while
# writing a shard leaves only that shard's .tmp, which write_shard overwrites when the next run writes the shard; a
# shard written but not yet listed is simply written again, identically.

def shard_path(out_dir, index):
    return os.path.join(out_dir, f"fineweb_edu_{'val' if index == 0 else 'train'}_{index:06d}.bin")


def save_progress(out_dir, progress):
    path = os.path.join(out_dir, PROGRESS)
    with open(f"{path}.tmp", "w") as f:
        json.dump(progress, f, indent=1)
    os.replace(f"{path}.tmp", path)


def shard_intact(path, n_tokens):
    try:
        return len(read_shard(path)) == n_tokens
    except (OSError, ValueError):  # missing, truncated or foreign
        return False


def load_progress(out_dir, run):
    """The progress of earlier runs into out_dir, cut back to the shards still intact on disk."""
    path = os.path.join(out_dir, PROGRESS)
    if not os.path.exists(path):
        return dict(run, shards=[], done=False)
    with open(path) as f:
        progress = json.load(f)
    if {k: progress.get(k) for k in run} != run:
        raise SystemExit(f"{out_dir} holds shards prepared from {progress.get('source')} with shard_size "
                         f"{progress.get('shard_size')}, not from {run['source']} with shard_size {run['shard_size']}; "
                         "run again with the same --input and --shard_size, or choose another --out_dir")
    shards = progress["shards"]
    intact = 0
    while intact < len(shards) and shard_intact(shard_path(out_dir, intact), shards[intact]["tokens"]):
        intact += 1
    if intact < len(shards):
        print(f"{shard_path(out_dir, intact)} is missing or damaged: preparing again from there", file=sys.stderr)
        progress.update(shards=shards[:intact], done=False)
    return progress


class ProgressBar:
    """One line on stderr, redrawn at most twice a second."""

    def __init__(self):
        self.start = self.last = time.time()
        self.tokens = 0

    def update(self, new_tokens, shard, fill, shard_size):
        self.tokens += new_tokens
        now = time.time()
        if now - self.last >= 0.5:
            self.last = now
            rate = self.tokens / (now - self.start)
            sys.stderr.write(f"\rshard {shard} {100 * fill / shard_size:5.1f}% | {self.tokens:,} tokens this run "
                             f"| {rate:,.0f} tokens/s ")
            sys.stderr.flush()

    def close(self):
        sys.stderr.write(f"\r{self.tokens:,} tokens in {time.time() - self.start:.0f}s" + " " * 40 + "\n")


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", help="local .jsonl/.parquet files with a 'text' field, instead of "
                                              f"{HF_DATASET} ({HF_NAME}) from Hugging Face")
    p.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb_edu"))
    p.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    args = p.parse_args(argv)
    if args.shard_size < 1 or args.workers < 1:
        raise SystemExit("--shard_size and --workers must be at least 1")

    gpt2_encoding_or_exit()  # first, here: without the BPE files nothing else is worth doing
    if args.input:
        check_inputs(args.input)
    os.makedirs(args.out_dir, exist_ok=True)
    source = [os.path.abspath(path) for path in args.input] if args.input else f"{HF_DATASET} ({HF_NAME})"
    progress = load_progress(args.out_dir, dict(source=source, shard_size=args.shard_size))
    if progress["done"]:
        print(f"{args.out_dir} is complete: {len(progress['shards'])} shards")
        return

    shard = len(progress["shards"])
    doc, skip = (progress["shards"][-1]["next_doc"], progress["shards"][-1]["next_offset"]) if shard else (0, 0)
    if shard:
        print(f"resuming after {shard} complete shards, at document {doc:,}", file=sys.stderr)
    documents = local_documents(args.input) if args.input else fineweb_edu()
    buffer, fill = np.empty(args.shard_size, dtype=np.uint16), 0
    bar = ProgressBar()

    def finish_shard(next_doc, next_offset):
        """Store the buffer as the next shard, then record that it is complete and where the stream continues."""
        nonlocal shard, fill
        write_shard(shard_path(args.out_dir, shard), buffer[:fill])
        progress["shards"].append(dict(tokens=fill, next_doc=next_doc, next_offset=next_offset))
        save_progress(args.out_dir, progress)
        shard, fill = shard + 1, 0

    # Spawned workers, not forked, on every OS: the run behaves (and is tested) the same on Linux, macOS and Windows.
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        # Documents go to the workers 16 at a time (less inter-process traffic); imap returns them in order.
        for tokens in pool.imap(tokenize, itertools.islice(documents, doc, None), chunksize=16):
            pos, skip = skip, 0  # only the first document of a resumed run starts part-way in
            bar.update(len(tokens) - pos, shard, fill, args.shard_size)
            while pos < len(tokens):
                n = min(args.shard_size - fill, len(tokens) - pos)
                buffer[fill:fill + n] = tokens[pos:pos + n]
                fill, pos = fill + n, pos + n
                if fill == args.shard_size:
                    # pos may be the document's length: resuming there adds nothing from it, which is right.
                    finish_shard(doc, pos)
            doc += 1
    if fill:
        finish_shard(doc, 0)  # the last, partial shard
    bar.close()
    progress["done"] = True
    save_progress(args.out_dir, progress)
    total = sum(s["tokens"] for s in progress["shards"])
    print(f"wrote {total:,} tokens of {doc:,} documents to {len(progress['shards'])} shards in {args.out_dir}")


if __name__ == "__main__":
    main()
