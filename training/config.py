"""The settings of a training run: one dataclass (TrainConfig, with the model's GPTConfig inside), filled first from a
TOML file in configs/ and then from `--key value` / `--key=value` flags, and checked before any work starts.

Keys are flat: a model key (n_layer, attention, ...) is written exactly like a training key, in files and on the
command line. Each field's one-line description is its comment in the dataclass: `--help` prints them from there.
"""
import dataclasses
import difflib
import inspect
import os
import re
import tomllib
from dataclasses import dataclass, field

from attention import BACKENDS
from model import GPTConfig, check_fp8_lm_head

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
# The modes that capture CUDA graphs: the trainer then accumulates gradients into buffers of its own (see train_gpt2).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # data
    data_dir: str = "data/tinyshakespeare"  # folder of *_train_*.bin (and, to evaluate, *_val_*.bin) token shards
    batch_size: int = 16  # B: sequences per micro-step on each process
    seq_len: int = 1024  # T: tokens per sequence
    total_batch_size: int = 0  # tokens per optimizer step, by gradient accumulation; 0: B*T*processes
    # optimisation: AdamW; the defaults are the step-49 experiment's (PyTorch's AdamW defaults, lr 3e-4)
    max_steps: int = 50  # optimizer steps of the whole run
    learning_rate: float = 3e-4  # the peak learning rate
    lr_schedule: str = "constant"  # constant | cosine: linear warm-up to learning_rate, cosine decay to min_lr
    warmup_steps: int = 0  # steps of linear warm-up (cosine schedule)
    min_lr: float = 0.0  # the learning rate the cosine schedule reaches at max_steps
    weight_decay: float = 0.01  # AdamW weight decay
    decay_all_params: bool = True  # false: weight decay on matrices only, not on biases and LayerNorm gains
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0: no clipping (the norm is logged anyway)
    seed: int = 1337  # random seed of the initialisation and the samples
    # evaluation, every eval_interval steps and after the last step
    eval_interval: int = 0  # evaluate every this many steps and after the last step (the final weights); 0: never
    eval_batches: int = 20  # validation batches of B*T tokens per process
    hellaswag: bool = False  # HellaSwag acc_norm at each evaluation (prepare with python -m data.hellaswag)
    hellaswag_path: str = "data/hellaswag/hellaswag_val.jsonl"  # the HellaSwag validation file
    sample_prompt: str = "Hello, I'm a language model,"  # prompt of the samples at each evaluation; "": none
    sample_count: int = 4  # samples at each evaluation
    sample_tokens: int = 32  # new tokens per sample
    # checkpoints, in out_dir/checkpoints
    out_dir: str = "out"  # the run's folder: config, logs, summary, checkpoints (one run per folder)
    checkpoint_interval: int = 0  # save every this many steps and after the last step; 0: never
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    resume: str = ""  # "": a fresh run; auto: the newest complete checkpoint in out_dir; or a checkpoint path
    overwrite: bool = False  # true: delete another run's files in out_dir and start afresh
    # speed, and the machine (TRAINING_NOTES.md has each speed setting's measurement)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cuda | mps | cpu
    compile: bool = True  # torch.compile the whole model (fullgraph=True)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune-no-cudagraphs | max-autotune
    activation_memory_budget: float = 1.0  # torch.compile: below 1, keep that share of the activations for backward, recompute the rest (elementwise)
    bf16_params: bool = False  # bf16 parameters, gradients and activations, AdamW on fp32 masters (training/precision.py)
    overlap_steps: bool = False  # read each step's loss, norm and stop flag a step late: the host queues the next step meanwhile
    deterministic_attention: bool = False  # triton backend: bitwise-repeatable gradients (the tl backward), even where the faster Gluon backward's dQ is not
    dist_timeout: int = 1800  # seconds a collective may wait for the other ranks before the run fails
    # logging
    wandb: bool = False  # log to Weights & Biases (rank 0; offline when no API key is configured)
    wandb_project: str = "gpt2-attention"  # W&B project
    wandb_run_name: str = ""  # W&B run name; "": W&B's own
    timing_warmup: int = 10  # first steps of each process left out of the mean ms/step (compile, autotune)
    profile_steps: int = 0  # trace this many steps after timing_warmup into out_dir/trace.json (scripts/profile_step.py)
    model: GPTConfig = field(default_factory=GPTConfig)


