"""Train GPT-2 with a choice of attention backend.

    python train_gpt2.py --config step49 --attention sdpa
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --config step49 --attention triton

Settings come from one dataclass (TrainConfig, with the model's GPTConfig inside it), filled first from a TOML
file in configs/ and then from `--key value` / `--key=value` flags. Every run writes, under out_dir:
config.json (the resolved settings), metrics.jsonl (one row per step) and summary.json (the whole run with the
machine and library versions: what results/ holds).
"""
import dataclasses
import datetime
import difflib
import gc
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from attention import BACKENDS
from data.loader import ShardLoader
from data.tokenizer import gpt2_encoding
from model import GPT, GPTConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@dataclass
class TrainConfig:
    # data
    data_dir: str = "data/tinyshakespeare"  # directory of *_train_*.bin (and, for evaluation, *_val_*.bin) shards
    batch_size: int = 16  # B: sequences per micro-step on each process
    seq_len: int = 1024  # T: tokens per sequence
    total_batch_size: int = 0  # tokens per optimizer step, reached by gradient accumulation; 0: B·T·processes
    # optimisation: AdamW; the defaults are the step-49 experiment's (PyTorch's AdamW defaults, lr 3e-4)
    max_steps: int = 50
    learning_rate: float = 3e-4  # the peak learning rate
    lr_schedule: str = "constant"  # constant | cosine: linear warm-up to learning_rate, cosine decay to min_lr
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.01
    decay_all_params: bool = True  # False: weight decay on matrices only, not on biases and LayerNorm gains
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0: no clipping (the norm is logged anyway)
    # evaluation, every eval_interval steps and at the last step (0: never)
    eval_interval: int = 0
    eval_batches: int = 20  # validation batches of B·T tokens per process
    hellaswag: bool = False  # HellaSwag acc_norm (prepare with python -m data.hellaswag)
    hellaswag_path: str = "data/hellaswag/hellaswag_val.jsonl"
    sample_prompt: str = "Hello, I'm a language model,"  # "" for no samples
    sample_count: int = 4
    sample_tokens: int = 32
    # checkpoints, in out_dir/checkpoints, every checkpoint_interval steps and at the last step (0: never)
    checkpoint_interval: int = 0
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    resume: str = ""  # "": start afresh; "auto": the newest complete checkpoint in out_dir, if any; or a path
    # logging
    wandb: bool = False  # Weights & Biases, rank 0; offline when no API key is configured
    wandb_project: str = "gpt2-attention"
    wandb_run_name: str = ""
    # system
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cuda | mps | cpu
    compile: bool = True  # torch.compile the whole model (fullgraph=True)
    dist_timeout: int = 1800  # seconds a collective may wait for the other ranks before the run fails
    seed: int = 1337
    out_dir: str = "out"
    timing_warmup: int = 10  # first steps left out of the mean ms/step: compilation, autotuning, allocator
    model: GPTConfig = field(default_factory=GPTConfig)


# ----------------------------------------------------------------------------------------------------------
# Configuration: TOML file, then command-line flags. Keys are flat: a model key (n_layer, attention, ...) is
# written exactly like a training key, in files and on the command line.

class ConfigError(ValueError):
    pass


def _key_types():
    """Every settable key -> (which dataclass holds it, its type)."""
    keys = {f.name: ("train", f.type) for f in dataclasses.fields(TrainConfig) if f.name != "model"}
    keys.update({f.name: ("model", f.type) for f in dataclasses.fields(GPTConfig)})
    return keys


def _convert(key, typ, value, source):
    """Coerce a TOML value or a command-line string to the field's type, or say why not."""
    if isinstance(value, str) and typ is not str:  # from the command line
        text = value.strip().lower()
        if typ is bool and text in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return text in ("true", "1", "yes", "on")
        try:
            value = int(value) if typ is int else float(value) if typ is float else value
        except ValueError:
            pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not typ:
        raise ConfigError(f"{source}: {key} must be {typ.__name__}, got {value!r}")
    return value


def _unknown(key, source):
    hint = difflib.get_close_matches(key, _key_types(), n=1)
    suggestion = f"; did you mean --{hint[0]}?" if hint else ""
    return ConfigError(f"{source}: unknown key {key!r}{suggestion} (valid keys: {', '.join(_key_types())})")


