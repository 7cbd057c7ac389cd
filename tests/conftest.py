"""Shared test set-up: Triton's interpreter on a CPU, the skip of GPU tests (the gpu mark) without a GPU, and the
pieces several test files use: synthetic token shards, a tiny model, and a runner for the real entry point."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable must be set before triton is
# first imported, hence here and not in a fixture.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# WANDB is never contacted by the tests.
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.shards import write_shard  # noqa: E402

NO_GPU = "needs a CUDA GPU; on one, `python -m pytest -m gpu -n 0` runs the GPU tests alone (README, Tests)"


def pytest_collection_modifyitems(config, items):
    """A test marked gpu needs a CUDA GPU: skipped here, in one place, so that each GPU test carries only the mark and
    `-m gpu` / `-m "not gpu"` split the suite along the same line as the skips."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=NO_GPU))


# A GPT that trains in milliseconds on a CPU, and the flags that select it (with the tiny config) for train_gpt2.py.
MODEL = dict(vocab_size=128, n_layer=2, n_head=2, n_embd=32, block_size=32)
FLAGS = [f"--{k}={v}" for k, v in MODEL.items()] + ["--device=cpu", "--compile=false", "--seq_len=16"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Random token shards for MODEL's vocabulary: a val split and a train split of two shards (a shard boundary)."""
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    write_shard(d / "synthetic_val_000000.bin", rng.integers(0, 128, 3000))
    write_shard(d / "synthetic_train_000001.bin", rng.integers(0, 128, 3000))
    write_shard(d / "synthetic_train_000002.bin", rng.integers(0, 128, 3000))
    return d


@pytest.fixture
def cpu_named(monkeypatch):
    """The measuring scripts name their files and run folders after the GPU they see; runs with --device=cpu are CPU
    runs, so a test of them hides the GPU from the script (not from its runs), and the names are the CPU's everywhere."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def train(*flags, nproc=1, env=None, fault=None):
    """Run train_gpt2.py --config tiny with MODEL (under torchrun when nproc > 1) and return the completed process.
    fault="KIND:RANK:STEP" runs it through tests/faulty_train.py, which injects that fault."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    script = os.path.join(ROOT, "tests", "faulty_train.py") if fault else os.path.join(ROOT, "train_gpt2.py")
    env = {**(os.environ if env is None else env), **({"FAULT": fault} if fault else {})}
    return subprocess.run(launcher + [script, "--config", "tiny", *FLAGS, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def qkv_views(B, H, T, D, dtype=torch.float32, seed=0, device="cpu"):
    """A leaf (B, T, 3·H·D) projection and q, k, v as the model makes them: strided (B, H, T, D) views of it."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return qkv, [t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2)]


def attention_fp64(q, k, v):
    """Causal attention in fp64, by the definition: the reference every backend is held to."""
    q, k, v = q.double(), k.double(), v.double()
    T = q.size(-2)
    s = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def gpt2_or_skip():
    """GPT-2's BPE encoding, or a skip that names what the test needs (CI provides the files through
    TIKTOKEN_CACHE_DIR, so nothing is skipped there)."""
    from data.tokenizer import gpt2_encoding
    try:
        return gpt2_encoding()
    except RuntimeError as e:
        pytest.skip(f"needs GPT-2's BPE files: {e}", allow_module_level=True)