# --help lists GPTConfig's keys under "model", except these, which change the speed or memory of a step, not the model.
SPEED_MODEL_KEYS = ("loss_chunk", "recompute_gelu", "fp8_lm_head")


def _key_types():
    """Every settable key -> (which dataclass holds it, its type)."""
    keys = {f.name: ("train", f.type) for f in dataclasses.fields(TrainConfig) if f.name != "model"}
    keys.update({f.name: ("model", f.type) for f in dataclasses.fields(GPTConfig)})
    return keys


BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}

# Names people type for these keys (other trainers' flags): suggestions only, never accepted silently.
ALIASES = {"lr": "learning_rate", "max_lr": "learning_rate", "bs": "batch_size", "batch": "batch_size",
           "micro_batch_size": "batch_size", "steps": "max_steps", "iters": "max_steps", "max_iters": "max_steps",
           "num_steps": "max_steps", "warmup": "warmup_steps", "warmup_iters": "warmup_steps", "wd": "weight_decay",
           "clip": "grad_clip", "attn": "attention", "backend": "attention", "block": "block_size",
           "context_length": "seq_len", "sequence_length": "seq_len", "T": "seq_len", "B": "batch_size",
           "output_dir": "out_dir", "outdir": "out_dir", "data": "data_dir", "dataset": "data_dir"}


def _convert(key, typ, value, source):
    """Coerce a command-line string to the field's type; a TOML value must have it already (an int for a float is
    fine). Or say why not."""
    expected = "true or false" if typ is bool else typ.__name__
    if source == "command line" and typ is not str:
        text = value.strip().lower()
        if typ is bool:
            if text not in BOOLEANS:
                raise ConfigError(f"{source}: {key} must be true or false (also 1/0, yes/no, on/off), got {value!r}")
            return BOOLEANS[text]
        try:
            value = int(text) if typ is int else float(text)
        except ValueError:
            pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not typ:
        quoted = source != "command line" and isinstance(value, str)
        raise ConfigError(f"{source}: {key} must be {expected}, got {value!r}" +
                          (": a TOML string; write the value without quotes" if quoted else ""))
    return value


