"""Train GPT-2 with a choice of attention backend.

    python train_gpt2.py --config step49 --attention sdpa
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --config step49 --attention triton

Settings come from one dataclass (TrainConfig, with the model's GPTConfig inside it), filled first from a TOML
file in configs/ and then from `--key value` / `--key=value` flags. Every run writes, under out_dir:
config.json (the resolved settings), metrics.jsonl (one row per step) and summary.json (the whole run with the
machine and library versions: what results/ holds).
"""
import dataclasses
import difflib
import json
import os
import platform
import re
import sys
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from attention import BACKENDS
from data.shards import ShardLoader
from model import GPT, GPTConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@dataclass
class TrainConfig:
    data_dir: str = "data/tinyshakespeare"  # directory of *_train_*.bin token shards
    batch_size: int = 16  # B: sequences per step on each process
    seq_len: int = 1024  # T: tokens per sequence
    max_steps: int = 50
    learning_rate: float = 3e-4  # AdamW, constant
    weight_decay: float = 0.01  # on every parameter (PyTorch's AdamW default)
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cuda | mps | cpu
    compile: bool = True  # torch.compile the whole model (fullgraph=True)
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


def load_config(argv):
    cfg = TrainConfig()
    types = _key_types()
    pairs = _parse_flags(argv)
    settings = []  # (key, value, source), file first so that flags override it
    for key, value in pairs:
        if key == "config":
            path = _config_path(value)
            with open(path, "rb") as f:
                try:
                    settings += [(k, v, path) for k, v in tomllib.load(f).items()]
                except tomllib.TOMLDecodeError as e:
                    raise ConfigError(f"{path}: not valid TOML: {e}") from e
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
    if cfg.learning_rate <= 0 or cfg.timing_warmup < 0:
        raise ConfigError("learning_rate must be positive and timing_warmup non-negative")


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


def summarize(rows, cfg, env, world, mfu):
    """The run in one JSON object: what results/ keeps and the README's tables are built from."""
    timed = rows[cfg.timing_warmup:]
    mean_ms = sum(r["dt_ms"] for r in timed) / len(timed) if timed else None
    if not timed:
        timing = f"no ms/step mean: all {len(rows)} steps are within timing_warmup={cfg.timing_warmup}"
    else:
        timing = f"{mean_ms:.2f} ms/step, mean over steps {timed[0]['step']}-{timed[-1]['step']}"
        if cfg.timing_warmup:
            timing += f" (the first {cfg.timing_warmup} left out as warm-up)"
    return dict(**env, world_size=world, config=flat_config(cfg), final_step=rows[-1]["step"],
                final_loss=rows[-1]["loss"], mean_ms=mean_ms, timing=timing,
                mean_tok_per_s=cfg.batch_size * cfg.seq_len * world / (mean_ms / 1e3) if timed else None,
                mean_mfu=mfu(mean_ms / 1e3) if timed else None,
                peak_mem_gib=max(r["peak_mem_gib"] for r in rows),
                loss=[r["loss"] for r in rows], dt_ms=[r["dt_ms"] for r in rows])


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        ddp = "RANK" in os.environ  # set by torchrun
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
        device = resolve_device(cfg.device, local_rank)
        # The data is checked before the model is built or a process group started: a bad file fails in seconds.
        loader = ShardLoader(cfg.data_dir, "train", cfg.batch_size, cfg.seq_len, rank, world, cfg.model.vocab_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0

    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
    model = raw_model = GPT(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    if cfg.compile:
        model = torch.compile(model, fullgraph=True)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    tokens_per_step = cfg.batch_size * cfg.seq_len * world

    env = environment(device)
    flops_per_step, peak = raw_model.flops_per_token(cfg.seq_len) * tokens_per_step, peak_flops(env["gpu"])

    def mfu(seconds_per_step):
        """Model FLOPs utilisation: the FLOPs the model needs over what the GPUs could do at peak."""
        return flops_per_step / seconds_per_step / (peak * world) if peak else None

    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        settings = flat_config(cfg)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(settings, f, indent=2)
        print("config:", " ".join(f"{k}={v}" for k, v in settings.items()))
        print(f"device {device} ({env['gpu'] or platform.processor() or 'cpu'}), {world} process(es), "
              f"attention backend: {cfg.model.attention}, {raw_model.num_params():,} parameters")
        metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w")

    rows = []
    for step in range(cfg.max_steps):
        t0 = time.perf_counter()
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        if ddp:  # log the mean over ranks (gloo has no AVG)
            dist.all_reduce(loss)
            loss /= world
        loss = loss.item()  # waits for the step to finish on the device
        dt = time.perf_counter() - t0
        if master:
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            row = dict(step=step, loss=loss, dt_ms=1e3 * dt, tok_per_s=tokens_per_step / dt,
                       mfu=mfu(dt), peak_mem_gib=mem)
            rows.append(row)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            print(f"step {step:5d} | loss {loss:.6f} | {1e3 * dt:8.2f} ms | {tokens_per_step / dt:10,.0f} tok/s | "
                  f"MFU {'n/a' if peak is None else format(row['mfu'], '.1%')} | {mem:.2f} GiB")

    if master:
        metrics.close()
        summary = summarize(rows, cfg, env, world, mfu)
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"final: step {summary['final_step']} loss {summary['final_loss']:.6f} | {summary['timing']}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
