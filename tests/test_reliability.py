"""Faults across processes (torchrun, gloo, CPU): NaN on one rank, a stop request on one rank, data that wraps,
resuming on another world size. Each run has a 30 s collective timeout and a subprocess timeout, so a regression
that would hang fails instead."""
import json
import os
import tempfile

import numpy as np
import torch

from conftest import gpt2_or_skip, read_metrics, train
from data.loader import ShardLoader
from data.shards import write_shard
from model import GPT, GPTConfig
from training.distributed import STOPPED_EXIT_CODE

DIST = ["--dist_timeout=30", "--batch_size=2"]


def test_nan_on_one_rank_stops_every_rank_without_saving_it(data_dir, tmp_path):
    run = train(f"--data_dir={data_dir}", *DIST, "--max_steps=6", "--checkpoint_interval=1", f"--out_dir={tmp_path}",
                nproc=2, fault="nan:1:2")
    assert run.returncode != 0
    assert "non-finite loss at step 2" in run.stdout
    assert "exitcode  : 1" in run.stderr  # torchrun's report: the workers exited with 1, not killed by a timeout
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000001", "step_000002"]  # the states after steps 0, 1


def test_a_stop_request_on_one_rank_stops_every_rank_at_the_same_step(data_dir, tmp_path):
    run = train(f"--data_dir={data_dir}", *DIST, "--max_steps=6", "--checkpoint_interval=100", f"--out_dir={tmp_path}",
                nproc=2, fault="stop:1:2")
    assert run.returncode != 0 and f"exitcode  : {STOPPED_EXIT_CODE}" in run.stderr, run.stderr  # stopped, not done
    assert "stop requested (by 1 rank(s)) at step 2" in run.stdout
    assert "torchrun's failure report below (ChildFailedError, exitcode 75) is this stop, not a crash" in run.stdout
    assert json.load(open(tmp_path / "summary.json"))["exit_status"] == STOPPED_EXIT_CODE
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert os.listdir(tmp_path / "checkpoints") == ["step_000003"]  # saved on the way out
    assert "parameters identical on all 2 ranks: yes" in run.stdout


def test_with_overlap_steps_a_nan_or_a_stop_is_acted_on_a_step_later(data_dir, tmp_path):
    """overlap_steps reads step N's figures after step N+1 is queued, but before a checkpoint of the state after step
    N. A NaN at step 1, the step before a checkpoint, is seen before it: the run stops (exit 1) without saving it, with
    only step 0 logged. A stop request during step 2 is seen after step 3:
    every rank finishes step 3, logs it, saves the state after it and exits as stopped."""
    common = [f"--data_dir={data_dir}", *DIST, "--max_steps=8", "--checkpoint_interval=5", "--overlap_steps"]
    run = train(*common, "--checkpoint_interval=2", f"--out_dir={tmp_path / 'nan'}", nproc=2, fault="nan:1:1")
    assert run.returncode != 0 and "exitcode  : 1" in run.stderr, run.stderr
    assert "non-finite loss at step 1" in run.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "nan")] == [0]
    assert not os.path.exists(tmp_path / "nan" / "checkpoints") or not os.listdir(tmp_path / "nan" / "checkpoints")

    run = train(*common, f"--out_dir={tmp_path / 'stop'}", nproc=2, fault="stop:1:2")
    assert run.returncode != 0 and f"exitcode  : {STOPPED_EXIT_CODE}" in run.stderr, run.stderr
    assert "stop requested (by 1 rank(s)) at step 2: every rank stops after step 3" in run.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "stop")] == [0, 1, 2, 3]
    assert os.listdir(tmp_path / "stop" / "checkpoints") == ["step_000004"]
    assert "parameters identical on all 2 ranks: yes" in run.stdout


def test_a_stop_on_one_rank_during_an_evaluation_with_hellaswag_stops_every_rank_cleanly(tmp_path):
    """Rank 1 gets SIGINT during its first validation batch, rank 0 does not: HellaSwag, which ends in an all-reduce,
    is skipped on both (or a collective mismatch would abort gloo), no evaluation is written, and every rank trains
    step 0, saves the state after it and exits with the stopped status."""
    gpt2_or_skip()
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "t_train_000000.bin", rng.integers(0, 50257, 3000))
    write_shard(tmp_path / "t_val_000000.bin", rng.integers(0, 50257, 3000))
    example = dict(ctx="A man walks into a room", label=1, endings=["and sits.", "then leaves.", "quickly.", "hello."])
    (tmp_path / "hellaswag_val.jsonl").write_text("".join(json.dumps({**example, "ind": i}) + "\n" for i in range(8)))
    run = train(f"--data_dir={tmp_path}", *DIST, "--vocab_size=50257", "--max_steps=3", "--eval_interval=2",
                "--eval_batches=3", "--hellaswag", f"--hellaswag_path={tmp_path / 'hellaswag_val.jsonl'}",
                "--sample_count=0", "--checkpoint_interval=100", f"--out_dir={tmp_path / 'out'}", nproc=2,
                fault="evalstop:1:0", env={**os.environ, "EXIT_STATUS_DIR": str(tmp_path)})
    assert run.returncode != 0 and f"exitcode  : {STOPPED_EXIT_CODE}" in run.stderr, run.stderr
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == [str(STOPPED_EXIT_CODE)] * 2
    assert "stop requested (by 1 rank(s)) at step 0: every rank stops after step 0" in run.stdout
    assert (tmp_path / "out" / "evals.jsonl").read_text() == ""
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [0]
    assert os.listdir(tmp_path / "out" / "checkpoints") == ["step_000001"]
    assert "parameters identical on all 2 ranks: yes" in run.stdout


