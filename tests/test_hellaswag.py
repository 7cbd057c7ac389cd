"""data/hellaswag.py: rendering, acc_norm scoring against a model whose losses are known by hand, and 2 ranks."""
import json
import math
import os
import time
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import gpt2_or_skip
from data import hellaswag
from model import GPTConfig

enc = gpt2_or_skip()
THE, CAT = enc.encode_ordinary(" the"), enc.encode_ordinary(" cat")
assert len(THE) == len(CAT) == 1
THE, CAT = THE[0], CAT[0]


class Bigram(nn.Module):
    """A stand-in for GPT whose every prediction is known: after " the" it predicts " cat", after any other token
    " the", with logit 10 against 0 for each of the other 50,256 tokens. Each ending token therefore costs either
    hit = lse - 10 (the predicted token came) or miss = lse (it did not), lse = log(e^10 + 50256), and an ending's
    mean loss is lse - 10 * hits / n: the lowest mean is the ending with the largest fraction of hits."""

    def __init__(self, block_size=1024):
        super().__init__()
        self.config = GPTConfig(block_size=block_size)

    def forward(self, idx):
        assert idx.size(1) <= self.config.block_size, "like GPT, this model sees at most block_size tokens"
        predicted = torch.where(idx == THE, CAT, THE)
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        return logits.scatter_(2, predicted.unsqueeze(-1), 10.0), None


def example(ind, ctx, endings, label):
    """An example in the official schema (only ctx, endings and label are read)."""
    return dict(ind=ind, activity_label="Test", ctx_a=ctx, ctx_b="", ctx=ctx, split="val", split_type="indomain",
                label=label, endings=endings, source_id=f"test~{ind}")


# Hits per ending, by hand, from the rule above (the first ending token is predicted from the context's last token):
EXAMPLES = [
    # " the cat the cat sat": hit hit hit hit miss = 4/5; " dog" 0/1; " a dog runs" 0/3; " the dog" 1/2.
    # acc_norm picks ending 0 (right). acc (sum of losses, 5·lse - 40 ≈ 15.96 vs lse ≈ 11.19 for " dog") would pick
    # the one-token ending 1: the two measures disagree because of the endings' lengths.
    example(0, "A man sits down.", ["the cat the cat sat", "dog", "a dog runs", "the dog"], 0),
    # " dog" 0/1; " the dog dog dog" 1/4; " a b c d e" 0/5; " fish" 0/1: ending 1 (right). The context
    # "the cat the cat the cat" has 4 hits in 5 predictions: counted too, ending 0 would win (4/6 > 5/9).
    example(1, "the cat the cat the cat", ["dog", "the dog dog dog", "a b c d e", "fish"], 1),
    # " the" 1/1; " the cat the cat sat dog" 4/6: ending 0 (right). Its 5 padding positions, counted as
    # misses, would make it 1/6 and ending 1 would win.
    example(2, "Look at this.", ["the", "the cat the cat sat dog", "bird", "fish"], 0),
    # " the cat" 2/2; the others 0/1: ending 0, but the label says 2 (wrong).
    example(3, "A man sits down.", ["the cat", "dog", "bird", "fish"], 2),
]
CORRECT = [True, True, True, False]


