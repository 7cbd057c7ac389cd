"""The trainer end to end, through its real entry point, on synthetic token shards."""
import json
import os
import time

import numpy as np
import pytest
import torch

from contextlib import nullcontext
from types import SimpleNamespace

from conftest import FLAGS, MODEL, read_metrics, train
from data.loader import ShardLoader
from data.shards import write_shard
from model import GPT, GPTConfig
from train_gpt2 import build_model, evaluate, make_optimizer, train_step
from training.config import load_config

CPU = torch.device("cpu")
NO_STOP = SimpleNamespace(signalled=False, flag=lambda device: torch.zeros((), device=device))

def test_three_steps_through_the_entry_point(data_dir, tmp_path):
    started, started_unix = time.perf_counter(), time.time()
    run = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_steps=3", "--batch_size=4",
                "--timing_warmup=1")
    wall_ms = 1e3 * (time.perf_counter() - started)
    assert run.returncode == 0, run.stderr
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "dt_ms", "tok_per_s", "tok_per_s_per_gpu", "mfu",
                            "peak_mem_gib", "time"}
    # Each row's time is when the host had that step's figures (read right after the step's end mark on a CPU): in
    # order, within the run, and apart by the later step's time (it runs from the earlier one's end mark).
    times = [r["time"] for r in rows]
    assert started_unix <= times[0] <= times[1] <= times[2] <= time.time()
    assert rows[2]["dt_ms"] / 1e3 - 0.005 <= times[2] - times[1] <= rows[2]["dt_ms"] / 1e3 + 0.5
    assert rows[0]["mfu"] is None  # a CPU: no peak FLOP/s
    # A CPU run reports the process's peak RSS: at least the memory torch alone takes, at most the machine's.
    assert 0.1 < rows[0]["peak_mem_gib"] < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    for r in rows:
        assert np.isfinite(r["loss"]) and r["dt_ms"] > 0
        assert r["tok_per_s"] * r["dt_ms"] / 1e3 == pytest.approx(4 * 16)  # B*T tokens a step, one process
    assert sum(r["dt_ms"] for r in rows) < wall_ms  # step times are parts of the process's life
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["cuda"] is None and summary["gpu"] is None

    # Step 0's loss, recomputed here by a second code path: same seed, same first batch, fresh model.
    torch.manual_seed(1337)
    model = GPT(GPTConfig(**MODEL, attention="sdpa"))
    x, y = ShardLoader(data_dir, "train", 4, 16).next_batch()
    assert rows[0]["loss"] == pytest.approx(model(x, y)[1].item(), abs=1e-6)

    config = json.load(open(tmp_path / "config.json"))
    assert config["max_steps"] == 3 and config["n_layer"] == 2 and config["attention"] == "sdpa"
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["loss"] == [r["loss"] for r in rows] and summary["final_step"] == 2 and summary["exit_status"] == 0
    assert summary["mean_ms"] == pytest.approx((rows[1]["dt_ms"] + rows[2]["dt_ms"]) / 2)
    assert summary["torch"] == torch.__version__ and summary["command"]
    assert f"final: step 2 loss {rows[2]['loss']:.6f}" in run.stdout
    assert "attention backend: sdpa" in run.stdout
    assert "mean over steps 1-2 (the first 1 of this process left out as warm-up)" in run.stdout


def test_two_ranks_match_one_process_with_the_same_global_batch(data_dir, tmp_path):
    """Rank r reads the window at r·B·T, so 2 ranks × B rows see exactly the rows of 1 process × 2B."""
    ddp = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'ddp'}", "--max_steps=4", "--batch_size=2", nproc=2)
    assert ddp.returncode == 0, ddp.stderr
    single = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'single'}", "--max_steps=4", "--batch_size=4")
    assert single.returncode == 0, single.stderr
    ddp_loss = [r["loss"] for r in read_metrics(tmp_path / "ddp")]
    single_loss = [r["loss"] for r in read_metrics(tmp_path / "single")]
    np.testing.assert_allclose(ddp_loss, single_loss, rtol=0, atol=1e-5)
    assert "2 process(es)" in ddp.stdout