def _parse_flags(argv):
    """['--a', '1', '--b=2', '--flag'] -> [('a', '1'), ('b', '2'), ('flag', 'true')]"""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --key value or --key=value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:  # a bare flag: only booleans may omit their value
            key, value = arg[2:], "true"
            if key in _key_types() and _key_types()[key][1] is not bool:
                raise ConfigError(f"command line: --{key} needs a value")
        pairs.append((key, value))
        i += 1
    return pairs


def _config_path(name):
    """`--config step49` means configs/step49.toml; a path is taken as it is."""
    for path in (name, os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, f"{name}.toml")):
        if os.path.isfile(path):
            return path
    choices = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".toml"))
    raise ConfigError(f"config {name!r} not found; give a path or one of: {', '.join(choices)}")


def _read_toml(name, seen=()):
    """(key, value, file) from a config file; `extends = "other"` reads that file first, this one overriding it."""
    path = _config_path(name)
    if path in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    with open(path, "rb") as f:
        try:
            table = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    base = _read_toml(table.pop("extends"), seen + (path,)) if "extends" in table else []
    return base + [(k, v, path) for k, v in table.items()]


def load_config(argv):
    cfg = TrainConfig()
    types = _key_types()
    pairs = _parse_flags(argv)
    settings = []  # (key, value, source), files first so that flags override them
    for key, value in pairs:
        if key == "config":
            settings += _read_toml(value)
    settings += [(k, v, "command line") for k, v in pairs if k != "config"]
    for key, value, source in settings:
        if key not in types:
            raise _unknown(key, source)
        owner, typ = types[key]
        setattr(cfg.model if owner == "model" else cfg, key, _convert(key, typ, value, source))
    validate(cfg)
    return cfg


