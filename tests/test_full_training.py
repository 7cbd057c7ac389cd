"""Full-training features on the CPU: gradient accumulation and DDP, learning-rate schedule, checkpoints and
exact resume, evaluation and sampling with the model compiled, offline W&B."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import MODEL, read_metrics, train
from data.shards import write_shard
from model import GPT, HF_TRANSPOSED, GPTConfig
from train_gpt2 import autocast_context, learning_rate
from training.config import ConfigError, TrainConfig, grad_accum_steps
from training.metrics import peak_flops


def reference_get_lr(it, max_lr, min_lr, warmup_steps, max_steps):
    """build-nanogpt's get_lr (train_gpt2.py), transcribed: the schedule the classic reproduction trains with."""
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return min_lr
    decay_ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (max_lr - min_lr)


@pytest.mark.parametrize("max_lr, min_lr, warmup, steps", [(6e-4, 6e-5, 715, 19073), (1e-3, 0.0, 10, 100), (3e-4, 1e-5, 0, 7)])
def test_learning_rate_schedule_is_the_reference(max_lr, min_lr, warmup, steps):
    cfg = TrainConfig(lr_schedule="cosine", learning_rate=max_lr, min_lr=min_lr, warmup_steps=warmup, max_steps=steps)
    for step in range(steps):
        assert learning_rate(cfg, step) == pytest.approx(reference_get_lr(step, max_lr, min_lr, warmup, steps), rel=1e-12)
    assert learning_rate(cfg, steps - 1) > min_lr  # the last step still trains when min_lr is 0
    assert learning_rate(TrainConfig(), 123) == 3e-4  # constant


def test_gradient_accumulation_steps():
    assert grad_accum_steps(TrainConfig(batch_size=64, seq_len=1024, total_batch_size=524288), 1) == 8
    assert grad_accum_steps(TrainConfig(batch_size=64, seq_len=1024, total_batch_size=524288), 8) == 1
    assert grad_accum_steps(TrainConfig(batch_size=16, seq_len=1024), 4) == 1
    with pytest.raises(ConfigError, match=r"not a multiple of .* = 48\*1024\*1 = 49152; use total_batch_size 491520 or 540672, "
                       r"or batch_size one of \[4, 8, 16, 32, 64, 128, 256, 512\]"):
        grad_accum_steps(TrainConfig(batch_size=48, seq_len=1024, total_batch_size=524288), 1)


def test_two_ranks_equal_one_process_with_two_micro_steps(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--max_steps=4", "--batch_size=2", "--total_batch_size=64", "--grad_clip=1.0",
              "--lr_schedule=cosine", "--warmup_steps=2", "--decay_all_params=false"]
    ddp = train(*common, f"--out_dir={tmp_path / 'ddp'}", nproc=2)
    assert ddp.returncode == 0, ddp.stderr
    single = train(*common, f"--out_dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr
    assert "2 micro-step(s) of 2x16 per process" in single.stdout and "1 micro-step(s)" in ddp.stdout
    assert "parameters identical on all 2 ranks: yes" in ddp.stdout
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in read_metrics(tmp_path / "ddp")],
                                   [r[key] for r in read_metrics(tmp_path / "single")], rtol=0, atol=1e-6)
    assert not os.path.exists(tmp_path / "ddp" / "wandb")