def test_two_ranks_with_bf16_params_match_one_process(data_dir, tmp_path):
    """With bf16_params, DDP wraps the bf16 working model and all-reduces its bf16 gradients: the same losses and
    final fp32 master weights as one process with the same global batch, up to bf16's rounding of the gradients
    (which Adam magnifies for gradients near zero, such as the key bias's, hence a mean over all weights: ~8e-6
    here, ~1.5e-3 when the ranks do not reduce)."""
    common = [f"--data_dir={data_dir}", "--max_steps=4", "--bf16_params", "--checkpoint_interval=4"]
    ddp = train(*common, f"--out_dir={tmp_path / 'ddp'}", "--batch_size=2", nproc=2)
    single = train(*common, f"--out_dir={tmp_path / 'single'}", "--batch_size=4")
    assert ddp.returncode == 0 and single.returncode == 0, ddp.stderr + single.stderr
    np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path / "ddp")],
                               [r["loss"] for r in read_metrics(tmp_path / "single")], rtol=0, atol=5e-4)
    weights = [torch.load(tmp_path / run / "checkpoints" / "step_000004" / "model.pt") for run in ("ddp", "single")]
    difference = torch.cat([(weights[0][name] - weights[1][name]).abs().flatten() for name in weights[1]])
    assert difference.mean() < 5e-5


def test_bad_input_fails_before_training(data_dir, tmp_path):
    run = train("--atention=naive")
    assert run.returncode != 0 and "did you mean --attention?" in run.stderr
    run = train(f"--data_dir={tmp_path / 'nowhere'}")
    assert run.returncode != 0 and "does not exist" in run.stderr
    run = train(f"--data_dir={data_dir}", "--vocab_size=100")  # the synthetic tokens go up to 127
    assert run.returncode != 0 and "synthetic_train_000001.bin: token id 127 >= vocab_size 100" in run.stderr
    assert "step" not in run.stdout


