"""After training: KV-cache generation, export to Hugging Face, sampling and evaluation scripts."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F

from data.shards import read_shard, write_shard
from model import GPT, GPTConfig, KVCache
from training.checkpoints import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32)  # head size 16: the triton kernel's least
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU, triton runs in its interpreter (conftest.py)


# ----------------------------------------------------------------------------------------------------------------
# KV cache

@pytest.mark.parametrize("attention", ["naive", "sdpa", "triton"])
def test_cached_logits_equal_full_forward_at_every_position(attention):
    """Prefill a 13-token prompt through the backend, then decode one token at a time up to block_size: at every
    step the last position's logits equal a full forward pass over the whole sequence (a second code path), and
    the cache's buffers never move."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, attention=attention)).to(DEVICE).eval()
    seq = torch.randint(0, 101, (2, 32), device=DEVICE)
    cache = KVCache(model.config.n_layer, 32)
    with torch.no_grad():
        logits, _ = model(seq[:, :13], cache=cache)
        torch.testing.assert_close(logits, model(seq[:, :13])[0], atol=1e-5, rtol=1e-5)
        buffers = [t.data_ptr() for t in cache.k + cache.v]
        for t in range(13, 32):
            logits, _ = model(seq[:, t : t + 1], cache=cache)
            torch.testing.assert_close(logits[:, -1], model(seq[:, : t + 1])[0][:, -1], atol=1e-5, rtol=1e-5)
        assert cache.pos == 32 and [t.data_ptr() for t in cache.k + cache.v] == buffers
        with pytest.raises(ValueError, match="exceeds block_size 32"):  # no position 32 to give a 33rd token
            model(seq[:, :1], cache=cache)


@pytest.mark.parametrize("attention", ["naive", "sdpa", "triton"])
def test_cached_greedy_generation_equals_uncached(attention):
    """Greedy decoding, token for token, from prompts of 1 and 17 tokens (either side of the kernels' 16-row tiles)
    to 37 tokens: the cache fills to block_size 32, then generation goes on past it, where both paths predict each
    token from the last 32 tokens by a full pass."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, attention=attention)).to(DEVICE).eval()
    for prompt_len in (1, 17):
        idx = torch.randint(0, 101, (2, prompt_len), device=DEVICE)
        cached = model.generate(idx, 37 - prompt_len, top_k=1)
        uncached = model.generate(idx, 37 - prompt_len, top_k=1, use_cache=False)
        assert cached.shape == (2, 37)
        assert torch.equal(cached, uncached)


def test_cached_sampling_equals_uncached_with_one_seed():
    """Sampling (temperature, top-k) draws the same tokens on both paths from generators with one seed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 101, (4, 5))
    runs = [model.generate(idx, 20, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(7),
                           use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(*runs)


def test_cache_takes_one_token_at_a_time_after_the_prompt():
    model = GPT(GPTConfig(**TINY)).eval()
    cache = KVCache(model.config.n_layer, 32)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one token at a time"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    small = KVCache(model.config.n_layer, 3)
    with pytest.raises(ValueError, match="the cache holds 3 tokens"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=small)


# ----------------------------------------------------------------------------------------------------------------
# The scripts, on a checkpoint trained here with a padded vocabulary

def script(name):
    """scripts/<name>.py as a module, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with checkpoints after steps 2 and 3 of a 2-layer GPT with vocab_size 50,304 (GPT-2's 50,257
    padded), trained by train_gpt2.py on synthetic GPT-2 token ids; its data folder has a val split."""
    d = tmp_path_factory.mktemp("after_training")
    (d / "data").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4000), ("val", 2000)):
        write_shard(d / "data" / f"synthetic_{split}_000000.bin", rng.integers(0, 50257, n))
    flags = ["--config", "tiny", "--device", "cpu", "--compile", "false", f"--data_dir={d / 'data'}",
             f"--out_dir={d / 'run'}", "--max_steps=3", "--checkpoint_interval=2", "--vocab_size=50304", "--n_embd=32",
             "--block_size=64", "--seq_len=32", "--batch_size=2", "--eval_interval=0"]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return d / "run"