@pytest.fixture
def val_path(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return str(path)


def test_the_hand_computed_losses_disagree_between_sum_and_mean():
    """The arithmetic behind EXAMPLES[0]: acc_norm and acc differ there."""
    lse = math.log(math.exp(10) + 50256)
    hits, lengths = [4, 0, 0, 1], [5, 1, 3, 2]
    mean = [lse - 10 * h / n for h, n in zip(hits, lengths)]
    total = [n * lse - 10 * h for h, n in zip(hits, lengths)]
    assert min(range(4), key=mean.__getitem__) == 0 and min(range(4), key=total.__getitem__) == 1


def test_render_example_pads_and_masks_the_endings():
    ex = EXAMPLES[2]
    ctx = enc.encode_ordinary(ex["ctx"])
    ends = [enc.encode_ordinary(" " + e) for e in ex["endings"]]
    length = len(ctx) + max(len(e) for e in ends)
    tokens, mask, label = hellaswag.render_example(ex, enc)
    assert label == 0 and tokens.dtype == torch.long and tokens.shape == mask.shape == (4, length)
    for i, end in enumerate(ends):
        pad = length - len(ctx) - len(end)
        assert tokens[i].tolist() == ctx + end + [0] * pad
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * pad


def test_render_example_cuts_long_rows_from_the_left():
    ex = EXAMPLES[2]
    ctx = enc.encode_ordinary(ex["ctx"])  # 4 tokens; the endings have 1, 6, 1 and 1
    tokens, mask, _ = hellaswag.render_example(ex, enc, block_size=8)
    assert tokens.shape == (4, 8)
    assert tokens[1].tolist() == (ctx + enc.encode_ordinary(" the cat the cat sat dog"))[-8:]
    assert mask[1].tolist() == [0, 0] + [1] * 6
    assert tokens[0].tolist() == ctx + [THE, 0, 0, 0]  # short rows keep their whole context


def test_acc_norm_matches_the_hand_computation(val_path):
    model = Bigram()
    assert hellaswag.evaluate(model, val_path, "cpu") == (0.75, 3, 4)
    for limit in range(1, 5):  # example by example
        assert hellaswag.evaluate(model, val_path, "cpu", limit=limit)[1] == sum(CORRECT[:limit])
    # Contexts longer than block_size are cut, not refused; the endings (up to 6 tokens) and the token before
    # them still fit, so every prediction stays the same.
    assert hellaswag.evaluate(Bigram(block_size=8), val_path, "cpu") == (0.75, 3, 4)
    # One rank's share, without a process group: examples 1 and 3.
    assert hellaswag.evaluate(model, val_path, "cpu", rank=1, world=2) == (0.5, 1, 2)


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m data.hellaswag"):
        hellaswag.evaluate(Bigram(), str(tmp_path / "missing.jsonl"), "cpu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps({"ctx": "x", "endings": ["a"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not a HellaSwag example"):
        hellaswag.evaluate(Bigram(), str(bad), "cpu")


def test_prepare_copies_input_and_names_it_when_offline(val_path, tmp_path, monkeypatch, capsys):
    hellaswag.main(["--input", val_path, "--out_dir", str(tmp_path / "out")])
    with open(val_path) as a, open(tmp_path / "out" / "hellaswag_val.jsonl") as b:
        assert a.read() == b.read()
    assert "wrote 4 examples" in capsys.readouterr().out

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit, match="^error: could not download .*pass --input PATH$"):
        hellaswag.main(["--out_dir", str(tmp_path / "out2")])
    assert not (tmp_path / "out2").exists()  # a failed download leaves no empty folder behind


def test_prepare_refuses_bad_input_in_one_line_leaving_no_folder(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "foreign.jsonl").write_text('{"text": "not hellaswag"}\n')
    for name, message in (("missing.jsonl", "no such file"), ("empty.jsonl", "it holds no examples"),
                          ("foreign.jsonl", "line 1: not a HellaSwag example")):
        with pytest.raises(SystemExit) as e:
            hellaswag.main(["--input", str(tmp_path / name), "--out_dir", str(tmp_path / "out")])
        assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value), name
        assert not (tmp_path / "out").exists(), name


def _rank(rank, world, init_file, path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        result = hellaswag.evaluate(Bigram(), path, "cpu", rank, world)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_ranks_all_reduce_to_the_single_process_totals(val_path, tmp_path):
    ctx = mp.start_processes(_rank, args=(2, str(tmp_path / "init"), val_path, str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 90
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank evaluation did not finish in 90 s")
    single = list(hellaswag.evaluate(Bigram(), val_path, "cpu"))
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            assert json.load(f) == single == [0.75, 3, 4]
