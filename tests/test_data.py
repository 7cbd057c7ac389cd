import os

import numpy as np
import pytest
import torch

from data import tinyshakespeare
from data.loader import ShardLoader
from data.shards import HEADER_INTS, MAGIC, read_header, read_shard, write_shard


def make_shard(tmp_path, n, name="x_train_000000.bin"):
    tokens = np.arange(n, dtype=np.uint16)  # token i is i: positions are readable in the batches
    write_shard(tmp_path / name, tokens)
    return tokens


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000).astype(np.uint16)
    write_shard(tmp_path / "a_train_000000.bin", tokens)
    assert np.array_equal(read_shard(tmp_path / "a_train_000000.bin"), tokens)
    assert not os.path.exists(tmp_path / "a_train_000000.bin.tmp")


def test_header_records_the_largest_token_id(tmp_path):
    write_shard(tmp_path / "a_train_000000.bin", [5, 50256, 17, 0])
    write_shard(tmp_path / "a_val_000000.bin", np.zeros(0, dtype=np.uint16))
    assert read_header(tmp_path / "a_train_000000.bin") == (4, 50256)
    assert read_header(tmp_path / "a_val_000000.bin") == (0, -1)


def write_version_1_shard(path, tokens):
    """The format before the largest token id was recorded: magic, version 1, token count, zeros, uint16 tokens."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, 1, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())


def test_version_1_shards_still_load_with_a_scan(tmp_path, capsys):
    write_version_1_shard(tmp_path / "x_train_000000.bin", np.arange(40))
    write_shard(tmp_path / "x_train_000001.bin", np.arange(40, 80))
    assert read_header(tmp_path / "x_train_000000.bin") == (40, None)
    assert read_shard(tmp_path / "x_train_000000.bin").tolist() == list(range(40))
    x, y = ShardLoader(tmp_path, "train", 1, 50, vocab_size=80).next_batch()
    assert x[0].tolist() == list(range(50)) and y[0].tolist() == list(range(1, 51))
    assert "reading every token of 1 version-1 shard(s)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"x_train_000000.bin: token id 39 >= vocab_size 39"):  # the scan found 39
        ShardLoader(tmp_path, "train", 1, 50, vocab_size=39)


def test_loader_checks_the_header_not_the_tokens(tmp_path, capsys):
    """The vocab check reads the header's largest id: one that says too large is refused, naming the file, although
    every token is in range; and no shard is scanned or announced."""
    write_shard(tmp_path / "x_train_000000.bin", np.arange(40))
    write_shard(tmp_path / "x_train_000001.bin", np.arange(40))
    path = tmp_path / "x_train_000001.bin"
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    header[3] = 60000
    with open(path, "r+b") as f:
        f.write(header.tobytes())
    with pytest.raises(ValueError, match=r"x_train_000001.bin: token id 60000 >= vocab_size 50257"):
        ShardLoader(tmp_path, "train", 1, 8, vocab_size=50257)
    assert capsys.readouterr().err == ""


def test_truncated_and_foreign_shards_are_refused(tmp_path):
    make_shard(tmp_path, 100)
    path = tmp_path / "x_train_000000.bin"
    with open(path, "r+b") as f:
        f.truncate(4 * HEADER_INTS + 2 * 50)
    with pytest.raises(ValueError, match="truncated"):
        read_shard(path)
    (tmp_path / "y.bin").write_bytes(b"hello world" * 200)
    with pytest.raises(ValueError, match="not a token shard"):
        read_shard(tmp_path / "y.bin")


def test_loader_order_and_wrap_around(tmp_path):
    make_shard(tmp_path, 50)
    B, T = 2, 4  # 8 tokens a step; windows of 9; the last full window starts at 40 (needs tokens 40..48)
    loader = ShardLoader(tmp_path, "train", B, T)
    starts = []
    for _ in range(7):
        x, y = loader.next_batch()
        starts.append(int(x[0, 0]))
        expected = np.arange(starts[-1], starts[-1] + B * T + 1)
        assert x.tolist() == expected[:-1].reshape(B, T).tolist()
        assert y.tolist() == expected[1:].reshape(B, T).tolist()
    assert starts == [0, 8, 16, 24, 32, 40, 0]


def test_loader_rank_offsets(tmp_path):
    make_shard(tmp_path, 60)
    B, T, world = 1, 5, 3  # rank r reads at pos + 5r; pos advances by 15 and returns to 0 when 15+1 more do not fit
    seen = {}
    for rank in range(world):
        loader = ShardLoader(tmp_path, "train", B, T, rank=rank, world=world)
        seen[rank] = [int(loader.next_batch()[0][0, 0]) for _ in range(5)]
    # pos = 0, 15, 30, then 45 + 16 > 60: back to 0. All ranks wrap together.
    assert seen == {0: [0, 15, 30, 0, 15], 1: [5, 20, 35, 5, 20], 2: [10, 25, 40, 10, 25]}


def test_ranks_read_the_rows_of_one_process_with_world_times_the_batch(tmp_path):
    make_shard(tmp_path, 500)
    single = ShardLoader(tmp_path, "train", 6, 4)
    ranks = [ShardLoader(tmp_path, "train", 2, 4, rank=r, world=3) for r in range(3)]
    for _ in range(25):  # several wrap-arounds
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_any_split_into_processes_and_micro_steps_reads_the_same_rows(tmp_path):
    make_shard(tmp_path, 700)  # 5 steps of 128 tokens fit (640 + 1), then the stream wraps: for every split alike
    def rows(world, accum):
        loaders = [ShardLoader(tmp_path, "train", 8 // (world * accum), 16, r, world, accum=accum) for r in range(world)]
        out = []
        for _ in range(12 * accum):  # 12 optimizer steps
            out += [x for loader in loaders for x in loader.next_batch()[0]]
        return sorted(map(tuple, torch.stack(out).tolist()))  # the multiset of rows read
    assert rows(1, 1) == rows(2, 1) == rows(1, 2) == rows(2, 4) == rows(8, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_loader_yields_the_documented_stream_on_a_device(tmp_path, device):
    """Batches, moved to the device (pinned and non-blocking on CUDA), against an independent transcription of the
    loader's rule: ranks' windows at pos + r·B·T, pos advancing by world·B·T, back to 0 between optimizer steps when
    the next step does not fit; shards of uneven lengths, several wrap-arounds, and a resume from state_dict."""
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 50257, n) for n in (37, 5, 90, 61)]
    for i, tokens in enumerate(shards):
        write_shard(tmp_path / f"r_train_{i:06d}.bin", tokens)
    stream = np.concatenate(shards)
    B, T, world, accum = 2, 3, 2, 2  # 24 tokens a step: 8 steps fit in the 193 tokens, then the stream wraps
    expected, pos = [], 0
    for step in range(20):
        for micro in range(accum):
            expected.append([stream[pos + r * B * T:pos + (r + 1) * B * T + 1] for r in range(world)])
            pos += world * B * T
        if pos + accum * world * B * T + 1 > len(stream):
            pos = 0
    for rank in range(world):
        loader = ShardLoader(tmp_path, "train", B, T, rank, world, vocab_size=50257, accum=accum)
        got = []
        for i in range(len(expected)):
            if i == 9 * accum:  # a checkpoint between optimizer steps, resumed by a new loader
                state = loader.state_dict()
                loader = ShardLoader(tmp_path, "train", B, T, rank, world, vocab_size=50257, accum=accum)
                loader.load_state_dict(state)
            got.append(loader.next_batch(device))
        for (x, y), windows in zip(got, expected):
            assert x.device.type == y.device.type == device and x.dtype == y.dtype == torch.int64
            assert x.cpu().tolist() == windows[rank][:-1].reshape(B, T).tolist()
            assert y.cpu().tolist() == windows[rank][1:].reshape(B, T).tolist()


def test_loader_cycles_through_shards(tmp_path):
    write_shard(tmp_path / "x_train_000000.bin", np.arange(0, 20, dtype=np.uint16))
    write_shard(tmp_path / "x_train_000001.bin", np.arange(100, 120, dtype=np.uint16))
    loader = ShardLoader(tmp_path, "train", 1, 8)
    # stream: 0..19, 100..119 (40 tokens). Windows of 9 at 0, 8, 16, 24; 32 + 9 > 40, so back to 0.
    windows = [loader.next_batch() for _ in range(5)]
    assert windows[2][0][0].tolist() == [16, 17, 18, 19, 100, 101, 102, 103]  # across the boundary, nothing dropped
    assert windows[2][1][0].tolist() == [17, 18, 19, 100, 101, 102, 103, 104]
    assert [int(x[0, 0]) for x, _ in windows] == [0, 8, 16, 104, 0]


def test_loader_state_resumes_exactly(tmp_path):
    write_shard(tmp_path / "x_train_000000.bin", np.arange(0, 37, dtype=np.uint16))
    write_shard(tmp_path / "x_train_000001.bin", np.arange(100, 151, dtype=np.uint16))
    straight = ShardLoader(tmp_path, "train", 2, 3)
    expected = [straight.next_batch()[0] for _ in range(30)]
    first = ShardLoader(tmp_path, "train", 2, 3)
    got = [first.next_batch()[0] for _ in range(13)]
    resumed = ShardLoader(tmp_path, "train", 2, 3)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_batch()[0] for _ in range(17)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    write_shard(tmp_path / "x_train_000002.bin", np.arange(5, dtype=np.uint16))
    with pytest.raises(ValueError, match="the data changed"):
        ShardLoader(tmp_path, "train", 2, 3).load_state_dict(first.state_dict())


def test_loader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardLoader(tmp_path / "missing", "train", 1, 4)
    with pytest.raises(FileNotFoundError, match="no 'train' shards"):
        ShardLoader(tmp_path, "train", 1, 4)
    make_shard(tmp_path, 8)
    with pytest.raises(ValueError, match=r"x_train_000000.bin: 8 'train' tokens, fewer than one step needs .* = 9\)"):
        ShardLoader(tmp_path, "train", 2, 4)
    with pytest.raises(ValueError, match=r"fewer than one step needs .* = 17\)"):
        ShardLoader(tmp_path, "train", 1, 4, accum=4)
    write_shard(tmp_path / "x_val_000000.bin", np.zeros(0, dtype=np.uint16))
    with pytest.raises(ValueError, match="x_val_000000.bin: empty shard"):
        ShardLoader(tmp_path, "val", 1, 4)
    with pytest.raises(ValueError, match="token id 7 >= vocab_size 5"):
        ShardLoader(tmp_path, "train", 1, 4, vocab_size=5)


def test_prepare_tinyshakespeare_from_local_text(tmp_path):
    import tiktoken

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    (tmp_path / "input.txt").write_text(text)
    tinyshakespeare.main(["--input", str(tmp_path / "input.txt"), "--out_dir", str(tmp_path / "out")])
    expected = tiktoken.get_encoding("gpt2").encode(text)
    assert read_shard(tmp_path / "out" / "tinyshakespeare_train_000000.bin").tolist() == expected
    assert read_shard(tmp_path / "out" / "tinyshakespeare_val_000000.bin").tolist() == expected[len(expected) * 9 // 10:]
    tinyshakespeare.main(["--input", str(tmp_path / "input.txt"), "--out_dir", str(tmp_path / "x3"), "--repeat", "3"])
    assert read_shard(tmp_path / "x3" / "tinyshakespeare_train_000000.bin").tolist() == expected * 3


@pytest.mark.parametrize("case, argv, message", [
    ("missing file", ["--input", "{tmp}/nope.txt"], "error: --input {tmp}/nope.txt: no such file"),
    ("not UTF-8", ["--input", "{tmp}/latin1.txt"], "error: --input {tmp}/latin1.txt is not UTF-8 text (byte 0xe9"),
    ("empty file", ["--input", "{tmp}/empty.txt"], "error: --input {tmp}/empty.txt is empty"),
    ("repeat 0", ["--input", "{tmp}/good.txt", "--repeat", "0"], "error: --repeat must be at least 1"),
    ("repeat -1", ["--input", "{tmp}/good.txt", "--repeat", "-1"], "error: --repeat must be at least 1"),
])
def test_prepare_refuses_bad_input_in_one_line_writing_nothing(tmp_path, case, argv, message):
    (tmp_path / "latin1.txt").write_bytes("ROMEO: café\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "good.txt").write_text("ROMEO: hello\n")
    with pytest.raises(SystemExit) as e:
        tinyshakespeare.main([a.format(tmp=tmp_path) for a in argv] + ["--out_dir", str(tmp_path / "out")])
    assert str(e.value).startswith(message.format(tmp=tmp_path)) and "\n" not in str(e.value), case
    assert not (tmp_path / "out").exists()


def test_prepare_without_bpe_files_names_the_fix(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    (tmp_path / "input.txt").write_text("hello")
    with pytest.raises(SystemExit, match="TIKTOKEN_CACHE_DIR"):
        tinyshakespeare.main(["--input", str(tmp_path / "input.txt"), "--out_dir", str(tmp_path / "out")])


def test_gpt2_encoding_from_openais_original_files(monkeypatch):
    """GPT2_BPE_DIR: the encoding built from vocab.bpe + encoder.json encodes exactly as tiktoken's own gpt2."""
    import tiktoken
    from conftest import gpt2_or_skip
    from data.tokenizer import gpt2_encoding
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "gpt2_bpe")
    if not os.path.isdir(folder):
        pytest.skip(f"needs OpenAI's vocab.bpe and encoder.json in {folder} (../shared/gpt2_bpe beside the repo)")
    reference = gpt2_or_skip()  # tiktoken's own, from its cache
    monkeypatch.setenv("GPT2_BPE_DIR", folder)
    ours = gpt2_encoding()
    text = "Hello, I'm a language model, é ✓ 日本語 <|endoftext|> don't   spaces\n\nnew lines 1234567"
    assert ours.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text) and ours.n_vocab == reference.n_vocab == 50257
    assert isinstance(ours, tiktoken.Encoding)
    monkeypatch.setenv("GPT2_BPE_DIR", str(os.path.dirname(folder)))  # a folder without the files: one clear line
    with pytest.raises(RuntimeError, match="vocab.bpe, .*encoder.json not found"):
        gpt2_encoding()


def test_missing_data_names_the_command_that_prepares_it(tmp_path):
    from data.shards import find_shards
    with pytest.raises(FileNotFoundError, match=r"'data/fineweb_edu' does not exist; prepare it with `python -m data.fineweb`"):
        find_shards("data/fineweb_edu", "train")
    with pytest.raises(FileNotFoundError, match=r"prepare it with `python -m data.tinyshakespeare`"):
        find_shards(str(tmp_path / "x" / "tinyshakespeare"), "train")
    with pytest.raises(FileNotFoundError, match=rf"no 'val' shards .* in '{tmp_path}'; prepare a corpus there "
                                                rf"\(`python -m data.tinyshakespeare --out_dir {tmp_path}`"):
        find_shards(str(tmp_path), "val")