def test_export_loads_in_transformers_with_our_logits_and_weights(run_dir, tmp_path, capsys):
    script("export_hf").main([str(run_dir), "--out_dir", str(tmp_path), "--check"])
    assert "check: max |logits difference|" in capsys.readouterr().out
    import transformers

    ours, _, _ = load_model(str(run_dir))  # the run's newest checkpoint, as the export took it
    ours.eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == 50257 and ours.config.vocab_size == 50304
    idx = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0][..., :50257], atol=1e-5, rtol=1e-5)
    # Imported back (transformers' loading, then ours), every weight is ours bitwise, the embedding cut to 50,257.
    back = GPT.from_huggingface(hf).state_dict()
    for name, tensor in ours.state_dict().items():
        expected = tensor[:50257] if name in ("transformer.wte.weight", "lm_head.weight") else tensor
        assert torch.equal(back[name], expected), name
    # The tokenizer files: transformers' GPT-2 tokenizer encodes as tiktoken does.
    text = "Hello, I'm a language model,\n\n  and <|endoftext|> naïve 🙂"
    assert (transformers.AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"]
            == tiktoken.get_encoding("gpt2").encode(text, allowed_special="all"))


def sample_lines(capsys, *argv):
    script("sample").main([*argv, "--device", "cpu", "--prompt", "Once upon", "--prompt", "a time", "--num_samples",
                           "3", "--max_new_tokens", "12"])
    *samples, speed = capsys.readouterr().out.strip().split("\n")
    assert "tokens/s" in speed
    return samples


def test_sample_is_reproducible_with_a_seed(run_dir, capsys):
    first = sample_lines(capsys, str(run_dir), "--seed", "3")
    assert len([s for s in first if s.startswith("--- sample")]) == 6
    assert first == sample_lines(capsys, str(run_dir), "--seed", "3")
    assert first == sample_lines(capsys, str(run_dir), "--seed", "3", "--no_cache")  # the same draws, no cache
    assert first != sample_lines(capsys, str(run_dir), "--seed", "4")


def test_evaluate_val_loss_against_the_shard_read_here(run_dir, capsys):
    """4 batches of 2x16 tokens from the start of the val split: their mean loss, computed here from the shard."""
    script("evaluate").main([str(run_dir), "--device", "cpu", "--tasks", "val", "--val_batches", "4", "--batch_size",
                             "2", "--seq_len", "16"])
    out = run_dir / "checkpoints" / "step_000003" / "eval.json"
    assert f"wrote {out}" in capsys.readouterr().out
    result = json.loads(out.read_text())
    tokens = torch.from_numpy(read_shard(str(run_dir.parent / "data" / "synthetic_val_000000.bin"))[:129].astype(np.int64))
    model, _, _ = load_model(str(run_dir))
    with torch.no_grad():
        logits, _ = model(tokens[:-1].view(8, 16))
        expected = F.cross_entropy(logits.flatten(0, 1).double(), tokens[1:]).item()
    assert result["val_loss"] == pytest.approx(expected, abs=1e-5)
    assert result["val_tokens"] == 128 and result["checkpoint"] == str(out.parent) and result["torch"]


