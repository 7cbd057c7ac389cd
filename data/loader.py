"""The training loader: batches from the token shards of a split (format: data/shards.py)."""
import sys

import numpy as np
import torch

from data.shards import find_shards, read_header, read_shard


class ShardLoader:
    """Batches of B sequences of T tokens, read in order: for one shard, the classic step-49 reference's batches.

    The shards of a split are one stream of tokens, in file order. A micro-step's global batch is the stretch of
    world·B·T tokens at `pos`; rank r takes the window stream[pos + r·B·T : pos + (r+1)·B·T + 1], with
    x = window[:-1], y = window[1:]. A window may run from one shard into the next, so no window is dropped or
    repeated at a shard boundary. An optimizer step reads `accum` micro-steps; when the next step's
    accum·world·B·T tokens would run past the end of the stream, `pos` returns to 0. So every rank wraps at the
    same step, and any split of a step's tokens into processes and micro-steps (world·accum constant) reads the
    same rows. `pos` is the whole state, so a checkpoint made with one world size resumes with another.
    """

    def __init__(self, data_dir, split, B, T, rank=0, world=1, vocab_size=None, accum=1):
        self.B, self.T, self.rank, self.world, self.accum = B, T, rank, world, accum
        self.paths = find_shards(data_dir, split)
        self.shards = [read_shard(p) for p in self.paths]
        for path, tokens in zip(self.paths, self.shards):
            if len(tokens) == 0:
                raise ValueError(f"{path}: empty shard; prepare the data again")
        if vocab_size is not None:
            # Fail now, with the file named, rather than with a CUDA assert in the embedding mid-run.
            for path, largest in zip(self.paths, largest_token_ids(self.paths, self.shards)):
                if largest >= vocab_size:
                    raise ValueError(f"{path}: token id {largest} >= vocab_size {vocab_size}")
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # stream offset of each shard
        self.step_tokens = accum * world * B * T
        if self.starts[-1] < self.step_tokens + 1:
            raise ValueError(f"{', '.join(self.paths)}: {self.starts[-1]} '{split}' tokens, fewer than one step needs "
                             f"(micro-steps*processes*batch_size*seq_len+1 = {self.step_tokens + 1}); "
                             "use more data or a smaller batch")
        self.pos = self.micro = 0

    def _read(self, start, n):
        """stream[start : start + n], gathered from as many shards as it spans."""
        pieces, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while n > 0:
            offset = start - self.starts[i]
            piece = self.shards[i][offset : offset + n]
            pieces.append(piece)
            start, n, i = start + len(piece), n - len(piece), i + 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def next_batch(self, device="cpu"):
        """The next (x, y), each (B, T) int64, on device. For a CUDA device the window is gathered into pinned host
        memory and copied with non_blocking=True, so the host does not wait for the copy (nor for the GPU work queued
        before it) and goes on queueing the step; PyTorch's caching host allocator hands that pinned buffer out again
        only after the copy has completed. For the CPU nothing is pinned and the window itself is the batch."""
        B, T = self.B, self.T
        device = torch.device(device)
        window = torch.empty(B * T + 1, dtype=torch.int64, pin_memory=device.type == "cuda")
        window.numpy()[:] = self._read(self.pos + self.rank * B * T, B * T + 1)
        window = window.to(device, non_blocking=True)
        self.pos += self.world * B * T
        self.micro = (self.micro + 1) % self.accum
        if self.micro == 0 and self.pos + self.step_tokens + 1 > self.starts[-1]:
            self.pos = 0
        return window[:-1].view(B, T), window[1:].view(B, T)

    def reset(self):
        self.pos = self.micro = 0

    def state_dict(self):  # taken between optimizer steps, where micro == 0
        return {"pos": int(self.pos), "tokens": int(self.starts[-1])}

    def load_state_dict(self, state):
        if state["tokens"] != self.starts[-1]:
            raise ValueError(f"the checkpoint was made on {state['tokens']} tokens of data, {', '.join(self.paths)} "
                             f"hold {self.starts[-1]}: the data changed, so its position cannot be restored")
        self.pos = state["pos"]
        if self.pos + self.step_tokens + 1 > self.starts[-1]:  # saved by a loader of smaller steps: wrap as it would
            self.pos = 0


def largest_token_ids(paths, shards):
    """Each shard's largest token id, from its header; version-1 shards do not record it, so their tokens are read."""
    recorded = [read_header(path)[1] for path in paths]
    old = [path for path, largest in zip(paths, recorded) if largest is None]
    if old:
        print(f"reading every token of {len(old)} version-1 shard(s) ({old[0]}, ...) to check them against vocab_size: "
              "they do not record their largest token id; shards prepared again skip this", file=sys.stderr)
    return [int(tokens.max()) if largest is None else largest for tokens, largest in zip(shards, recorded)]