def test_only_rank_zero_writes_logs(data_dir, tmp_path):
    run = train(f"--data_dir={data_dir}", *DIST, "--max_steps=5", f"--out_dir={tmp_path}", nproc=2)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(tmp_path)) == [".lock", "checkpoints", "config.json", "evals.jsonl", "metrics.jsonl",
                                            "summary.json"]  # the tiny config saves the final state
    assert len(read_metrics(tmp_path)) == 5
    assert run.stdout.count("final: step 4") == 1


def test_data_that_wraps_every_few_steps_never_hangs(tmp_path):
    write_shard(tmp_path / "small_train_000000.bin", np.random.default_rng(1).integers(0, 128, 200))
    # 2 ranks x 2 x 16 tokens = 64 a step: the stream wraps every 3 steps, on both ranks at once
    run = train(f"--data_dir={tmp_path}", *DIST, "--max_steps=8", f"--out_dir={tmp_path / 'out'}", nproc=2)
    assert run.returncode == 0, run.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == list(range(8))


def test_resume_on_another_number_of_processes_keeps_the_tokens_per_step(tmp_path):
    """With total_batch_size 0 a step's tokens are batch_size x seq_len x processes: a resume that would change them
    is refused in one line; one that keeps them (1 -> 2 -> 1 processes, batch_size 2 -> 1 -> 2) trains the run's
    losses. The data is 200 tokens and a step takes 32 (+1): the first checkpoint, after 5 steps, is at position
    160, near the end, where the stream wraps after the next step."""
    write_shard(tmp_path / "small_train_000000.bin", np.random.default_rng(2).integers(0, 128, 200))
    common = [f"--data_dir={tmp_path}", "--dist_timeout=30", "--checkpoint_interval=100", "--timing_warmup=0"]
    straight = train(*common, "--batch_size=2", "--max_steps=9", f"--out_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    out = f"--out_dir={tmp_path / 'resumed'}"
    assert train(*common, "--batch_size=2", "--max_steps=5", out).returncode == 0
    before = [r["step"] for r in read_metrics(tmp_path / "resumed")]
    refused = train(*common, "--batch_size=2", "--max_steps=7", "--resume=auto", out, nproc=2)
    assert refused.returncode != 0
    assert ("it trained 32 tokens per step (total_batch_size 0: batch_size 2 x seq_len 16 x 1 process(es)), this run "
            "would train 64 (total_batch_size 0: batch_size 2 x seq_len 16 x 2 process(es)). Resume with "
            "--total_batch_size 32") in refused.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == before == [0, 1, 2, 3, 4]
    run = train(*common, "--batch_size=1", "--max_steps=7", "--resume=auto", out, nproc=2)
    assert run.returncode == 0, run.stderr
    assert "at step 5" in run.stdout and "32 tokens per step (1 micro-step(s) of 1x16 per process)" in run.stdout
    run = train(*common, "--batch_size=2", "--max_steps=9", "--resume=auto", out)
    assert run.returncode == 0, run.stderr
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(9))
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in read_metrics(tmp_path / "straight")],
                               rtol=0, atol=1e-5)


def test_a_position_near_the_end_of_the_data_restored_for_a_larger_step_wraps():
    """A loader that takes more tokens a step than the one that saved the position (another world size) starts
    again at the stream's start when its step would run past the end, as next_batch does, never an IndexError."""
    tokens = np.arange(200) % 128
    with tempfile.TemporaryDirectory() as d:
        write_shard(os.path.join(d, "s_train_000000.bin"), tokens)
        saved = ShardLoader(d, "train", 2, 16)
        for _ in range(5):
            saved.next_batch()
        assert saved.state_dict()["pos"] == 160
        ranks = [ShardLoader(d, "train", 2, 16, rank, 2) for rank in range(2)]
        for rank, loader in enumerate(ranks):
            loader.load_state_dict(saved.state_dict())
            x, _ = loader.next_batch()
            assert x.flatten().tolist() == tokens[32 * rank: 32 * rank + 32].tolist()


def test_backends_train_alike_for_20_steps():
    """Same seed, same batches, 20 AdamW steps: naive and sdpa (fp32, CPU) stay within 1e-4 of each other."""
    losses = {}
    for attention in ("naive", "sdpa"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32, attention=attention))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        losses[attention] = []
        for _ in range(20):
            # learnable: each next token is the previous one + 1
            idx = (torch.randint(0, 101, (4, 1), generator=g) + torch.arange(25)) % 101
            loss = model(idx[:, :-1], idx[:, 1:])[1]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[attention].append(loss.item())
    assert losses["naive"][-1] < losses["naive"][0] - 0.1  # it learned something: the comparison means something
    np.testing.assert_allclose(losses["naive"], losses["sdpa"], rtol=0, atol=1e-4)