def test_triton_without_a_gpu_or_interpreter_fails_before_training(data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine can run the triton backend")  # the failure under test cannot happen here
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = train(f"--data_dir={data_dir}", "--attention=triton", f"--out_dir={tmp_path}", env=env)
    assert run.returncode != 0 and "step" not in run.stdout
    assert "triton attention needs CUDA tensors and this machine has no CUDA GPU; use `--attention sdpa`" in run.stderr


def test_cuda_graph_mode_accumulates_into_its_own_buffers_and_trains_identically(tmp_path):
    """compile_mode reduce-overhead makes the trainer accumulate each micro-step's gradients into zeroed buffers of its
    own (on a GPU, CUDA graphs overwrite their outputs at the next replay; on this CPU Inductor captures none, so
    this checks the accumulation path itself): 6 micro-steps per step, losses and final weights bitwise equal to the
    default mode's, with and without bf16 parameters, and under DDP (2 processes, gloo, 3 micro-steps each)."""
    start = np.random.default_rng(0).integers(0, 128, 400)
    write_shard(tmp_path / "count_train_000000.bin", (start[:, None] + np.arange(16)).ravel() % 128)
    common = [f"--data_dir={tmp_path}", "--max_steps=3", "--batch_size=2", "--total_batch_size=192", "--compile",
              "--checkpoint_interval=3", "--learning_rate=0.01"]
    for bf16, nproc in (("false", 1), ("true", 1), ("true", 2)):
        name = f"bf16_{bf16}_nproc{nproc}"
        runs = {mode: train(*common, f"--bf16_params={bf16}", f"--compile_mode={mode}",
                            f"--out_dir={tmp_path / name / mode}", nproc=nproc)
                for mode in ("default", "reduce-overhead")}
        assert all(r.returncode == 0 for r in runs.values()), [r.stderr for r in runs.values()]
        assert f"{6 // nproc} micro-step(s) of 2x16 per process" in runs["default"].stdout
        losses = {m: [r["loss"] for r in read_metrics(tmp_path / name / m)] for m in runs}
        assert losses["reduce-overhead"] == losses["default"]
        weights = {m: torch.load(tmp_path / name / m / "checkpoints" / "step_000003" / "model.pt") for m in runs}
        assert all(torch.equal(w, weights["default"][k]) for k, w in weights["reduce-overhead"].items())


def test_overlap_steps_logs_the_same_steps_and_saves_the_same_checkpoints(data_dir, tmp_path):
    """overlap_steps reads each step's figures a step late, except before an evaluation, a checkpoint and the end:
    the same rows (step, loss, lr, norm), evaluations and checkpoints as reading them at once, with every one of
    those occasions falling mid-run."""
    common = [f"--data_dir={data_dir}", "--max_steps=9", "--batch_size=2", "--eval_interval=4", "--eval_batches=1",
              "--checkpoint_interval=3", "--keep_last=5", "--sample_count=0"]
    # Each step's work takes 60 ms on a simulated GPU that runs apart from the host (tests/fake_gpu.py), so a step
    # read late is read after the next one is queued, as on a GPU.
    runs = {o: train(*common, f"--overlap_steps={o}", f"--out_dir={tmp_path / o}", fault="slowgpu:0:60")
            for o in ("false", "true")}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr for r in runs.values()]
    keys = ("step", "loss", "lr", "grad_norm")
    rows = {o: [{k: r[k] for k in keys} for r in read_metrics(tmp_path / o)] for o in runs}
    assert [r["step"] for r in rows["true"]] == list(range(9)) and rows["true"] == rows["false"]
    for o in runs:  # no row below its step's GPU time, even when read late
        assert min(r["dt_ms"] for r in read_metrics(tmp_path / o)) >= 60 - 1e-6, o
    assert (tmp_path / "true" / "evals.jsonl").read_text() == (tmp_path / "false" / "evals.jsonl").read_text()
    lines = {o: [line.split(" | ")[:4] for line in r.stdout.splitlines() if line.startswith(("step ", "eval "))]
             for o, r in runs.items()}
    assert lines["true"] == lines["false"]  # the same order of step and evaluation lines, the same figures
    saved = sorted(os.listdir(tmp_path / "true" / "checkpoints"))
    assert saved == sorted(os.listdir(tmp_path / "false" / "checkpoints")) == ["step_000003", "step_000006",
                                                                               "step_000009"]
    for name in saved:
        a, b = (torch.load(tmp_path / o / "checkpoints" / name / "model.pt") for o in ("true", "false"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_row_takes_in_an_evaluation(data_dir, tmp_path):
    """On the simulated GPU a step takes 60 ms and an evaluation 1.5 s: the step after an evaluation starts when it
    does, not when the step before it ended, so its row is its own time (with overlap_steps: a step late)."""
    run = train(f"--data_dir={data_dir}", "--max_steps=3", "--batch_size=2", "--eval_interval=1", "--eval_batches=1",
                "--sample_count=0", "--overlap_steps", f"--out_dir={tmp_path}", fault="slowgpu:0:60/1500")
    assert run.returncode == 0, run.stderr
    dt = [r["dt_ms"] for r in read_metrics(tmp_path)]
    assert len(dt) == 3 and all(60 - 1e-6 <= ms < 1500 for ms in dt), dt


def test_speed_settings_train_like_the_plain_path(tmp_path):
    """Every speed and memory setting (bf16 parameters with fp32 masters, the fused chunked loss, GELU recomputed,
    compiled with a memory budget) against the plain path: the same losses within bf16's precision, and checkpoints
    that still hold fp32 parameters."""
    start = np.random.default_rng(0).integers(0, 128, 400)
    write_shard(tmp_path / "count_train_000000.bin", (start[:, None] + np.arange(16)).ravel() % 128)  # learnable
    common = [f"--data_dir={tmp_path}", "--max_steps=6", "--batch_size=4", "--checkpoint_interval=6",
              "--learning_rate=0.01"]
    plain = train(*common, f"--out_dir={tmp_path / 'plain'}")
    fast = train(*common, "--bf16_params", "--loss_chunk=24", "--recompute_gelu", "--compile",  # 64 rows: 24+24+16
                 "--activation_memory_budget=0.8", f"--out_dir={tmp_path / 'fast'}")
    assert plain.returncode == 0 and fast.returncode == 0, plain.stderr + fast.stderr
    plain_loss = [r["loss"] for r in read_metrics(tmp_path / "plain")]
    fast_loss = [r["loss"] for r in read_metrics(tmp_path / "fast")]
    assert plain_loss[-1] < plain_loss[0] - 0.05  # it trains, so the comparison means something
    np.testing.assert_allclose(fast_loss, plain_loss, rtol=0, atol=2e-2)
    weights = torch.load(tmp_path / "fast" / "checkpoints" / "step_000006" / "model.pt")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_weight_decay_falls_on_the_matrices_alone_and_one_adamw_step_is_the_hand_computed_one():
    """decay_all_params=false: the weights of the Linear and Embedding modules decay; biases and LayerNorm gains do
    not (found here by module type, not by shape as make_optimizer does). One AdamW step from known gradients
    against the update written out in fp64: p <- p·(1 - lr·wd) - lr·m̂/(√v̂ + eps), with m̂ = g, v̂ = g² at step 1."""
    cfg = load_config(["--config", "tiny", *FLAGS, "--decay_all_params=false", "--weight_decay=0.1",
                       "--learning_rate=0.01"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    decays = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            decays[id(p)] = (f"{module_name}.{name}", isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
                             and name == "weight")
    optimizer = make_optimizer(model, cfg, CPU)
    groups = {g["weight_decay"]: {decays[id(p)][0] for p in g["params"]} for g in optimizer.param_groups}
    assert groups == {0.1: {n for n, d in decays.values() if d}, 0.0: {n for n, d in decays.values() if not d}}
    assert "transformer.h.0.ln_1.weight" in groups[0.0] and "transformer.h.0.attn.c_attn.bias" in groups[0.0]
    assert "transformer.h.0.attn.c_attn.weight" in groups[0.1] and "transformer.wpe.weight" in groups[0.1]

    before = {id(p): p.detach().double().clone() for p in model.parameters()}
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    grads = {id(p): p.grad.double() for p in model.parameters()}
    optimizer.step()
    for p in model.parameters():
        decay = 0.1 if decays[id(p)][1] else 0.0
        expected = before[id(p)] * (1 - 0.01 * decay) - 0.01 * grads[id(p)] / (grads[id(p)].abs() + 1e-8)
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-7, msg=decays[id(p)][0])


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_a_step_clips_the_gradient_norm_it_reports(data_dir, clip):
    """One training step against a second code path (the model's own backward on the same batch, the norm in fp64):
    the step reports the norm before clipping; with grad_clip below it the gradients it applied are the reference's
    scaled to norm grad_clip, without clipping they are the reference's."""
    cfg = load_config(["--config", "tiny", *FLAGS, f"--data_dir={data_dir}", "--batch_size=4",
                       f"--grad_clip={clip}"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, CPU, nullcontext(), 0, 1)
    reference = GPT(cfg.model)
    reference.load_state_dict(model.raw.state_dict())
    x, y = ShardLoader(data_dir, "train", 4, 16).next_batch()
    reference(x, y)[1].backward()
    ref_grads = [p.grad.double() for p in reference.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref_grads])).item()
    assert norm > 0.5  # so that clipping at 0.5 changes something

    figures = train_step(model, ShardLoader(data_dir, "train", 4, 16), 1e-3, cfg.grad_clip, 1, 1, NO_STOP, CPU)
    assert figures.tolist()[2] == pytest.approx(norm, rel=1e-5)
    scale = clip / norm if clip else 1.0
    for p, g in zip(model.raw.parameters(), ref_grads):
        torch.testing.assert_close(p.grad.double(), g * scale, rtol=1e-4, atol=1e-7)


def test_every_evaluation_runs_in_eval_mode_on_whichever_copy_runs_it(data_dir, monkeypatch):
    """With bf16_params the validation loss runs on the bf16 copy: it too is in eval mode while it does, and both
    copies train again afterwards."""
    cfg = load_config(["--config", "tiny", *FLAGS, f"--data_dir={data_dir}", "--bf16_params", "--eval_batches=2",
                       "--sample_count=0"])
    model = build_model(cfg, CPU, nullcontext(), 0, 1)
    modes, forward = [], GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **k: modes.append(self.training) or forward(self, *a, **k))
    results = evaluate(cfg, model, ShardLoader(data_dir, "val", cfg.batch_size, 16), CPU, nullcontext(), 0, 1, None,
                       NO_STOP)
    assert modes == [False, False] and set(results) == {"val_loss"}
    assert model.raw.training and model.bf16.model.training


def test_triton_run_logs_the_kernels_it_picked(data_dir, tmp_path):
    """The triton backend's choice of kernels (attention.triton.kernels) is logged once, on the run's first lines:
    here Triton's CPU interpreter, where the tl kernels run (tests/test_hopper_kernel.py checks the choice on sm_90)."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU interpreter's line")
    run = train(f"--data_dir={data_dir}", "--attention=triton", "--max_steps=1", f"--out_dir={tmp_path}",
                env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("attention backend: triton (tl forward and backward (Triton's CPU interpreter))") == 1
