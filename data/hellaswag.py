"""HellaSwag validation: python -m data.hellaswag [--input PATH] [--out_dir data/hellaswag]

Each example is a context and four endings, one of them right. The model scores each ending by the mean cross-entropy
of its tokens given the context and picks the lowest: acc_norm. (The sum, acc, favours short endings: every token
adds loss.) The command downloads the 10,042 validation examples; `evaluate` scores a model on them.
"""
import argparse
import contextlib
import json
import os
import shutil
import sys
import urllib.request

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.tokenizer import gpt2_encoding

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def download(path):
    with urllib.request.urlopen(URL, timeout=30) as r, open(path, "wb") as f:
        shutil.copyfileobj(r, f)


def read_examples(path):
    """The examples of a HellaSwag .jsonl file, each checked for the fields that scoring reads."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; prepare it with python -m data.hellaswag")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                endings = example["endings"]
                ok = (isinstance(example["ctx"], str) and isinstance(endings, list) and len(endings) == 4
                      and all(isinstance(e, str) for e in endings) and example["label"] in range(4))
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                raise ValueError(f"{path}, line {line_no}: not a HellaSwag example (a JSON object with a string "
                                 "'ctx', a list of 4 string 'endings' and a 'label' from 0 to 3)")
            yield example


def render_example(example, enc, block_size=None):
    """tokens (4, L): the context then each ending, right-padded with zeros; mask (4, L): 1 on the ending's tokens.

    With block_size, each row keeps only its last block_size tokens (the context loses its start): a model cannot
    look further back. Rows are cut before padding, so a short row loses no more than it has to.
    """
    ctx = enc.encode_ordinary(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end = enc.encode_ordinary(" " + ending)  # the space belongs to the ending's first token in GPT-2's BPE
        row, m = ctx + end, [0] * len(ctx) + [1] * len(end)
        if block_size:
            row, m = row[-block_size:], m[-block_size:]
        rows.append(row)
        masks.append(m)
    length = max(len(row) for row in rows)
    tokens = torch.zeros((4, length), dtype=torch.long)
    mask = torch.zeros((4, length), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask, example["label"]


def evaluate(model, path, device, rank=0, world=1, autocast=contextlib.nullcontext(), limit=None, stop=lambda: False):
    """(acc_norm, num_correct, num_total) of model on the examples of path (the first `limit` if given).

    This process scores examples i with i % world == rank. When torch.distributed is initialized, the counts are
    summed over the ranks, so every rank returns the global figures, and every rank must call this. model is a GPT
    (it needs .config.block_size), not its DDP or torch.compile wrapper: the shapes vary from example to example.
    """
    enc = gpt2_encoding()
    num_correct = num_total = 0
    with torch.no_grad(), autocast:
        for i, example in enumerate(read_examples(path)):
            if (limit is not None and i >= limit) or stop():  # stop(): the run was asked to stop
                break
            if i % world != rank:
                continue
            # Contexts longer than the model's block_size are cut from the left (see render_example).
            tokens, mask, label = render_example(example, enc, model.config.block_size)
            tokens, mask = tokens.to(device), mask.to(device)
            logits, _ = model(tokens)
            # The logits at position t predict token t+1, so targets are the tokens shifted left by one. Only targets
            # that are ending tokens count: never the context, never the padding.
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
            target_mask = mask[:, 1:]
            mean_loss = (losses.view(4, -1) * target_mask).sum(1) / target_mask.sum(1)
            num_correct += int(mean_loss.argmin().item() == label)
            num_total += 1
            if rank == 0 and num_total % 500 == 0 and sys.stdout.isatty():  # progress, on a terminal only
                print(f"  hellaswag: about {num_total * world} examples scored", end="\r", flush=True)
    if dist.is_available() and dist.is_initialized():
        counts = torch.tensor([num_correct, num_total], device=device)
        dist.all_reduce(counts)  # SUM, the default: gloo has no AVG
        num_correct, num_total = counts.tolist()
    if num_total == 0 and not stop():
        raise ValueError(f"{path}: no examples to score (limit={limit}, world={world})")
    return num_correct / max(num_total, 1), num_correct, num_total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", help="a local copy of hellaswag_val.jsonl instead of downloading it")
    p.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag"))
    args = p.parse_args(argv)
    if args.input and not os.path.isfile(args.input):
        raise SystemExit(f"error: --input {args.input}: no such file")

    created = not os.path.isdir(args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "hellaswag_val.jsonl")
    tmp = f"{path}.tmp"  # renamed into place once checked: path is either absent or complete
    try:
        if args.input:
            shutil.copyfile(args.input, tmp)
        else:
            download(tmp)
        n = sum(1 for _ in read_examples(tmp))  # a truncated or foreign file fails now, not during training
        if n == 0:
            raise ValueError("it holds no examples")
    except (OSError, ValueError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if created:  # a failed preparation leaves nothing that looks prepared
            os.rmdir(args.out_dir)
        if isinstance(e, ValueError):
            raise SystemExit(f"error: {args.input or URL} is not HellaSwag's validation file: {e}") from None
        if args.input:
            raise SystemExit(f"error: could not copy {args.input} ({e})") from None
        raise SystemExit(f"error: could not download {URL} ({e}); download hellaswag_val.jsonl elsewhere and pass "
                         "--input PATH") from None
    os.replace(tmp, path)
    print(f"wrote {n:,} examples to {path}")


if __name__ == "__main__":
    main()
