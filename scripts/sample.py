"""Sample from a trained checkpoint or from OpenAI's GPT-2.

    python scripts/sample.py out/gpt2_124m --prompt "Hello, I'm a language model," --num_samples 4
    python scripts/sample.py --init gpt2-xl --prompt "The meaning of life is" --max_new_tokens 200 --top_k 200
    python scripts/sample.py out/gpt2_124m --no_cache      # each new token runs the whole sequence again

The checkpoint is a step folder (out/<run>/checkpoints/step_NNNNNN) or a run folder (its newest complete
checkpoint that reads whole, as the trainer resumes); --init takes gpt2, gpt2-medium, gpt2-large or gpt2-xl (downloaded by transformers) or a folder saved by
transformers (scripts/export_hf.py writes one). Each prompt is extended num_samples times in one batch, with a KV
cache unless --no_cache (see GPT.generate); bf16 autocast on CUDA, as in training. Prints the samples, then the
generation speed: new tokens of all sequences per second, the prompt's pass included.
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from attention import BACKENDS  # noqa: E402
from data.tokenizer import gpt2_encoding  # noqa: E402
from model import GPT  # noqa: E402
from train_gpt2 import autocast_context, resolve_device  # noqa: E402
from training.checkpoints import load_model  # noqa: E402


def add_model_args(p):
    """The arguments that pick a model, shared with evaluate.py."""
    p.add_argument("checkpoint", nargs="?", help="a step folder, or a run folder (its newest complete checkpoint)")
    p.add_argument("--init", help="instead of a checkpoint: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a folder "
                                  "saved by transformers")
    p.add_argument("--attention", choices=BACKENDS, help="attention backend; default: the checkpoint's, else sdpa")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cuda | mps | cpu")


def load(args, local_rank=0):
    """(model in eval mode on its device, device, a name for it (the step folder read, or --init's), the run's settings
    or {} for --init) from add_model_args' arguments; a bad argument exits with one line saying what to do."""
    if (args.checkpoint is None) == (args.init is None):
        raise SystemExit("error: give a checkpoint (a step or run folder) or --init gpt2|gpt2-medium|gpt2-large|"
                         "gpt2-xl|FOLDER, one of the two")
    try:
        device = resolve_device(args.device, local_rank)
        if args.checkpoint is not None:
            model, settings, name = load_model(args.checkpoint, device, args.attention)
        else:
            model, settings, name = init_model(args.init, args.attention or "sdpa").to(device), {}, args.init
        if model.config.attention == "triton":  # asked for, or the checkpoint's
            from attention.triton import check_device
            check_device(device)
    except (ValueError, RuntimeError) as e:  # CheckpointError and ConfigError are ValueErrors
        raise SystemExit(f"error: {e}") from None
    return model.eval(), device, name, settings


def init_model(name, attention):
    """OpenAI's GPT-2 by name (transformers downloads it) or a GPT2LMHeadModel folder saved by transformers."""
    if os.path.isdir(name):
        from transformers import GPT2LMHeadModel
        return GPT.from_huggingface(GPT2LMHeadModel.from_pretrained(name), attention)
    try:
        return GPT.from_pretrained(name, attention)
    except ValueError as e:
        raise ValueError(f"{e}, or a folder saved by transformers") from None
    except OSError as e:  # transformers' many ways of saying "not downloaded and no internet"
        raise ValueError(f"could not get {name} from the Hugging Face Hub ({type(e).__name__}); without internet, "
                         f"download it elsewhere (hf download openai-community/{name}), copy the Hugging Face cache "
                         "here and set HF_HUB_OFFLINE=1, or pass --init a folder saved by transformers") from None


def generate_timed(model, idx, device, **kwargs):
    """(model.generate(idx, **kwargs) under the device's autocast, its seconds to the end of the GPU's work)."""
    t0 = time.perf_counter()
    with autocast_context(device):
        out = model.generate(idx, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several); default: <|endoftext|> alone")
    p.add_argument("--num_samples", type=int, default=4, help="samples per prompt, generated as one batch")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; below 1 sharpens the distribution")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0: all; 1: greedy")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no_cache", action="store_true", help="no KV cache: each step runs the whole sequence again")
    args = p.parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise SystemExit(f"error: --temperature must be > 0, got {args.temperature}; for greedy decoding use --top_k 1")
    if args.top_k < 0:
        raise SystemExit(f"error: --top_k must be 0 (all tokens) or more, got {args.top_k}")
    try:
        enc = gpt2_encoding()
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    prompts = [enc.encode(p, allowed_special="all") for p in args.prompt or ["<|endoftext|>"]]
    if not all(prompts):
        raise SystemExit("error: an empty --prompt; give at least one token, or leave --prompt out for <|endoftext|>")

    model, device, name, _ = load(args)
    largest = max(max(p) for p in prompts)
    if largest >= model.config.vocab_size:
        raise SystemExit(f"error: the prompts hold GPT-2 token {largest}, beyond {name}'s vocab_size "
                         f"{model.config.vocab_size}")
    generator = torch.Generator(device).manual_seed(args.seed)
    new_tokens, seconds = 0, 0.0
    for prompt in prompts:
        idx = torch.tensor(prompt, device=device).repeat(args.num_samples, 1)
        out, dt = generate_timed(model, idx, device, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None, generator=generator, use_cache=not args.no_cache,
                                 vocab_size=enc.n_vocab)
        seconds += dt
        new_tokens += args.num_samples * args.max_new_tokens
        for i, row in enumerate(out.tolist()):
            print(f"--- sample {i + 1} of {args.num_samples}\n{enc.decode(row)}")
    print(f"--- {new_tokens:,} new tokens in {seconds:.2f} s: {new_tokens / seconds:,.1f} tokens/s "
          f"({args.num_samples} sequences at a time, {'no ' if args.no_cache else ''}KV cache, "
          f"{model.config.attention} attention, {device}, {name})")


if __name__ == "__main__":
    main()