def validate(cfg):
    m = cfg.model
    if m.attention not in BACKENDS:
        raise ConfigError(f"attention {m.attention!r} is not a backend; choose one of: {', '.join(BACKENDS)}")
    for key, value in [("batch_size", cfg.batch_size), ("seq_len", cfg.seq_len), ("max_steps", cfg.max_steps),
                       ("n_layer", m.n_layer), ("n_head", m.n_head), ("n_embd", m.n_embd),
                       ("block_size", m.block_size), ("vocab_size", m.vocab_size)]:
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if m.n_embd % m.n_head:
        raise ConfigError(f"n_embd ({m.n_embd}) must be divisible by n_head ({m.n_head})")
    if cfg.seq_len > m.block_size:
        raise ConfigError(f"seq_len ({cfg.seq_len}) exceeds block_size ({m.block_size}); lower seq_len or raise block_size")
    if m.vocab_size > 2**16:
        raise ConfigError(f"vocab_size ({m.vocab_size}) exceeds 65536, the most that uint16 token shards can hold")
    if cfg.device not in ("auto", "cuda", "mps", "cpu"):
        raise ConfigError(f"device {cfg.device!r}: choose auto, cuda, mps or cpu")
    if cfg.learning_rate <= 0 or not 0 <= cfg.min_lr <= cfg.learning_rate:
        raise ConfigError(f"need 0 < learning_rate and 0 <= min_lr <= learning_rate, got {cfg.learning_rate}, {cfg.min_lr}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"lr_schedule {cfg.lr_schedule!r}: choose constant or cosine")
    for key in ("total_batch_size", "warmup_steps", "eval_interval", "checkpoint_interval", "timing_warmup",
                "sample_count", "sample_tokens"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must not be negative, got {getattr(cfg, key)}")
    if cfg.grad_clip < 0 or cfg.keep_last < 1 or cfg.eval_batches < 1 or cfg.dist_timeout < 1:
        raise ConfigError("need grad_clip >= 0, keep_last >= 1, eval_batches >= 1 and dist_timeout >= 1")


def flat_config(cfg):
    d = dataclasses.asdict(cfg)
    return {**{k: v for k, v in d.items() if k != "model"}, **d["model"]}


# ----------------------------------------------------------------------------------------------------------
# The machine: processes, devices, versions.

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


def environment(device):
    """What a figure depends on besides the code: recorded next to every result."""
    info = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                python=platform.python_version(), torch=torch.__version__, device=str(device), gpu=None,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# Dense bf16 tensor-core peak FLOP/s, from the vendors' datasheets (without sparsity), for MFU. Matched as
# substrings of torch.cuda.get_device_name(), first match wins; an unknown GPU gets no MFU rather than a guess.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                   ("B200", 2250e12), ("A100", 312e12), ("A10G", 125e12), ("L40S", 362e12), ("L4", 121e12),
                   ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(gpu_name):
    return next((flops for name, flops in PEAK_BF16_FLOPS if gpu_name and name in gpu_name), None)


def gpu_slug(gpu_name):
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA GeForce RTX 4090' -> 'geforce-rtx-4090'; None -> 'cpu'."""
    if not gpu_name:
        return "cpu"
    words = gpu_name.lower().replace("nvidia", "").split()
    n = next((i for i, w in enumerate(words) if re.search(r"\d", w)), len(words) - 1)
    return "-".join(words[: n + 1])


def summarize(rows, cfg, env, world, tokens_per_step, mfu):
    """The run in one JSON object: what results/ keeps and the README's tables are built from."""
    timed = rows[cfg.timing_warmup:]
    mean_ms = sum(r["dt_ms"] for r in timed) / len(timed) if timed else None
    if not timed:
        timing = f"no ms/step mean: all {len(rows)} steps are within timing_warmup={cfg.timing_warmup}"
    else:
        timing = f"mean over steps {timed[0]['step']}-{timed[-1]['step']}"
        if cfg.timing_warmup:
            timing += f" (the first {cfg.timing_warmup} left out as warm-up)"
    return dict(**env, world_size=world, config=flat_config(cfg), final_step=rows[-1]["step"],
                final_loss=rows[-1]["loss"], mean_ms=mean_ms, timing=timing,
                mean_tok_per_s=tokens_per_step / (mean_ms / 1e3) if timed else None,
                mean_mfu=mfu(mean_ms / 1e3) if timed else None,
                peak_mem_gib=max(r["peak_mem_gib"] for r in rows),
                loss=[r["loss"] for r in rows], dt_ms=[r["dt_ms"] for r in rows])


# ----------------------------------------------------------------------------------------------------------
# Optimisation

def grad_accum_steps(cfg, world):
    """Micro-steps per optimizer step so that B·T·world·steps = total_batch_size tokens."""
    micro = cfg.batch_size * cfg.seq_len * world
    if cfg.total_batch_size == 0:
        return 1
    if cfg.total_batch_size % micro:
        n = max(1, cfg.total_batch_size // micro)
        rows = cfg.total_batch_size // (cfg.seq_len * world)  # sequences per process per step, if T divides
        divisors = [b for b in range(1, rows + 1) if rows % b == 0 and rows * cfg.seq_len * world == cfg.total_batch_size]
        raise ConfigError(f"total_batch_size {cfg.total_batch_size} is not a multiple of batch_size*seq_len*processes "
                          f"= {cfg.batch_size}*{cfg.seq_len}*{world} = {micro}; use total_batch_size {n * micro} or "
                          f"{(n + 1) * micro}" + (f", or batch_size one of {divisors[-8:]}" if divisors else ""))
    return cfg.total_batch_size // micro


def learning_rate(cfg, step):
    """constant, or linear warm-up over warmup_steps then cosine decay to min_lr at max_steps."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - 1 - cfg.warmup_steps))
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
# Checkpoints: out_dir/checkpoints/step_000100/ holds model.pt, optimizer.pt, state.pt (step, data position,
# config), rng_rank<r>.pt, and DONE. It is written as step_000100.tmp/ and renamed when complete, so a crash
# mid-save leaves the previous checkpoint as the newest complete one.

def checkpoint_dir(cfg, step):
    return os.path.join(cfg.out_dir, "checkpoints", f"step_{step:06d}")


def complete_checkpoints(cfg, clean=False):
    """Complete checkpoints, oldest first. Incomplete ones (an interrupted save) are named, and deleted if clean."""
    root = os.path.join(cfg.out_dir, "checkpoints")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if re.fullmatch(r"step_\d{6}", name) and os.path.exists(os.path.join(path, "DONE")):
            found.append(path)
        elif clean:
            print(f"skipping incomplete checkpoint {path} (interrupted save), and deleting it")
            shutil.rmtree(path, ignore_errors=True)
    return found


def save_checkpoint(cfg, step, raw_model, optimizer, loader, rank, world):
    final = checkpoint_dir(cfg, step)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of an earlier interrupted save
        os.makedirs(tmp)
    barrier(world)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:  # DDP keeps parameters and optimizer state identical on every rank: one copy is enough
        torch.save(raw_model.state_dict(), os.path.join(tmp, "model.pt"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save({"step": step, "loader": loader.state_dict(), "config": flat_config(cfg), "world_size": world},
                   os.path.join(tmp, "state.pt"))
    barrier(world)
    if rank == 0:
        open(os.path.join(tmp, "DONE"), "w").close()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(cfg)[: -cfg.keep_last]:
            shutil.rmtree(old)
        print(f"saved checkpoint {final}")
    barrier(world)


def load_checkpoint(cfg, path, raw_model, optimizer, loader, rank, device):
    """Restore everything save_checkpoint wrote; returns the step to continue from."""
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    model_keys = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "attention"]
    mismatched = [f"{k} {state['config'][k]} (checkpoint) != {getattr(cfg.model, k)} (now)"
                  for k in model_keys if state["config"][k] != getattr(cfg.model, k)]
    if mismatched:
        raise ConfigError(f"cannot resume from {path}: the model differs: {'; '.join(mismatched)}")
    raw_model.load_state_dict(torch.load(os.path.join(path, "model.pt"), map_location=device))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=device))
    loader.load_state_dict(state["loader"])  # a global stream position: valid for any world size
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):  # absent when resuming on more processes than saved
        rng = torch.load(rng_path, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


def barrier(world):
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# Evaluation: validation loss, HellaSwag, samples. They run on the uncompiled model (which shares its
# parameters with the compiled one) where shapes vary, so training's compiled graph is never recompiled.

@torch.no_grad()
def evaluate(cfg, model, raw_model, val_loader, device, autocast, rank, world, encoding):
    raw_model.eval()
    results = {}
    val_loader.reset()  # the same validation tokens every time
    total = torch.zeros((), device=device)
    for _ in range(cfg.eval_batches):
        x, y = val_loader.next_batch()
        with autocast:
            total += model(x.to(device), y.to(device))[1].float()  # training's shape: the compiled model
    if world > 1:
        dist.all_reduce(total)
    results["val_loss"] = total.item() / (cfg.eval_batches * world)
    if cfg.hellaswag:
        from data import hellaswag
        results["hellaswag_acc_norm"] = hellaswag.evaluate(raw_model, cfg.hellaswag_path, device, rank, world, autocast)[0]
    if encoding is not None and rank == 0:
        prompt = torch.tensor(encoding.encode(cfg.sample_prompt), device=device).repeat(cfg.sample_count, 1)
        generator = torch.Generator(device).manual_seed(cfg.seed)  # its own RNG: sampling leaves training's alone
        with autocast:
            out = raw_model.generate(prompt, cfg.sample_tokens, top_k=50, generator=generator)
        results["samples"] = [encoding.decode(row.tolist()) for row in out]
    raw_model.train()
    return results


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
# Weights & Biases (optional): never the reason a run stops.

def start_wandb(cfg, settings):
    try:
        import wandb
    except ImportError:
        print("warning: --wandb given but wandb is not installed (pip install wandb); logging locally only")
        return None
    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read(os.path.expanduser("~/.netrc"))
        mode = "online" if has_key else "offline"
        if not has_key:
            print(f"warning: no W&B API key (WANDB_API_KEY or `wandb login`): logging offline under {cfg.out_dir}/wandb; "
                  "upload later with `wandb sync`")
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=settings,
                          dir=cfg.out_dir, mode=mode)
    except Exception as e:  # a W&B outage must not cost a training run
        print(f"warning: wandb.init failed ({type(e).__name__}: {e}); logging locally only")
        return None


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------------------
# Several processes: they must agree on the settings, and stop together.

def check_same_config(cfg, world):
    """Every rank must train with the same settings; compare a hash of them across ranks."""
    if world == 1:
        return
    digest = hashlib.sha256(json.dumps(flat_config(cfg), sort_keys=True).encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:7], "little")], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if len({t.item() for t in everyone}) != 1:
        raise ConfigError("the ranks resolved different configurations (different config files or flags per machine?)")


class StopRequest:
    """SIGTERM (a scheduler's pre-emption) or SIGINT asks to stop; the request is all-reduced with the loss, so
    every rank stops after the same step, and a checkpoint is written when checkpointing is on. A second signal
    takes the default action (stops at once)."""

    def __init__(self):
        self.signalled = False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True
        signal.signal(signum, signal.SIG_DFL)

    def requested(self, rank, step, device):
        # A fill kernel, not torch.tensor(): no host-to-device copy in the training step.
        return torch.full((), float(self.signalled or FAULT == ("stop", rank, step)), device=device)


# Fault injection for the tests: TRAIN_GPT2_FAULT="nan:RANK:STEP" makes that rank's loss NaN at that step;
# "stop:RANK:STEP" makes that rank request a stop there.
FAULT = (lambda f: (f[0], int(f[1]), int(f[2])) if len(f) == 3 else None)(os.environ.get("TRAIN_GPT2_FAULT", "").split(":"))


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        ddp = "RANK" in os.environ  # set by torchrun
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
        device = resolve_device(cfg.device, local_rank)
        if cfg.model.attention == "triton":
            from attention.triton import check_device  # triton is imported only by those who ask for it
            check_device(device)
        accum = grad_accum_steps(cfg, world)
        # The data is checked before the model is built or a process group started: a bad file fails in seconds.
        loader = ShardLoader(cfg.data_dir, "train", cfg.batch_size, cfg.seq_len, rank, world, cfg.model.vocab_size, accum)
        val_loader = ShardLoader(cfg.data_dir, "val", cfg.batch_size, cfg.seq_len, rank, world,
                                 cfg.model.vocab_size) if cfg.eval_interval else None
        if cfg.hellaswag:
            if not os.path.isfile(cfg.hellaswag_path):
                raise FileNotFoundError(f"hellaswag_path {cfg.hellaswag_path!r} does not exist; run python -m data.hellaswag")
            gpt2_encoding()  # HellaSwag needs the tokenizer: find out now, not at the first evaluation
        encoding = sample_encoding(cfg)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    try:
        train(cfg, device, rank, local_rank, world, accum, loader, val_loader, encoding)
        # Free DDP's reducer and its communication buffers while the interpreter is whole, then leave together:
        # a gloo worker thread still holding tensors at interpreter exit aborts the process.
        gc.collect()
        barrier(world)
    except ConfigError as e:  # found only once the ranks could compare notes
        sys.exit(f"error: {e}")
    finally:
        if ddp:
            dist.destroy_process_group()


def train(cfg, device, rank, local_rank, world, accum, loader, val_loader, encoding):
    ddp, master = dist.is_initialized(), rank == 0
    check_same_config(cfg, world)
    stop = StopRequest()
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
    model = raw_model = GPT(cfg.model).to(device)
    optimizer = make_optimizer(raw_model, cfg, device)
    start_step = 0
    resume_from = complete_checkpoints(cfg, clean=master)[-1:] if cfg.resume == "auto" else [cfg.resume] if cfg.resume else []
    if resume_from:
        try:
            start_step = load_checkpoint(cfg, resume_from[0], raw_model, optimizer, loader, rank, device)
        except (ConfigError, ValueError) as e:
            sys.exit(f"error: {e}")  # every rank reads the same checkpoint, so every rank stops here
    if cfg.compile:
        model = torch.compile(model, fullgraph=True)
    compiled = model  # evaluation calls this one: DDP's wrapper is for training steps
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    tokens_per_step = cfg.batch_size * cfg.seq_len * world * accum

    env = environment(device)
    flops_per_step, peak = raw_model.flops_per_token(cfg.seq_len) * tokens_per_step, peak_flops(env["gpu"])

    def mfu(seconds_per_step):
        """Model FLOPs utilisation: the FLOPs the model needs over what the GPUs could do at peak."""
        return flops_per_step / seconds_per_step / (peak * world) if peak else None

    run = None
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        settings = flat_config(cfg)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(settings, f, indent=2)
        print("config:", " ".join(f"{k}={v}" for k, v in settings.items()))
        print(f"device {device} ({env['gpu'] or platform.processor() or 'cpu'}), {world} process(es), "
              f"attention backend: {cfg.model.attention}, {raw_model.num_params():,} parameters, "
              f"{tokens_per_step:,} tokens per step ({accum} micro-step(s) of {cfg.batch_size}x{cfg.seq_len} per process)")
        if resume_from:
            print(f"resumed from {resume_from[0]} at step {start_step}")
        metrics, rows = open_log(os.path.join(cfg.out_dir, "metrics.jsonl"), start_step)
        evals, _ = open_log(os.path.join(cfg.out_dir, "evals.jsonl"), start_step)
        run = start_wandb(cfg, settings) if cfg.wandb else None

    for step in range(start_step, cfg.max_steps):
        last = step == cfg.max_steps - 1
        if cfg.eval_interval and (step % cfg.eval_interval == 0 or last):
            results = evaluate(cfg, compiled, raw_model, val_loader, device, autocast, rank, world, encoding)
            if master:
                print(f"eval step {step:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "samples"))
                for text in results.get("samples", []):
                    print(f"  sample: {text!r}")
                evals.write(json.dumps(dict(step=step, **results)) + "\n")
                evals.flush()
                if run:
                    run.log({k: v for k, v in results.items() if k != "samples"}, step=step)

        t0 = time.perf_counter()
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = loader.next_batch()
            x, y = x.to(device), y.to(device)
            # DDP all-reduces gradients during backward; only the last micro-step's backward needs to.
            with model.no_sync() if ddp and micro < accum - 1 else nullcontext():
                with autocast:
                    _, loss = model(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach()
        if FAULT == ("nan", rank, step):
            loss_sum = loss_sum * float("nan")
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        # One all-reduce and one host sync per step: the mean loss, and whether any rank was asked to stop.
        flags = torch.stack([loss_sum / (accum * world), stop.requested(rank, step, device)])
        if ddp:  # SUM: gloo has no AVG
            dist.all_reduce(flags)
        loss, stops = flags.tolist()  # waits for the step to finish
        grad_norm = grad_norm.item()  # already computed by now: a copy, not a wait
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):  # every rank sees the same all-reduced loss, so all stop here together
            if master:
                print(f"error: non-finite loss at step {step}; stopping before any checkpoint of this state")
            barrier(world)  # all ranks are here: leave together, so none aborts the others on shutdown
            sys.exit(1)
        if master:
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            row = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, dt_ms=1e3 * dt, tok_per_s=tokens_per_step / dt,
                       tok_per_s_per_gpu=tokens_per_step / dt / world, mfu=mfu(dt), peak_mem_gib=mem)
            rows.append(row)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if run:
                run.log(row, step=step)
            print(f"step {step:5d} | loss {loss:.6f} | lr {lr:.2e} | norm {grad_norm:.4f} | {1e3 * dt:8.2f} ms | "
                  f"{tokens_per_step / dt:10,.0f} tok/s | MFU {'n/a' if peak is None else format(row['mfu'], '.1%')} | {mem:.2f} GiB")
        if stops and master:
            print(f"stop requested (by {int(stops)} rank(s)) at step {step}: every rank stops after it")
        if cfg.checkpoint_interval and ((step + 1) % cfg.checkpoint_interval == 0 or last or stops):
            save_checkpoint(cfg, step + 1, raw_model, optimizer, loader, rank, world)
        if stops:
            break

    if ddp:  # DDP should keep every rank's parameters identical; check it rather than assume it
        checksum = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        if master:
            print(f"parameters identical on all {world} ranks: {'yes' if len(set(t.item() for t in gathered)) == 1 else 'NO'}")
    if master:
        metrics.close()
        evals.close()
        if rows:
            summary = summarize(rows, cfg, env, world, tokens_per_step, mfu)
            with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            ms = f"{summary['mean_ms']:.2f} ms/step, " if summary["mean_ms"] else ""
            print(f"final: step {summary['final_step']} loss {summary['final_loss']:.6f} | {ms}{summary['timing']}")
        if run:
            run.finish()


def open_log(path, start_step):
    """Open a JSON-lines log for writing. A resumed run keeps the rows before its first step (and drops those
    that the interrupted run wrote after its last checkpoint); returns the file and the rows kept."""
    kept = [r for r in map(json.loads, _read(path).splitlines()) if r["step"] < start_step]
    f = open(path, "w")
    f.writelines(json.dumps(r) + "\n" for r in kept)
    return f, kept


if __name__ == "__main__":
    main()