def final_weights(out_dir, step):
    return torch.load(os.path.join(out_dir, "checkpoints", f"step_{step:06d}", "model.pt"))


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_continues_bitwise(data_dir, tmp_path, nproc):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--lr_schedule=cosine", "--warmup_steps=2",
              "--grad_clip=1.0", "--checkpoint_interval=3", "--keep_last=5", "--sample_count=0"]
    straight = train(*common, "--max_steps=6", f"--out_dir={tmp_path / 'straight'}", nproc=nproc)
    assert straight.returncode == 0, straight.stderr
    # The first run stops after 3 steps; the second resumes from its checkpoint for steps 3..5.
    first = train(*common, "--max_steps=3", f"--out_dir={tmp_path / 'resumed'}", nproc=nproc)
    assert first.returncode == 0, first.stderr
    second = train(*common, "--max_steps=6", "--resume=auto", f"--out_dir={tmp_path / 'resumed'}", nproc=nproc)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    assert [r["loss"] for r in read_metrics(tmp_path / "straight")] == [r["loss"] for r in read_metrics(tmp_path / "resumed")]
    a, b = final_weights(tmp_path / "straight", 6), final_weights(tmp_path / "resumed", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_incomplete_checkpoints_are_skipped_and_old_ones_pruned(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--checkpoint_interval=1", "--keep_last=2",
              f"--out_dir={tmp_path}"]
    assert train(*common, "--max_steps=5").returncode == 0
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_000004", "step_000005"]
    # A save killed midway: a half-written tmp directory, and a directory whose DONE marker never came.
    shutil.copytree(ckpts / "step_000005", ckpts / "step_000006.tmp")
    shutil.copytree(ckpts / "step_000005", ckpts / "step_000007")
    os.remove(ckpts / "step_000007" / "DONE")
    run = train(*common, "--max_steps=6", "--resume=auto")
    assert run.returncode == 0, run.stderr
    assert "skipping incomplete checkpoint" in run.stdout and "step_000007" in run.stdout
    assert "at step 5" in run.stdout  # the newest complete one
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
    assert sorted(os.listdir(ckpts)) == ["step_000005", "step_000006"]  # stale ones deleted, new one saved


def test_resume_with_another_model_shape_names_the_mismatch(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--checkpoint_interval=2", f"--out_dir={tmp_path}"]
    assert train(*common, "--max_steps=2").returncode == 0
    run = train(*common, "--max_steps=4", "--resume=auto", "--n_layer=3")
    assert run.returncode != 0 and "the model differs: n_layer 2 (checkpoint) != 3 (now)" in run.stderr


def test_evaluation_and_sampling_with_the_model_compiled(data_dir, tmp_path):
    run = train(f"--data_dir={data_dir}", "--batch_size=2", "--max_steps=3", "--eval_interval=2", "--eval_batches=3",
                "--compile=true", "--sample_prompt=a", "--sample_count=2", "--sample_tokens=5", "--checkpoint_interval=3",
                f"--out_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    evals = [json.loads(line) for line in open(tmp_path / "evals.jsonl")]
    assert [e["step"] for e in evals] == [0, 2, 3]  # every 2 steps and after the last: of the final weights
    # Step 0's samples, recomputed by a second code path: a fresh uncompiled model (same seed) sampling directly.
    from data.tokenizer import gpt2_encoding
    enc = gpt2_encoding()
    torch.manual_seed(1337)
    fresh = GPT(GPTConfig(**MODEL, attention="sdpa")).eval()
    prompt = torch.tensor(enc.encode("a")).repeat(2, 1)
    expected = fresh.generate(prompt, 5, top_k=50, generator=torch.Generator().manual_seed(1337))
    assert evals[0]["samples"] == [enc.decode(row.tolist()) for row in expected]
    # Step 0's validation loss, recomputed by a second code path: fresh model, same seed, the first val batches.
    from data.loader import ShardLoader
    torch.manual_seed(1337)
    model = GPT(GPTConfig(**MODEL, attention="sdpa"))
    val = ShardLoader(data_dir, "val", 2, 16)
    with torch.no_grad():
        expected = sum(model(*val.next_batch())[1].item() for _ in range(3)) / 3
    assert evals[0]["val_loss"] == pytest.approx(expected, abs=1e-5)
    # The last evaluation is of the weights the run saved at its end.
    final = GPT(GPTConfig(**MODEL, attention="sdpa"))
    final.load_state_dict(final_weights(tmp_path, 3))
    val.reset()
    with torch.no_grad():
        expected = sum(final(*val.next_batch())[1].item() for _ in range(3)) / 3
    assert evals[2]["val_loss"] == pytest.approx(expected, abs=1e-5)


def wandb_or_skip():
    """W&B's tests need the wandb package: requirements.txt installs it (CI does), a bare GPU machine may lack it."""
    pytest.importorskip("wandb", reason="the wandb package is not installed here (pip install -r requirements.txt)")


# W&B's own offline run, without the trainer.
WANDB_PROBE = "import sys, wandb; wandb.init(mode='offline', dir=sys.argv[1], project='probe').finish()"


def skip_where_wandb_cannot_run(run, tmp_path):
    """The trainer logs locally when wandb.init fails (test_wandb_online_without_an_api_key_warns_and_trains), and a
    test of the W&B run then has nothing to check. If W&B's own offline run fails here too, in this environment but
    without the trainer, W&B cannot run on this machine: skip, with its error. If that run works, the failure is the
    trainer's, and the test goes on to fail."""
    if "warning: wandb.init failed" not in run.stdout:
        return
    folder = tmp_path / "wandb_probe"
    folder.mkdir(exist_ok=True)
    try:
        probe = subprocess.run([sys.executable, "-c", WANDB_PROBE, str(folder)], capture_output=True, text=True,
                               timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("W&B cannot run here: its own offline run (no trainer) did not finish in 180 s")
    if probe.returncode != 0:
        error = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        pytest.skip(f"W&B cannot run here: its own offline run (no trainer) failed too: {error}")


def test_wandb_offline_without_an_api_key(data_dir, tmp_path, monkeypatch):
    wandb_or_skip()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    run = train(f"--data_dir={data_dir}", "--batch_size=2", "--max_steps=2", "--wandb", f"--out_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    assert "no W&B API key" in run.stdout
    skip_where_wandb_cannot_run(run, tmp_path)
    assert any(name.startswith("offline-run-") for name in os.listdir(tmp_path / "wandb"))
    assert len(read_metrics(tmp_path)) == 2  # local logs regardless


def test_hellaswag_during_training_equals_a_direct_evaluation(tmp_path):
    """The trainer's HellaSwag figure at step 0 against an independent computation (reference_acc_norm)."""

    rng = np.random.default_rng(0)
    write_shard(tmp_path / "t_train_000000.bin", rng.integers(0, 50257, 3000))
    write_shard(tmp_path / "t_val_000000.bin", rng.integers(0, 50257, 3000))
    examples = [dict(ind=i, activity_label="x", ctx_a="A man walks", ctx_b="into", ctx=f"A man walks into a room {i}",
                     split="val", split_type="indomain", label=i % 4, source_id="s",
                     endings=["and sits.", "then leaves the room.", "quickly.", "and says hello to everyone there."])
                for i in range(6)]
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    model_flags = {**MODEL, "vocab_size": 50257}
    run = train(f"--data_dir={tmp_path}", "--batch_size=2", "--max_steps=1", "--eval_interval=1", "--eval_batches=1",
                "--hellaswag", f"--hellaswag_path={path}", "--sample_count=0", f"--out_dir={tmp_path / 'out'}",
                *[f"--{k}={v}" for k, v in model_flags.items()])
    assert run.returncode == 0, run.stderr
    evals = [json.loads(line) for line in open(tmp_path / "out" / "evals.jsonl")]
    assert evals[0]["hellaswag_acc_norm"] == pytest.approx(reference_acc_norm(model_flags, examples))


def reference_acc_norm(model_flags, examples):
    """HellaSwag acc_norm of the trainer's step-0 model, computed without data/hellaswag.py: the same weights (seed
    1337) in transformers' GPT2LMHeadModel, and the definition: per ending, the mean loss of its tokens given the
    context; the ending with the lowest mean wins."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from data.tokenizer import gpt2_encoding
    torch.manual_seed(1337)
    ours = GPT(GPTConfig(**model_flags, attention="sdpa")).state_dict()
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=model_flags["vocab_size"], n_positions=model_flags["block_size"],
                                    n_embd=model_flags["n_embd"], n_layer=model_flags["n_layer"],
                                    n_head=model_flags["n_head"], activation_function="gelu_new")).eval()
    missing, unexpected = hf.load_state_dict({k: v.t() if k.endswith(HF_TRANSPOSED) else v for k, v in ours.items()},
                                             strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing)
    enc = gpt2_encoding()
    correct = 0
    for ex in examples:
        context = enc.encode(ex["ctx"])
        scores = []
        for ending in ex["endings"]:
            tokens = context + enc.encode(" " + ending)
            with torch.no_grad():
                logits = hf(torch.tensor([tokens])).logits[0]
            losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(tokens[1:]), reduction="none")
            scores.append(losses[len(context) - 1:].mean().item())  # the ending's tokens only
        correct += int(np.argmin(scores) == ex["label"])
    return correct / len(examples)


def test_training_offline_skips_samples_with_a_warning(data_dir, tmp_path):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}  # no BPE files, and any download fails at once
    run = train(f"--data_dir={data_dir}", "--batch_size=2", "--max_steps=2", "--eval_interval=1", "--eval_batches=1",
                f"--out_dir={tmp_path / 'out'}", env=env)
    assert run.returncode == 0, run.stderr
    assert "warning: no samples during evaluation" in run.stdout and "TIKTOKEN_CACHE_DIR" in run.stdout
    assert len(read_metrics(tmp_path / "out")) == 2


def test_wandb_online_without_an_api_key_warns_and_trains(data_dir, tmp_path):
    wandb_or_skip()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="online", HOME=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    run = train(f"--data_dir={data_dir}", "--batch_size=2", "--max_steps=2", "--wandb", f"--out_dir={tmp_path / 'out'}",
                env=env)
    assert run.returncode == 0, run.stderr
    assert "warning: wandb.init failed" in run.stdout and "logging locally only" in run.stdout
    assert len(read_metrics(tmp_path / "out")) == 2


def test_wandb_resumes_the_same_run(data_dir, tmp_path, monkeypatch):
    wandb_or_skip()
    monkeypatch.setenv("WANDB_MODE", "offline")
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--wandb", "--checkpoint_interval=2", f"--out_dir={tmp_path}"]
    first = train(*common, "--max_steps=2")
    assert first.returncode == 0, first.stderr
    skip_where_wandb_cannot_run(first, tmp_path)
    run_id = torch.load(tmp_path / "checkpoints" / "step_000002" / "state.pt")["wandb_id"]
    assert train(*common, "--max_steps=4", "--resume=auto").returncode == 0
    runs = sorted(name for name in os.listdir(tmp_path / "wandb") if name.startswith("offline-run-"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)  # W&B's folders: offline-run-<time>-<id>


def test_a_rank_that_cannot_read_the_checkpoint_fails_the_run_naming_itself(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--batch_size=2", "--checkpoint_interval=2", "--dist_timeout=30",
              f"--out_dir={tmp_path}"]
    assert train(*common, "--max_steps=2").returncode == 0
    run = train(*common, "--max_steps=4", "--resume=auto", nproc=2, fault="unreadable:1:0")
    assert run.returncode != 0
    assert f"rank 1 on {socket.gethostname()}" in run.stderr and "a folder that every machine sees" in run.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]  # nothing trained, nothing lost


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA L4", 121e12),
                                        ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12), ("NVIDIA A10G", 125e12),
                                        ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla T4", None), ("NVIDIA A40", None)])
def test_mfu_peak_of_real_device_names(name, peak):
    """torch.cuda.get_device_name() strings as the GPUs report them; each gets its own datasheet figure."""
    assert peak_flops(name) == peak


def test_a_gpu_without_bf16_stops_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(ConfigError, match="Tesla V100-SXM2-16GB has no bf16 tensor cores"):
        autocast_context(torch.device("cuda", 0))
