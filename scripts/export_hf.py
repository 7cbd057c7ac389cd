"""Export a checkpoint as a Hugging Face GPT-2: a folder that transformers' GPT2LMHeadModel and AutoTokenizer load.

    python scripts/export_hf.py out/gpt2_124m --out_dir export/gpt2_124m --check
    # then, anywhere: transformers.GPT2LMHeadModel.from_pretrained("export/gpt2_124m")

The checkpoint is a step folder (out/<run>/checkpoints/step_NNNNNN) or a run folder (its newest complete
checkpoint that reads whole). out_dir must be new or empty unless --overwrite (which replaces files of the same
names and leaves the others). Writes config.json and model.safetensors through transformers' own save_pretrained, and the tokenizer
files vocab.json and merges.txt, which are OpenAI's encoder.json and vocab.bpe under the names transformers reads,
when tiktoken can get them (from the internet or TIKTOKEN_CACHE_DIR). A vocabulary padded for faster matmuls
(50,304) is sliced back to GPT-2's 50,257 tokens: the extra rows are never a target in the data, and transformers'
GPT-2 tokenizer has no ids for them. --check loads the export with transformers and compares its logits with ours.
"""
import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import HF_TRANSPOSED  # noqa: E402
from training.checkpoints import CheckpointError, load_model  # noqa: E402

GPT2_VOCAB = 50257
EOT = 50256  # <|endoftext|>
# OpenAI's GPT-2 BPE files, as tiktoken fetches (and caches) them -> the names transformers' GPT-2 tokenizer reads.
BPE_FILES = {"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": "vocab.json",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": "merges.txt"}


def to_huggingface(model):
    """A transformers GPT2LMHeadModel with model's weights (the mirror of GPT.from_huggingface), vocabulary cut to
    GPT-2's when padded beyond it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    vocab = min(c.vocab_size, GPT2_VOCAB)
    # No dropout: our model has none. LayerNorm eps 1e-5 and the tanh GELU ("gelu_new") are transformers' defaults.
    config = GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(config)
    theirs = hf.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in ("transformer.wte.weight", "lm_head.weight"):
                tensor = tensor[:vocab]
            theirs[name].copy_(tensor.t() if name.endswith(HF_TRANSPOSED) else tensor)
    return hf.eval()


def write_tokenizer(out_dir):
    """Write vocab.json and merges.txt; False (with a warning) when tiktoken cannot get them here."""
    from tiktoken.load import read_file_cached

    try:
        files = {name: read_file_cached(url) for url, name in BPE_FILES.items()}
    except Exception as e:  # tiktoken raises whatever its HTTP client raised
        print(f"warning: no tokenizer files in the export: tiktoken could not get GPT-2's BPE files "
              f"({type(e).__name__}); set TIKTOKEN_CACHE_DIR to a folder holding them (see README)")
        return False
    for name, data in files.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    return True


def check(model, out_dir, n=4, length=64):
    """Max |logits(ours) - logits(transformers)| on n random sequences, the export loaded back from out_dir."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    vocab = hf.config.vocab_size
    idx = torch.randint(0, vocab, (n, min(length, model.config.block_size)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(idx)[0][..., :vocab] - hf(idx).logits).abs().max().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a step folder, or a run folder (its newest complete checkpoint)")
    p.add_argument("--out_dir", required=True, help="the folder to write: new or empty, unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that holds files, replacing those "
                   "of the same names")
    p.add_argument("--check", action="store_true", help="load the export with transformers and compare logits")
    p.add_argument("--tolerance", type=float, default=1e-4, help="--check fails above this max |logits difference|")
    args = p.parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise SystemExit(f"error: --out_dir {args.out_dir} is a file; give a folder (new or empty) to write to")
    held = sorted(os.listdir(args.out_dir)) if os.path.isdir(args.out_dir) else []
    if held and not args.overwrite:
        raise SystemExit(f"error: --out_dir {args.out_dir} already holds files ({', '.join(held)}); give a new or "
                         "empty folder, or --overwrite to replace files of the same names")

    try:
        model, _, step_dir = load_model(args.checkpoint, device="cpu", attention="sdpa")
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    model.eval()
    if model.config.vocab_size < GPT2_VOCAB:
        print(f"warning: vocab_size {model.config.vocab_size} < GPT-2's {GPT2_VOCAB}: no GPT-2 tokenizer fits this model")
    os.makedirs(args.out_dir, exist_ok=True)
    # Written beside the folder's other files first, then moved in: the closing line can name exactly what was written.
    with tempfile.TemporaryDirectory(dir=args.out_dir, prefix=".export-") as tmp:
        to_huggingface(model).save_pretrained(tmp)
        if model.config.vocab_size >= GPT2_VOCAB:
            write_tokenizer(tmp)
        written = sorted(os.listdir(tmp))
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(args.out_dir, name))
    print(f"wrote {', '.join(written)} to {args.out_dir} (from {step_dir})")
    if args.check:
        diff = check(model, args.out_dir)
        verdict = "ok" if diff <= args.tolerance else "FAILED"
        print(f"check: max |logits difference| ours vs transformers: {diff:.2e} (tolerance {args.tolerance:g}): {verdict}")
        if diff > args.tolerance:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
