"""Train GPT-2 with a choice of attention backend.

    python train_gpt2.py --config step49 --attention sdpa
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --config step49 --attention triton
    python train_gpt2.py --help          # every setting, its default and what it does

This file is the run: its settings and set-up (main), the training loop (train) and its step (train_step),
evaluation. What it stands on lives next to it in training/: config.py (the TrainConfig dataclass, filled from a
TOML file in configs/ and then from `--key value` flags), run_dir.py (one run per out_dir), checkpoints.py,
timing.py (each step's time, on the GPU's stream, and its figures read back), metrics.py (MFU, logs, the summary,
W&B) and distributed.py (ranks that agree, and stop together). Every run writes, under out_dir: config.json (the
resolved settings), metrics.jsonl (one row per step), evals.jsonl and summary.json (the whole run with the machine
and library versions: what results/ holds).
"""
import datetime
import gc
import math
import os
import platform
import shutil
import socket
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch._functorch.config  # activation_memory_budget, read by torch.compile
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data.loader import ShardLoader
from data.tokenizer import gpt2_encoding
from model import GPT
from training import checkpoints, metrics, timing
from training.checkpoints import CheckpointError
from training.config import CUDA_GRAPH_MODES, ConfigError, flat_config, grad_accum_steps, help_text, load_config
from training.distributed import STOPPED_EXIT_CODE, StopRequest, any_rank, barrier, broadcast, check_same_config
from training.precision import BF16Params
from training.run_dir import RunDirError, RunFinished, claim


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        try:
            print(help_text(argv))
        except ConfigError as e:
            sys.exit(f"error: {e}")
        return
    ddp = "RANK" in os.environ  # set by torchrun
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    try:  # every mistake found here costs seconds: nothing is built, no process group is started
        cfg = load_config(argv)
        device = resolve_device(cfg.device, local_rank)
        check_machine(cfg, device, rank)
        autocast = autocast_context(device)
        accum = grad_accum_steps(cfg, world)
        loader = ShardLoader(cfg.data_dir, "train", cfg.batch_size, cfg.seq_len, rank, world, cfg.model.vocab_size, accum)
        val_loader = ShardLoader(cfg.data_dir, "val", cfg.batch_size, cfg.seq_len, rank, world,
                                 cfg.model.vocab_size) if cfg.eval_interval else None
        if cfg.hellaswag:
            if not os.path.isfile(cfg.hellaswag_path):
                raise FileNotFoundError(f"hellaswag_path {cfg.hellaswag_path!r} does not exist; run python -m data.hellaswag")
            gpt2_encoding()  # HellaSwag needs the tokenizer: find out now, not at the first evaluation
        encoding = sample_encoding(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    try:
        status = train(cfg, device, autocast, rank, local_rank, world, accum, loader, val_loader, encoding)
        # Free DDP's reducer and its communication buffers while the interpreter is whole, then leave together:
        # a gloo worker thread still holding tensors at interpreter exit aborts the process.
        gc.collect()
        barrier(world)
    except RunFinished as e:  # nothing to train; nothing written
        status = 0
        if rank == 0:
            print(e)
    except (ConfigError, RunDirError, CheckpointError) as e:  # found once the ranks compared notes
        sys.exit(f"error: {e}")
    finally:
        if ddp:
            dist.destroy_process_group()
    if status == STOPPED_EXIT_CODE and rank == 0:
        # torchrun cannot be told that a worker's non-zero status is a clean stop: it prints its failure report
        # (ChildFailedError) and exits 1. Say so, rather than leave a user to read that report as a crash.
        print(f"stopped on request: exit status {STOPPED_EXIT_CODE}; " +
              ("continue with --resume auto" if cfg.checkpoint_interval else "no checkpoint (checkpoint_interval 0)") +
              (f"; torchrun's failure report below (ChildFailedError, exitcode {STOPPED_EXIT_CODE}) is this stop, "
               "not a crash" if ddp else ""), flush=True)
    sys.exit(status)


def train(cfg, device, autocast, rank, local_rank, world, accum, loader, val_loader, encoding):
    """The training run; returns the exit status: 0 done, 1 non-finite loss, STOPPED_EXIT_CODE stopped on request."""
    master = rank == 0
    settings = flat_config(cfg)
    if not check_same_config(settings, world, device):
        raise ConfigError("the ranks resolved different configurations (different config files or flags per machine?)")
    lock, resume_path, ckpt = open_run(cfg, rank, world, device)
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
    if cfg.model.attention == "triton":
        from attention.triton import set_deterministic
        set_deterministic(cfg.deterministic_attention)
    model = build_model(cfg, device, autocast, local_rank, world)
    start_step = restore(ckpt, resume_path, model, loader, device) if ckpt else 0
    tokens_per_step = cfg.batch_size * cfg.seq_len * world * accum
    stop = StopRequest(announce=master and "the run stops after the current step" +
                       (" and saves a checkpoint" if cfg.checkpoint_interval else ""))
    env = metrics.environment(device)
    flops_per_step, peak = model.raw.flops_per_token(cfg.seq_len) * tokens_per_step, metrics.peak_flops(env["gpu"])

    def mfu(seconds_per_step):
        """Model FLOPs utilisation: the FLOPs the model needs over what the GPUs could do at peak."""
        return flops_per_step / seconds_per_step / (peak * world) if peak else None

    log = profiler = None
    if master:
        log = metrics.RunLog(cfg, settings, start_step, tokens_per_step, world, mfu, device,
                             ckpt["state"].get("wandb_id") if ckpt else None)
        print("config:", " ".join(f"{k}={v}" for k, v in settings.items()))
        print(f"device {device} ({env['gpu'] or platform.processor() or 'cpu'}), {world} process(es), "
              f"attention backend: {attention_kernels(cfg, device)}, {model.raw.num_params():,} parameters, "
              f"{tokens_per_step:,} tokens per step ({accum} micro-step(s) of {cfg.batch_size}x{cfg.seq_len} per process)")
        if resume_path:
            print(f"resumed from {resume_path} at step {start_step}")
        profiler = metrics.step_profiler(cfg)

    status, readout = 0, timing.Readout(timing.clock(device))
    for step in range(start_step, cfg.max_steps + 1):
        if evaluates(cfg, step):  # of the weights after `step` steps: the last one of the final weights
            results = evaluate(cfg, model, val_loader, device, autocast, rank, world, encoding, stop)
            if log and results:
                log.evaluation(step, results)
        if step == cfg.max_steps:
            break
        lr = learning_rate(cfg, step)
        start = readout.start()
        readout.finish(step, lr, start, train_step(model, loader, lr, cfg.grad_clip, accum, world, stop, device))
        # The host reads the step's figures now or, with overlap_steps, once the next step is queued; but now all the
        # same before it stops queueing steps for a while (an evaluation, a checkpoint, the profiler's trace, the
        # end), so that a NaN or a stop request is acted on before those, and once a stop request is read. Decided
        # alike on every rank, as is every rank's reaction to what it reads.
        pause = evaluates(cfg, step + 1) or saves_after(cfg, step) or step in metrics.traced_steps(cfg)[-1:]
        stops = 0
        while figures := readout.next(every=not cfg.overlap_steps or pause or step == cfg.max_steps - 1 or stops):
            loss, flag, grad_norm = figures.values
            if not math.isfinite(loss):  # every rank sees the same all-reduced loss, so all stop here together
                if master:
                    print(f"error: non-finite loss at step {figures.step}; stopping before any checkpoint of this state")
                status = 1
                break
            if flag and not stops:  # the first step that carries the request (a later one may too)
                stops, stop_step = flag, figures.step
            if log:
                log.step(figures.step, figures.lr, loss, grad_norm, figures.seconds, figures.read_at)
        if status:
            break
        if profiler:
            profiler.step()
        if stops and master:
            print(f"stop requested (by {int(stops)} rank(s)) at step {stop_step}: every rank stops after step {step}")
        if saves_after(cfg, step) or (stops and cfg.checkpoint_interval):
            state = {"loader": loader.state_dict(), "config": settings, "world_size": world,
                     "wandb_id": log.wandb_id if log else None}
            checkpoints.save_checkpoint(cfg.out_dir, step + 1, cfg.keep_last, model.raw, model.optimizer, state, rank,
                                        lambda: barrier(world))
        if stops:
            status = STOPPED_EXIT_CODE
            break
        if pause:  # the next step's time starts when it does, not at this one's end
            readout.pause()

    if world > 1 and status != 1:  # DDP should keep every rank's parameters identical; check it rather than assume it
        checksum = torch.stack([p.detach().double().sum() for p in model.raw.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        if master:
            print(f"parameters identical on all {world} ranks: {'yes' if len(set(t.item() for t in gathered)) == 1 else 'NO'}")
    if master:
        if profiler:
            profiler.stop()
        log.close(env, status)
        lock.close()
    return status


@dataclass
class Model:
    """The model as each part of the run uses it."""
    raw: GPT  # the fp32 parameters: the optimizer's and the checkpoints'; HellaSwag and the samples run it
    train: torch.nn.Module  # what the training step calls: raw or its bf16 copy, compiled, in DDP's wrapper
    eval: torch.nn.Module  # what the validation loss calls: the same without DDP's wrapper
    optimizer: torch.optim.Optimizer
    bf16: BF16Params | None  # the bf16 copy with bf16_params
    autocast: object  # the training step's: bf16 autocast on CUDA, none on the bf16 copy
    own_grads: list  # parameters whose gradients the step accumulates in buffers of its own (CUDA graphs)


def build_model(cfg, device, autocast, local_rank, world):
    raw = GPT(cfg.model).to(device)
    optimizer = make_optimizer(raw, cfg, device)
    # The training forward runs under bf16 autocast, or, with bf16_params, on a bf16 copy of the model without it.
    bf16 = BF16Params(raw) if cfg.bf16_params else None
    model, step_autocast = (bf16.model, nullcontext()) if bf16 else (raw, autocast)
    if cfg.compile:
        # Read when the graph is partitioned (at the first step), not here: one budget per process.
        torch._functorch.config.activation_memory_budget = cfg.activation_memory_budget
        model = torch.compile(model, fullgraph=True, mode=cfg.compile_mode)
    # CUDA graphs (compile_mode reduce-overhead or max-autotune) replay each micro-step into the same output buffers, so
    # a gradient that the first micro-step's backward hands to a parameter as its .grad would be overwritten by the
    # next replay. Accumulating every micro-step into zeroed buffers of our own copies each graph output once instead.
    own_grads = list(model.parameters()) if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES else []
    trained = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    return Model(raw, trained, model, optimizer, bf16, step_autocast, own_grads)


def restore(ckpt, path, model, loader, device):
    """The checkpoint's state into the model (its bf16 copy too), the optimizer, the loader and the RNG; returns the
    step to continue from."""
    model.raw.load_state_dict(ckpt["model"])
    if model.bf16:
        model.bf16.master_to_model()
    model.optimizer.load_state_dict(ckpt["optimizer"])
    try:
        loader.load_state_dict(ckpt["state"]["loader"])  # a global stream position: valid for any world size
    except ValueError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from None
    if ckpt["rng"] is not None:  # absent when resuming on more processes than saved
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if ckpt["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt["state"]["step"]


def train_step(model, loader, lr, grad_clip, accum, world, stop, device):
    """One optimizer step of `accum` micro-steps. Returns its figures, on the device and not yet read (the host does
    not wait for the GPU here): the loss averaged over the micro-steps and the ranks, the number of ranks asked to
    stop, and the gradient norm before clipping."""
    for group in model.optimizer.param_groups:
        group["lr"] = lr
    model.optimizer.zero_grad(set_to_none=True)
    for p in model.own_grads:
        p.grad = torch.zeros_like(p)
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = loader.next_batch(device)  # pinned memory, copied without blocking the host
        # DDP all-reduces gradients during backward; only the last micro-step's backward needs to.
        with model.train.no_sync() if world > 1 and micro < accum - 1 else nullcontext():
            with model.autocast:
                _, loss = model.train(x, y)
            (loss / accum).backward()
        loss_sum += loss.detach()
    if model.bf16:
        model.bf16.grads_to_master()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.raw.parameters() if p.grad is not None])
    if grad_clip:
        torch.nn.utils.clip_grads_with_norm_(model.raw.parameters(), grad_clip, grad_norm)
    model.optimizer.step()
    if model.bf16:
        model.bf16.master_to_model()
    # One all-reduce a step: the mean loss, and whether any rank was asked to stop (SUM: gloo has no AVG).
    flags = torch.stack([loss_sum / (accum * world), stop.flag(device)])
    if world > 1:
        dist.all_reduce(flags)
    return torch.cat([flags, grad_norm.float().reshape(1)])


def open_run(cfg, rank, world, device):
    """Rank 0 claims out_dir and chooses the checkpoint to resume from (if any); every other rank reads that same
    checkpoint, so no rank depends on listing a folder that another rank may be changing. A rank that cannot read
    it (no shared filesystem?) fails the run with one line naming its machine. Returns (lock, path, checkpoint)."""
    lock = path = ckpt = error = None
    if rank == 0:
        try:
            lock, path, ckpt = claim(cfg)
        except ValueError as e:
            error = e
    error, path = broadcast((error, path), world)
    if error:
        raise error
    if path and rank != 0:
        try:
            ckpt = checkpoints.read_checkpoint(path, rank)
        except CheckpointError as e:
            error = f"rank {rank} on {socket.gethostname()}: {e} (checkpoints need a folder that every machine sees)"
            print(f"error: {error}", file=sys.stderr)
    if any_rank(error is not None, world, device):
        raise CheckpointError(error or "another rank could not read the checkpoint (its error is above)")
    if ckpt:
        checkpoints.check_same_run(ckpt["state"], flat_config(cfg), world, path)
    return lock, path, ckpt


# ----------------------------------------------------------------------------------------------------------
# Optimisation

def learning_rate(cfg, step):
    """constant, or linear warm-up over warmup_steps then cosine decay to min_lr at max_steps (build-nanogpt's
    get_lr: the decay spans max_steps - warmup_steps steps, so the last step, max_steps - 1, is just above min_lr)."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg, device):
    """AdamW; with decay_all_params=False, biases and LayerNorm gains (the 1-D parameters) get no weight decay."""
    decayed = {True: [], False: []}
    for p in model.parameters():
        decayed[cfg.decay_all_params or p.dim() >= 2].append(p)
    groups = [{"params": decayed[True], "weight_decay": cfg.weight_decay}, {"params": decayed[False], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate(cfg, 0), betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.adam_eps, fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------
# Evaluation: validation loss, HellaSwag, samples. The validation loss runs through the compiled model (training's
# shapes); HellaSwag and samples run on the uncompiled one (which shares its parameters) where shapes vary, so
# training's compiled graph is never recompiled. A stop request cuts an evaluation short: no results then.

@torch.no_grad()
def evaluate(cfg, model, val_loader, device, autocast, rank, world, encoding, stop):
    for m in (model.raw, model.eval):  # with bf16_params the validation loss runs on the bf16 copy, a model of its own
        m.eval()
    val_loader.reset()  # the same validation tokens every time
    results = {"val_loss": val_loss(model.eval, val_loader, cfg.eval_batches, device, model.autocast, rank, world,
                                    stop=lambda: stop.signalled)}
    # A stop request reaches the ranks at different moments, so what follows is decided on what they all agree on:
    # HellaSwag ends in an all-reduce that every rank must join, and a figure that any rank cut short is no figure.
    if cfg.hellaswag and not any_rank(stop.signalled, world, device):
        from data import hellaswag
        results["hellaswag_acc_norm"] = hellaswag.evaluate(model.raw, cfg.hellaswag_path, device, rank, world, autocast,
                                                           stop=lambda: stop.signalled)[0]
    cut = any_rank(stop.signalled, world, device)
    if encoding is not None and rank == 0 and not cut:
        prompt = torch.tensor(encoding.encode(cfg.sample_prompt), device=device).repeat(cfg.sample_count, 1)
        generator = torch.Generator(device).manual_seed(cfg.seed)  # its own RNG: sampling leaves training's alone
        with autocast:
            out = model.raw.generate(prompt, cfg.sample_tokens, top_k=50, generator=generator,
                                     vocab_size=encoding.n_vocab)  # never an id of the padded vocabulary
        results["samples"] = [encoding.decode(row.tolist()) for row in out]
    for m in (model.raw, model.eval):
        m.train()
    return None if cut else results


def evaluates(cfg, step):
    """Whether the run evaluates the weights after `step` steps: every eval_interval steps and after the last step."""
    return bool(cfg.eval_interval) and (step % cfg.eval_interval == 0 or step == cfg.max_steps)


def saves_after(cfg, step):
    """Whether the run writes a checkpoint after step `step`: every checkpoint_interval steps and after the last."""
    return bool(cfg.checkpoint_interval) and ((step + 1) % cfg.checkpoint_interval == 0 or step == cfg.max_steps - 1)


@torch.no_grad()
def val_loss(model, loader, batches, device, autocast, rank, world, stop=lambda: False):
    """Mean loss over `batches` batches of each process's rows, averaged over the processes (scripts/evaluate.py
    uses it too). stop() cuts it short; every rank still calls the all-reduce once."""
    total = torch.zeros((), device=device)
    for i in range(batches):
        if stop():
            break
        x, y = loader.next_batch(device)
        with autocast:
            total += model(x, y)[1].float()
        if rank == 0 and ((i + 1) % 10 == 0 or i + 1 == batches) and batches >= 20 and sys.stdout.isatty():
            print(f"  val loss: batch {i + 1}/{batches}", end="\r", flush=True)  # progress, on a terminal only
    if world > 1:
        dist.all_reduce(total)
    return total.item() / (batches * world)


def sample_encoding(cfg):
    """The tokenizer for samples, or None (with a warning) where there are none to take or tiktoken is offline."""
    if not cfg.eval_interval or not cfg.sample_prompt or not cfg.sample_count:
        return None
    try:
        encoding = gpt2_encoding()
    except RuntimeError as e:
        print(f"warning: no samples during evaluation: {e}")
        return None
    if max(encoding.encode(cfg.sample_prompt)) >= cfg.model.vocab_size:
        raise ConfigError(f"sample_prompt {cfg.sample_prompt!r} has GPT-2 token ids >= vocab_size {cfg.model.vocab_size}")
    return encoding


# ----------------------------------------------------------------------------------------------------------
# The machine

def resolve_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda requested but no CUDA GPU is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps requested but MPS is not available; use --device cpu")
    return torch.device(name)


def attention_kernels(cfg, device):
    """The attention backend, with the kernels the triton backend picked for this machine and shape (bf16: the
    training step's precision on a GPU)."""
    if cfg.model.attention != "triton":
        return cfg.model.attention
    from attention.triton import kernels
    return f"triton ({kernels(device, cfg.model.n_embd // cfg.model.n_head, cfg.seq_len)})"


def check_machine(cfg, device, rank):
    """What the settings need from this machine, checked before any work: the triton package for the triton
    backend, FP8 tensor cores for fp8_lm_head, a compiler for torch.compile; and a word of warning before the 124M
    model trains on a CPU."""
    if cfg.model.attention == "triton":
        try:
            from attention.triton import check_device, check_head_dim  # imported only by those who ask for it
        except ImportError as e:
            raise ConfigError(f"--attention triton needs the triton package ({e}); it comes with CUDA builds of torch "
                              "on Linux (pip install triton). Or use --attention sdpa") from None
        check_head_dim(cfg.model.n_embd // cfg.model.n_head)
        check_device(device)
    if cfg.model.fp8_lm_head and device.type != "cpu":  # the CPU runs FP8 matmuls too, slowly: the tests do
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < (8, 9):
            gpu = (f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})"
                   if capability else device.type)
            raise ConfigError(f"fp8_lm_head needs FP8 tensor cores (a CUDA GPU of compute capability 8.9 or newer: "
                              f"Ada, Hopper), not {gpu}; use --fp8_lm_head false")
    if cfg.compile:
        # Inductor compiles C++ for the CPU; on a GPU, Triton compiles a small C launcher.
        kind, names = ("C++", ("CXX", "g++", "c++", "clang++")) if device.type == "cpu" else ("C", ("CC", "gcc", "cc", "clang"))
        if not any(shutil.which(os.environ.get(n, "") if n.isupper() else n) for n in names):
            raise ConfigError(f"--compile true needs a {kind} compiler and none was found ({', '.join(names[1:])}); "
                              "install one (Debian/Ubuntu: apt install build-essential; macOS: xcode-select --install), "
                              "or use --compile false")
    if device.type == "cpu" and rank == 0 and cfg.model.n_layer * cfg.model.n_embd ** 2 * 12 > 50e6:
        print(f"warning: training a {cfg.model.n_layer}-layer, {cfg.model.n_embd}-wide model on the CPU: each step "
              "can take minutes (the step-49 run: about 150 s a step with sdpa, and naive needs more than 24 GB). "
              "Try --config tiny first.", flush=True)


def autocast_context(device):
    """bf16 autocast on CUDA (GPT-2 trains stably in bf16 without loss scaling); fp32 on other devices."""
    if device.type != "cuda":
        return nullcontext()
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(f"{torch.cuda.get_device_name(device)} has no bf16 tensor cores (Ampere, compute capability "
                          "8.0, or newer is needed); this trainer trains in bf16. Use a newer GPU, or --device cpu")
    return torch.autocast("cuda", dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