def test_evaluate_without_hellaswag_scores_what_it_can_and_says_what_it_skipped(run_dir, tmp_path, capsys):
    """Offline, by default: the validation loss is computed, HellaSwag is skipped with the command that gets it."""
    out = tmp_path / "eval.json"
    script("evaluate").main([str(run_dir), "--device", "cpu", "--val_batches", "4", "--batch_size", "2", "--seq_len",
                             "16", "--hellaswag", str(tmp_path / "missing.jsonl"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"skipping hellaswag: {tmp_path / 'missing.jsonl'} does not exist: prepare it with python -m data.hellaswag" \
        in printed
    result = json.loads(out.read_text())
    assert "val_loss" in result and "hellaswag_acc_norm" not in result and list(result["skipped"]) == ["hellaswag"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(run_dir, tmp_path, capsys):
    """As the trainer resumes: the newest checkpoint's model.pt truncated, sample, evaluate and export name it and use
    step 2's weights; the damaged checkpoint and an incomplete save are left where they are."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    damaged = run / "checkpoints" / "step_000003" / "model.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    saving = run / "checkpoints" / "step_000004.tmp"  # a save in progress: not the tools' to delete
    saving.mkdir()
    step2 = run / "checkpoints" / "step_000002"
    expected, _, _ = load_model(str(step2))
    model, _, path = load_model(str(run))
    assert path == str(step2) and f"skipping damaged checkpoint: {damaged} cannot be read" in capsys.readouterr().out
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    warning, *samples = sample_lines(capsys, str(run), "--seed", "3")
    assert warning.startswith(f"warning: skipping damaged checkpoint: {damaged}")
    assert samples == sample_lines(capsys, str(step2), "--seed", "3")
    script("evaluate").main([str(run), "--device", "cpu", "--tasks", "val", "--val_batches", "4", "--batch_size", "2",
                             "--seq_len", "16"])
    assert json.loads((step2 / "eval.json").read_text())["checkpoint"] == str(step2)
    script("export_hf").main([str(run), "--out_dir", str(tmp_path / "export")])
    assert capsys.readouterr().out.strip().split("\n")[-1].endswith(f"(from {step2})")
    assert damaged.exists() and saving.exists()


def test_export_writes_into_a_folder_with_files_only_when_asked_and_names_only_its_files(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("an older export")
    with pytest.raises(SystemExit) as e:
        script("export_hf").main([str(run_dir), "--out_dir", str(out)])
    assert "already holds files (config.json, notes.txt)" in str(e.value)
    assert (out / "config.json").read_text() == "an older export"
    script("export_hf").main([str(run_dir), "--out_dir", str(out), "--overwrite"])
    last = capsys.readouterr().out.strip().split("\n")[-1]
    written = last.removeprefix("wrote ").split(" to ")[0].split(", ")
    assert "config.json" in written and "model.safetensors" in written and "notes.txt" not in written
    assert sorted(p.name for p in out.iterdir()) == sorted(written + ["notes.txt"])  # nothing else, no temp folder
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "config.json").read_text())["n_layer"] == 2


CONTEXTS = ["A man is standing in a kitchen. He", "The children run to the park and", "She opens the laptop, then",
            "Two dogs chase a ball across the yard. One dog", "The chef slices the onions and",
            "A woman ties her running shoes. She", "The band walks onto the stage and", "He pours the paint into a tray,"]
ENDINGS = ["picks up a knife and cuts the bread.", "starts to sing loudly.", "falls asleep on the couch at once.",
           "waves at the camera.", "the sky turns dark green.", "runs quickly out of the room",
           "takes a long breath before going on.", "throws it over the fence."]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random transformers GPT-2 with GPT-2's vocabulary, saved as --init takes it. Its weights are drawn far
    wider than GPT-2's initialisation so that its predictions are far from uniform and no two endings tie."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3)
    hf = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return folder


def hellaswag_reference(hf, examples):
    """Each example's predicted ending, by transformers' forward: the ending follows the context after a space (GPT-2's
    BPE puts the space in the ending's first token), and its score is the mean cross-entropy of its own tokens given
    everything before them (acc_norm). Also the smallest gap between the best and second-best score."""
    enc = tiktoken.get_encoding("gpt2")
    predictions, gap = [], float("inf")
    for example in examples:
        ctx = enc.encode_ordinary(example["ctx"])
        scores = []
        for ending in example["endings"]:
            end = enc.encode_ordinary(" " + ending)
            ids = torch.tensor([ctx + end])
            with torch.no_grad():
                logits = hf(ids).logits[0].double()
            # The logits at position t predict token t+1: the ending's tokens are predicted at len(ctx)-1 onwards.
            losses = F.cross_entropy(logits[len(ctx) - 1 : -1], ids[0, len(ctx):], reduction="none")
            scores.append(losses.sum().item() / len(end))
        ranked = sorted(scores)
        predictions.append(scores.index(ranked[0]))
        gap = min(gap, ranked[1] - ranked[0])
    return predictions, gap


@pytest.fixture(scope="module")
def hellaswag_file(hf_folder, tmp_path_factory):
    """8 examples labelled so that transformers' scoring gets exactly the even-numbered ones right: acc_norm 0.5."""
    import transformers

    examples = [dict(ind=i, ctx=ctx, endings=[ENDINGS[(i + j) % 8] for j in range(4)], label=0)
                for i, ctx in enumerate(CONTEXTS)]
    predictions, gap = hellaswag_reference(transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval(), examples)
    assert gap > 1e-4, "two endings (nearly) tie: the comparison would hinge on rounding"
    for i, (example, predicted) in enumerate(zip(examples, predictions)):
        example["label"] = predicted if i % 2 == 0 else (predicted + 1) % 4
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def test_evaluate_hellaswag_equals_transformers_reference(hf_folder, hellaswag_file, tmp_path):
    out = tmp_path / "eval.json"
    script("evaluate").main(["--init", str(hf_folder), "--device", "cpu", "--tasks", "hellaswag", "--hellaswag",
                             str(hellaswag_file), "--out", str(out)])
    result = json.loads(out.read_text())
    assert (result["hellaswag_acc_norm"], result["hellaswag_correct"], result["hellaswag_total"]) == (0.5, 4, 8)


def test_evaluate_two_processes_equal_one(run_dir, hf_folder, hellaswag_file, tmp_path):
    """torchrun with 2 processes (gloo): each takes half the val batches and examples; the figures are the same."""
    common = ["--init", str(hf_folder), "--device", "cpu", "--data_dir", str(run_dir.parent / "data"),
              "--val_batches", "4", "--batch_size", "2", "--seq_len", "16", "--hellaswag", str(hellaswag_file)]
    script("evaluate").main([*common, "--out", str(tmp_path / "one.json")])
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "scripts", "evaluate.py"), *common, "--out", str(tmp_path / "two.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["processes"] == 2 and two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
    assert (two["hellaswag_correct"], two["hellaswag_total"]) == (one["hellaswag_correct"], one["hellaswag_total"]) == (4, 8)


NO_CHECKPOINT = "{} is a run folder with no complete checkpoint: train with --checkpoint_interval N to save one"


@pytest.mark.parametrize("name, argv, message", [
    ("sample", ["{tmp}/missing"], "'{tmp}/missing' is neither a checkpoint"),
    ("evaluate", ["{tmp}/missing"], "'{tmp}/missing' is neither a checkpoint"),
    ("export_hf", ["{tmp}/missing", "--out_dir", "{tmp}/x"], "'{tmp}/missing' is neither a checkpoint"),
    ("sample", ["{tmp}/run"], NO_CHECKPOINT.format("{tmp}/run")),
    ("evaluate", ["{tmp}/run"], NO_CHECKPOINT.format("{tmp}/run")),
    ("export_hf", ["{tmp}/run", "--out_dir", "{tmp}/x"], NO_CHECKPOINT.format("{tmp}/run")),
    ("sample", ["{tmp}/tiny"], NO_CHECKPOINT.format("{tmp}/tiny")),
    ("evaluate", ["{tmp}/tiny"], NO_CHECKPOINT.format("{tmp}/tiny")),
    ("export_hf", ["{tmp}/tiny", "--out_dir", "{tmp}/x"], NO_CHECKPOINT.format("{tmp}/tiny")),
    ("sample", ["--init", "gpt3"], "unknown model_type 'gpt3'; choose one of: gpt2, gpt2-medium"),
    ("evaluate", ["--init", "gpt3", "--tasks", "hellaswag", "--hellaswag", "{tmp}/hs.jsonl"], "unknown model_type 'gpt3'"),
    ("evaluate", ["--init", "gpt2", "--tasks", "val"], "no data folder for the validation loss: pass --data_dir"),
    ("evaluate", ["--init", "gpt2", "--tasks", "hellaswag", "--hellaswag", "{tmp}/no.jsonl"],
     "{tmp}/no.jsonl does not exist: prepare it with python -m data.hellaswag"),
    ("evaluate", ["--init", "gpt2", "--hellaswag", "{tmp}/no.jsonl"],
     "nothing to evaluate here: no data folder for the validation loss: pass --data_dir"),
    ("export_hf", ["{tmp}/missing", "--out_dir", "{tmp}/hs.jsonl"], "--out_dir {tmp}/hs.jsonl is a file; give a folder"),
    ("export_hf", ["{tmp}/missing", "--out_dir", "{tmp}/tiny"],
     "--out_dir {tmp}/tiny already holds files (config.json); give a new or empty folder, or --overwrite"),
    ("sample", [], "give a checkpoint"),
])
def test_bad_input_gives_one_line(name, argv, message, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run folder before its first checkpoint
    (tmp_path / "tiny").mkdir()  # a run folder of a run that saved no checkpoint: the trainer's config.json only
    (tmp_path / "tiny" / "config.json").write_text("{}")
    (tmp_path / "hs.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        script(name).main([a.format(tmp=tmp_path) for a in argv] + ["--device", "cpu"] * (name != "export_hf"))
    assert str(e.value).startswith(f"error: {message.format(tmp=tmp_path)}") and "\n" not in str(e.value)


def test_offline_init_gives_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}  # no network, an empty download cache
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sample.py"), "--init", "gpt2", "--device",
                          "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().split("\n")[-1].startswith("error: could not get gpt2 from the Hugging Face Hub")
