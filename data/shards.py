"""Token shards: the one on-disk format for every corpus (data/loader.py reads them for training).

A shard is a 256-int32 header (magic, version, token count, largest token id, then zeros) followed by the tokens as
uint16 (GPT-2's 50,257 ids fit). The header lets a reader detect a truncated or foreign file instead of training on
it, and check the ids against a vocabulary without reading them all. Version-1 shards (no largest id) still read.
Shards of a split are named `<anything>_<split>_<index>.bin` and read, in sorted order, as one stream.
"""
import glob
import os

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 2, 256


def write_shard(path, tokens):
    """Write tokens atomically: a crash leaves either the old file or the complete new one, never half of one."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must be in [0, 65535] to be stored as uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:4] = MAGIC, VERSION, len(tokens), tokens.max() if tokens.size else -1
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_header(path):
    """(token count, largest token id) from the shard's header, checked against the file's size; the largest id is
    None in a version-1 shard, which does not record it."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != MAGIC:
        raise ValueError(f"{path}: not a token shard (bad header); prepare data with the scripts in data/")
    if header[1] not in (1, VERSION):
        raise ValueError(f"{path}: shard version {header[1]}, this code reads versions 1 and {VERSION}")
    n_tokens = int(header[2])
    expected = 4 * HEADER_INTS + 2 * n_tokens
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file has "
                         f"{os.path.getsize(path)} bytes; the shard is truncated or corrupt, prepare it again")
    return n_tokens, (int(header[3]) if header[1] >= 2 else None)


def read_shard(path):
    """The shard's tokens as a read-only uint16 memory map, after checking its header."""
    n_tokens, _ = read_header(path)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * HEADER_INTS, shape=(n_tokens,))


# The command that prepares each corpus into its default folder, for the error messages.
PREPARE = {"tinyshakespeare": "python -m data.tinyshakespeare", "fineweb_edu": "python -m data.fineweb"}


def prepare_hint(data_dir):
    command = PREPARE.get(os.path.basename(os.path.normpath(data_dir)))
    if command:
        return f"prepare it with `{command}`"
    return f"prepare a corpus there ({' or '.join(f'`{c} --out_dir {data_dir}`' for c in PREPARE.values())})"


def find_shards(data_dir, split):
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist; {prepare_hint(data_dir)}, "
                                "or set --data_dir")
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.bin")))
    if not paths:
        raise FileNotFoundError(f"no '{split}' shards (*_{split}_*.bin) in {data_dir!r}; {prepare_hint(data_dir)}")
    return paths
