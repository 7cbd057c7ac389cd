"""The GPT-2 family's configurations (configs/gpt2_{124m,350m,774m,1558m}.toml): the GPT-2 paper's shapes, the
parameter counts of Hugging Face's GPT-2 of the same shape, a few training steps of each at a tiny width through the
trainer, and OpenAI's weights of every size through GPT.from_pretrained (a random Hugging Face model stands in for
the download)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from conftest import ROOT, read_metrics
from data.shards import write_shard
from model import GPT, GPT2_VOCAB, GPTConfig
from training.config import grad_accum_steps, load_config

# config -> the name of OpenAI's checkpoint on Hugging Face, and the GPT-2 paper's shape: layers, heads, width.
SIZES = {"gpt2_124m": ("gpt2", 12, 12, 768), "gpt2_350m": ("gpt2-medium", 24, 16, 1024),
         "gpt2_774m": ("gpt2-large", 36, 20, 1280), "gpt2_1558m": ("gpt2-xl", 48, 25, 1600)}


def hf_gpt2(n_layer, n_head, n_embd, vocab_size=GPT2_VOCAB, n_positions=1024):
    config = transformers.GPT2Config(n_positions=n_positions, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                                     n_embd=n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("name", SIZES)
def test_configuration_has_the_papers_shape_and_hugging_faces_parameter_count(name):
    model_config = load_config(["--config", name]).model
    _, n_layer, n_head, n_embd = SIZES[name]
    c = model_config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_embd // c.n_head, c.block_size) == (n_layer, n_head, n_embd, 64, 1024)
    assert c.vocab_size == 50304  # GPT-2's 50,257 padded to a multiple of 128
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        ours = GPT(model_config).num_params()
        theirs = sum(p.numel() for p in hf_gpt2(n_layer, n_head, n_embd, c.vocab_size, c.block_size).parameters())
    assert ours == theirs
    if name == "gpt2_124m":
        assert ours == 124_475_904


@pytest.mark.parametrize("name", SIZES)
def test_global_batch_is_kept_on_one_and_on_eight_gpus(name):
    """total_batch_size is a multiple of the micro-batch on 1 and 8 processes (grad_accum_steps refuses it else)."""
    cfg = load_config(["--config", name])
    for world in (1, 8):
        assert cfg.batch_size * cfg.seq_len * world * grad_accum_steps(cfg, world) == cfg.total_batch_size


@pytest.fixture(scope="module")
def pattern_dir(tmp_path_factory):
    """Token shards of a repeating sequence of 10 ids: a model learns it at once, so a few steps lower the loss."""
    d = tmp_path_factory.mktemp("pattern")
    tokens = np.arange(20_000) % 10
    write_shard(d / "pattern_val_000000.bin", tokens)
    write_shard(d / "pattern_train_000001.bin", tokens)
    return d


@pytest.mark.parametrize("name", ["gpt2_350m", "gpt2_774m", "gpt2_1558m"])
def test_tiny_width_version_of_each_size_trains(name, pattern_dir, tmp_path):
    """The _short configuration through the trainer, every setting its own (depth, heads, micro-batch, bf16
    parameters, recompute_gelu, the fused loss, the schedule) but the width (4 per head), the vocabulary, the
    sequence length and the global batch (two micro-steps), on the CPU without torch.compile."""
    _, _, n_head, _ = SIZES[name]
    cfg = load_config(["--config", f"{name}_short"])
    out_dir = tmp_path / "run"
    flags = [f"--n_embd={4 * n_head}", "--vocab_size=128", "--block_size=32", "--seq_len=8",
             f"--total_batch_size={2 * cfg.batch_size * 8}", "--max_steps=3", "--warmup_steps=1", "--timing_warmup=1",
             "--eval_interval=0", "--device=cpu", "--compile=false", f"--data_dir={pattern_dir}", f"--out_dir={out_dir}"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--config", f"{name}_short", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"(2 micro-step(s) of {cfg.batch_size}x8 per process)" in proc.stdout
    losses = [row["loss"] for row in read_metrics(out_dir)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses  # measured: 4.8 -> below 4 in the largest model


def randomised(hf):
    """HF initialises biases to zero and LayerNorm gains to one: random ones, so that a mix-up would show."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif ".ln_" in name:
                p.normal_(1.0, 0.1)
    return hf


