"""Prepare Tiny Shakespeare: python -m data.tinyshakespeare [--input PATH] [--out_dir data/tinyshakespeare]

Tokenizes Karpathy's char-rnn corpus (1,115,394 characters, 338,025 GPT-2 tokens) and writes it, whole and in
order, as the train shard: the step-49 experiment trains on exactly this token stream, from its start. The val
shard is the last 10% of the same tokens. It is therefore not held out: it exercises the evaluation code on a
small corpus, it does not measure generalisation (use FineWeb-Edu's val shard for that).
"""
import argparse
import hashlib
import os
import urllib.request

import numpy as np

from data.shards import write_shard
from data.tokenizer import gpt2_encoding_or_exit

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def download():
    try:
        with urllib.request.urlopen(URL, timeout=30) as r:
            raw = r.read()
    except OSError as e:
        raise SystemExit(f"error: could not download {URL} ({e}); download input.txt elsewhere and pass --input PATH")
    if hashlib.sha256(raw).hexdigest() != SHA256:
        raise SystemExit(f"error: {URL} returned a file whose sha256 is not the canonical one; pass --input PATH instead")
    return raw.decode("utf-8")


def read_input(path):
    """The text of --input, or an exit with one line saying what is wrong with the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise SystemExit(f"error: --input {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: --input {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start}); convert it to UTF-8 first") from None
    except OSError as e:
        raise SystemExit(f"error: --input {path} cannot be read ({e.strerror})") from None
    if not text:
        raise SystemExit(f"error: --input {path} is empty: there are no tokens to write")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", help="a local copy of input.txt (or any UTF-8 text) instead of downloading")
    p.add_argument("--repeat", type=int, default=1, help="repeat the tokens this many times in the train shard, for "
                   "throughput runs whose steps (2^19 tokens in configs/gpt2_124m.toml) exceed the 338,025 tokens")
    p.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyshakespeare"))
    args = p.parse_args(argv)
    if args.repeat < 1:
        raise SystemExit(f"error: --repeat must be at least 1 (the train shard holds the text that many times), "
                         f"got {args.repeat}")

    text = read_input(args.input) if args.input else None
    enc = gpt2_encoding_or_exit()  # before the download: without the BPE files it would be wasted
    if text is None:
        text = download()
    tokens = np.array(enc.encode_ordinary(text), dtype=np.uint16)
    os.makedirs(args.out_dir, exist_ok=True)
    for split, part in (("train", np.tile(tokens, args.repeat)), ("val", tokens[len(tokens) * 9 // 10:])):
        path = os.path.join(args.out_dir, f"tinyshakespeare_{split}_000000.bin")
        write_shard(path, part)
        print(f"wrote {len(part):,} tokens to {path}")


if __name__ == "__main__":
    main()
