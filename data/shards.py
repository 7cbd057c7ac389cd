"""Token shards: the one on-disk format for every corpus, and the one loader that reads it.

A shard is a 256-int32 header (magic, version, token count, then zeros) followed by the tokens as uint16
(GPT-2's 50,257 ids fit). The header lets a reader detect a truncated or foreign file instead of training on it.
Shards of a split are named `<anything>_<split>_<index>.bin` and read, in sorted order, as one stream.
"""
import glob
import os

import numpy as np
import torch

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256


def write_shard(path, tokens):
    """Write tokens atomically: a crash leaves either the old file or the complete new one, never half of one."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must be in [0, 65535] to be stored as uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(tokens)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_shard(path):
    """The shard's tokens as a read-only uint16 memory map, after checking its header against its size."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != MAGIC:
        raise ValueError(f"{path}: not a token shard (bad header); prepare data with the scripts in data/")
    if header[1] != VERSION:
        raise ValueError(f"{path}: shard version {header[1]}, this code reads version {VERSION}")
    n_tokens = int(header[2])
    expected = 4 * HEADER_INTS + 2 * n_tokens
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file has "
                         f"{os.path.getsize(path)} bytes; the shard is truncated or corrupt, prepare it again")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * HEADER_INTS, shape=(n_tokens,))


def find_shards(data_dir, split):
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist; prepare it first "
                                f"(python -m data.tinyshakespeare) or set --data_dir")
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.bin")))
    if not paths:
        raise FileNotFoundError(f"no '{split}' shards (*_{split}_*.bin) in {data_dir!r}; prepare the data first")
    return paths


class ShardLoader:
    """Batches of B sequences of T tokens, read in order: for one shard, the classic step-49 reference's batches.

    The shards of a split are one stream of tokens, in file order. A step's global batch is the stretch of
    world·B·T tokens at `pos`; rank r takes the window stream[pos + r·B·T : pos + (r+1)·B·T + 1], with
    x = window[:-1], y = window[1:]. A window may run from one shard into the next, so no window is dropped or
    repeated at a shard boundary. When the next global batch would run past the end of the stream, `pos`
    returns to 0: every rank wraps at the same step, and world ranks read exactly the rows that one process with
    world·B rows would read. `pos` is the whole state, so a checkpoint made with one world size resumes with another.
    """

    def __init__(self, data_dir, split, B, T, rank=0, world=1, vocab_size=None):
        self.B, self.T, self.rank, self.world = B, T, rank, world
        self.paths = find_shards(data_dir, split)
        self.shards = [read_shard(p) for p in self.paths]
        for path, tokens in zip(self.paths, self.shards):
            if len(tokens) == 0:
                raise ValueError(f"{path}: empty shard; prepare the data again")
            # Fail now, with the file named, rather than with a CUDA assert in the embedding mid-run.
            if vocab_size is not None and int(tokens.max()) >= vocab_size:
                raise ValueError(f"{path}: token id {int(tokens.max())} >= vocab_size {vocab_size}")
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # stream offset of each shard
        if self.starts[-1] < B * T * world + 1:
            raise ValueError(f"{', '.join(self.paths)}: {self.starts[-1]} '{split}' tokens, fewer than one step needs "
                             f"(batch_size*seq_len*world+1 = {B * T * world + 1}); use more data or a smaller batch")
        self.pos = 0

    def _read(self, start, n):
        """stream[start : start + n], gathered from as many shards as it spans."""
        pieces, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while n > 0:
            offset = start - self.starts[i]
            piece = self.shards[i][offset : offset + n]
            pieces.append(piece)
            start, n, i = start + len(piece), n - len(piece), i + 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def next_batch(self):
        B, T, step_tokens = self.B, self.T, self.B * self.T * self.world
        window = torch.from_numpy(self._read(self.pos + self.rank * B * T, B * T + 1).astype(np.int64))
        self.pos += step_tokens
        if self.pos + step_tokens + 1 > self.starts[-1]:
            self.pos = 0
        return window[:-1].view(B, T), window[1:].view(B, T)

    def reset(self):
        self.pos = 0

    def state_dict(self):
        return {"pos": int(self.pos), "tokens": int(self.starts[-1])}

    def load_state_dict(self, state):
        if state["tokens"] != self.starts[-1]:
            raise ValueError(f"the checkpoint was made on {state['tokens']} tokens of data, {', '.join(self.paths)} "
                             f"hold {self.starts[-1]}: the data changed, so its position cannot be restored")
        self.pos = state["pos"]