@pytest.mark.parametrize("name", SIZES)
def test_from_pretrained_loads_every_size(name, monkeypatch):
    """GPT.from_pretrained for each of OpenAI's checkpoints, the download replaced by a random Hugging Face model of
    its shape: at full depth on the meta device (every name, shape and tensor that is copied, without the memory),
    then at two layers with real values, against Hugging Face's logits."""
    hf_name, n_layer, n_head, n_embd = SIZES[name]
    downloads = []

    def download(model_type, layers):
        downloads.append(model_type)
        return randomised(hf_gpt2(layers, n_head, n_embd))

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", lambda model_type: download(model_type, n_layer))
    with torch.device("meta"):
        model = GPT.from_pretrained(hf_name)
    assert downloads == [hf_name]
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (n_layer, n_head, n_embd)
    assert model.config.vocab_size == GPT2_VOCAB and model.config.block_size == 1024

    torch.manual_seed(0)
    hf = download(hf_name, 2)
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", lambda model_type: hf)
    model = GPT.from_pretrained(hf_name).eval()
    idx = torch.randint(0, GPT2_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


# scripts/bench_sizes.py on the CPU: a 2-layer 124M configuration, one backend.
BENCH_FLAGS = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--vocab_size=128", "--block_size=32", "--seq_len=8",
               "--batch_size=4", "--total_batch_size=512", "--device=cpu", "--compile=false"]


def test_bench_sizes_measures_one_gpus_share_of_the_8_gpu_run(tmp_path, cpu_named):
    """The run has one GPU's share of the 8-GPU global batch (512 / 8 = 64 tokens: 2 micro-steps of 4 x 8), its
    tokens/s is the trainer's over the timed steps, and the full run's estimate is that speed times 8."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_sizes
    bench_sizes.main(["--sizes", "124m", "--backends", "sdpa", "--steps", "3", "--warmup", "1",
                      "--results_dir", str(tmp_path), "--", *BENCH_FLAGS])
    with open(tmp_path / "sizes_gpt2_124m_cpu.json") as f:
        (row,) = json.load(f)["rows"]
    assert row["status"] == "ok" and (row["batch_size"], row["accum"]) == (4, 2)
    timed = read_metrics(tmp_path / "runs" / "cpu" / "sizes_gpt2_124m" / "sdpa")[1:]
    assert len(timed) == 2 and row["tok_per_s"] == pytest.approx(64 / (np.mean([r["dt_ms"] for r in timed]) / 1e3))
    assert row["full_run_tokens"] == 19073 * 512  # gpt2_124m's steps, at the flags' global batch
    hours = 19073 * 512 / (8 * row["tok_per_s"]) / 3600
    assert row["est_hours_8gpu"] == pytest.approx(hours) and row["est_usd_8gpu"] == pytest.approx(hours * 8 * 3.5)
    assert "| 124m | sdpa | 4 | 2 |" in (tmp_path / "sizes_gpt2_124m_cpu.md").read_text()


@pytest.mark.parametrize("setup, flags, message", [
    ("earlier", [], "sizes_gpt2_124m_cpu.json exists (an earlier measurement); give --name"),
    ("", ["--batch_size=5"], "total_batch_size 512 is not a multiple of batch_size*seq_len*processes = 5*8*8"),
    ("", ["--atention=sdpa"], "unknown key 'atention'; did you mean --attention"),
])
def test_bench_sizes_refuses_before_any_run(tmp_path, cpu_named, setup, flags, message):
    """An earlier measurement in the way, a global batch 8 GPUs cannot share, a typo: one line, exit 1, no run."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_sizes
    if setup == "earlier":
        (tmp_path / "sizes_gpt2_124m_cpu.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        bench_sizes.main(["--sizes", "124m", "--results_dir", str(tmp_path), "--", *BENCH_FLAGS, *flags])
    assert exit_info.value.code.startswith("error: ") and message in exit_info.value.code
    assert "\n" not in exit_info.value.code and not (tmp_path / "runs").exists()
    assert setup != "earlier" or (tmp_path / "sizes_gpt2_124m_cpu.json").read_text() == "{}"