def _unknown(key, source):
    """The error for an unknown key, suggesting the key meant, written as the source writes keys."""
    hint = ALIASES.get(key) or next(iter(difflib.get_close_matches(key, _key_types(), n=1)), None)
    written = (lambda k: f"--{k}") if source == "command line" else (lambda k: f"{k} = ...")
    suggestion = f"; did you mean {written(hint)}?" if hint else ""
    return ConfigError(f"{source}: unknown key {key!r}{suggestion} (python train_gpt2.py --help lists every key)")


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
    raise ConfigError(f"config {name!r} not found; give a path or one of: {', '.join(_config_names())}")


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
    try:
        check_fp8_lm_head(m, cfg.batch_size * cfg.seq_len)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.seq_len > m.block_size:
        raise ConfigError(f"seq_len ({cfg.seq_len}) exceeds block_size ({m.block_size}); lower seq_len or raise block_size")
    if m.vocab_size > 2**16:
        raise ConfigError(f"vocab_size ({m.vocab_size}) exceeds 65536, the most that uint16 token shards can hold")
    if cfg.device not in ("auto", "cuda", "mps", "cpu"):
        raise ConfigError(f"device {cfg.device!r}: choose auto, cuda, mps or cpu")
    if cfg.learning_rate <= 0 or not 0 <= cfg.min_lr <= cfg.learning_rate:
        raise ConfigError(f"need 0 < learning_rate and 0 <= min_lr <= learning_rate, got {cfg.learning_rate}, {cfg.min_lr}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode {cfg.compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if not 0 < cfg.activation_memory_budget <= 1:
        raise ConfigError(f"activation_memory_budget must be in (0, 1], got {cfg.activation_memory_budget}; 1: keep all "
                          "activations torch.compile's partitioner chooses, e.g. 0.8: recompute the cheapest fifth")
    if cfg.activation_memory_budget < 1 and not cfg.compile:
        raise ConfigError(f"activation_memory_budget {cfg.activation_memory_budget} needs torch.compile (its partitioner "
                          "does the recomputing): set --compile true, or leave the budget at 1")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    if not cfg.adam_eps > 0:
        raise ConfigError(f"adam_eps must be positive, got {cfg.adam_eps}")
    if cfg.warmup_steps > cfg.max_steps:
        raise ConfigError(f"warmup_steps ({cfg.warmup_steps}) exceeds max_steps ({cfg.max_steps}): the learning rate "
                          "would never reach its peak; lower warmup_steps or raise max_steps")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"lr_schedule {cfg.lr_schedule!r}: choose constant or cosine")
    for key in ("total_batch_size", "warmup_steps", "eval_interval", "checkpoint_interval", "timing_warmup",
                "profile_steps", "sample_count", "sample_tokens"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must not be negative, got {getattr(cfg, key)}")
    for key, least in (("grad_clip", 0), ("weight_decay", 0), ("keep_last", 1), ("eval_batches", 1), ("dist_timeout", 1)):
        if getattr(cfg, key) < least:
            raise ConfigError(f"{key} must be at least {least}, got {getattr(cfg, key)}")


def flat_config(cfg):
    d = dataclasses.asdict(cfg)
    return {**{k: v for k, v in d.items() if k != "model"}, **d["model"]}


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


def help_text(argv=()):
    """`--help`: every key with its type, default and description, in groups (data, model, optimisation, evaluation,
    checkpoints, speed, logging); with --config (and flags) in argv, each key's value in that run too. Descriptions
    and groups are read from the dataclasses' own comments, so they are written in one place."""
    argv = [a for a in argv if a not in ("-h", "--help")]
    values = flat_config(load_config(argv)) if argv else None
    groups = {}  # title -> lines
    for cls in (TrainConfig, GPTConfig):
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "model"}
        title = "model (model.py's GPTConfig)"
        for line in inspect.getsource(cls).splitlines()[2:]:
            group = re.fullmatch(r"\s+# (.*)", line)
            field_ = re.fullmatch(r"\s+(\w+): (\w+) = .*?(?:  # (.*))?", line)
            if group:
                title = group[1]
            elif field_ and field_[1] in defaults:
                name, typ, desc = field_[1], field_[2], field_[3] or ""
                value = "" if values is None else f" = {values[name]!r}"
                under = next(t for t in groups if t.startswith("speed")) if name in SPEED_MODEL_KEYS else title
                groups.setdefault(under, []).append(f"  --{name} {typ.upper()}{value} (default {defaults[name]!r})".ljust(56)
                                                    + f" {desc}")
    order = ["data", "model", "optimisation", "evaluation", "checkpoints", "speed", "logging"]
    titles = sorted(groups, key=lambda t: order.index(next(o for o in order if t.startswith(o))))
    lines = ["usage: python train_gpt2.py [--config NAME_OR_PATH] [--key value | --key=value ...]",
             "       torchrun --standalone --nproc_per_node=N train_gpt2.py [same]",
             "",
             f"--config: a TOML file of these keys, or one of configs/: {', '.join(_config_names())}. Flags override it.",
             "A boolean flag alone means true (--compile); otherwise true/false, 1/0, yes/no, on/off."]
    if values is not None:
        lines.append(f"Each key's value in this run (= ...): {' '.join(argv)}")
    for title in titles:
        lines += ["", f"{title}:", *groups[title]]
    return "\n".join(lines)


def _config_names():
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".toml"))
