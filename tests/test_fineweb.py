"""data/fineweb.py on small local files: the token stream, its shards, resuming, and bad input."""
import glob
import json
import os
import shutil
import sys

import numpy as np
import pytest
import tiktoken

from data import fineweb
from data.shards import read_shard

SHARD_SIZE = 97  # tokens: the documents below fill about a dozen shards, most documents crossing a boundary
# Documents of many lengths, with text that must stay text: non-ASCII, and a literal "<|endoftext|>" that
# encode_ordinary must not turn into the special token.
DOCS = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * (i % 7) + "é ✓ 日本 <|endoftext|>"
        for i in range(40)] + ["", "last"]


def expected_stream(docs):
    enc = tiktoken.get_encoding("gpt2")
    return [t for doc in docs for t in [enc.eot_token] + enc.encode_ordinary(doc)]


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
    return str(path)


def prepare(inputs, out_dir):
    fineweb.main(["--input", *inputs, "--out_dir", str(out_dir), "--shard_size", str(SHARD_SIZE), "--workers", "2"])


def shard_files(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, "*.bin")), key=lambda p: p[-10:])  # by index


def file_bytes(out_dir):
    return {os.path.basename(p): open(p, "rb").read() for p in shard_files(out_dir)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One uninterrupted run over DOCS: the reference the other tests compare with."""
    tmp = tmp_path_factory.mktemp("fineweb")
    path = write_jsonl(tmp / "docs.jsonl", DOCS)
    prepare([path], tmp / "out")
    return path, tmp / "out"


def test_shards_hold_the_token_stream_in_order(prepared):
    _, out_dir = prepared
    paths = shard_files(out_dir)
    stream = expected_stream(DOCS)
    assert len(paths) == -(-len(stream) // SHARD_SIZE) > 3
    names = [os.path.basename(p) for p in paths]
    assert names[0] == "fineweb_edu_val_000000.bin"
    assert names[1:] == [f"fineweb_edu_train_{i:06d}.bin" for i in range(1, len(paths))]
    shards = [read_shard(p) for p in paths]
    assert all(len(s) == SHARD_SIZE for s in shards[:-1]) and 0 < len(shards[-1]) <= SHARD_SIZE
    assert np.concatenate(shards).tolist() == stream
    assert not glob.glob(os.path.join(out_dir, "*.tmp"))


def test_a_complete_directory_is_left_alone(prepared, capsys):
    path, out_dir = prepared
    before = {p: os.stat(p).st_mtime_ns for p in shard_files(out_dir)}
    prepare([path], out_dir)
    assert {p: os.stat(p).st_mtime_ns for p in shard_files(out_dir)} == before
    assert "is complete" in capsys.readouterr().out


def test_parquet_and_jsonl_inputs_in_order(tmp_path):
    import pyarrow.parquet as pq  # in requirements-dev.txt
    import pyarrow as pa

    pq.write_table(pa.table({"text": DOCS[:25], "url": ["u"] * 25}), tmp_path / "a.parquet", row_group_size=10)
    rest = write_jsonl(tmp_path / "b.jsonl", DOCS[25:])
    prepare([str(tmp_path / "a.parquet"), rest], tmp_path / "out")
    assert np.concatenate([read_shard(p) for p in shard_files(tmp_path / "out")]).tolist() == expected_stream(DOCS)


class Crash(Exception):
    pass


def test_interrupted_run_resumes_to_identical_files(prepared, tmp_path, monkeypatch):
    path, reference = prepared
    out_dir = tmp_path / "out"
    # The worst moment to stop: shard 3 is on disk but not yet in progress.json, and shard 4 is half written.
    save_progress, calls = fineweb.save_progress, []

    def crash_on_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            with open(fineweb.shard_path(out_dir, 4) + ".tmp", "wb") as f:
                f.write(b"half a shard")
            raise Crash
        save_progress(*args)

    monkeypatch.setattr(fineweb, "save_progress", crash_on_fourth)
    with pytest.raises(Crash):
        prepare([path], out_dir)
    assert len(shard_files(out_dir)) == 4  # shards 0-3
    monkeypatch.undo()
    prepare([path], out_dir)
    assert file_bytes(out_dir) == file_bytes(reference)
    assert not glob.glob(os.path.join(out_dir, "*.tmp"))


def test_missing_or_damaged_shards_are_prepared_again(prepared, tmp_path):
    path, reference = prepared
    out_dir = tmp_path / "out"
    shutil.copytree(reference, out_dir)
    paths = shard_files(out_dir)
    os.remove(paths[-1])
    with open(paths[-3], "r+b") as f:  # progress.json lists it complete, but it lost its end
        f.truncate(os.path.getsize(paths[-3]) - 2)
    with open(paths[-2] + ".tmp", "wb") as f:
        f.write(b"stale")
    prepare([path], out_dir)
    assert file_bytes(out_dir) == file_bytes(reference)
    assert not glob.glob(os.path.join(out_dir, "*.tmp"))


def test_a_different_shard_size_is_refused(prepared):
    path, out_dir = prepared
    with pytest.raises(SystemExit, match="shard_size 97.*another --out_dir"):
        fineweb.main(["--input", path, "--out_dir", str(out_dir), "--shard_size", "50"])


def test_records_without_text_name_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", DOCS[:2])
    with open(path, "a") as f:
        f.write(json.dumps({"content": "no text field"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: the record has no 'text'"):
        prepare([path], tmp_path / "out")


def test_parquet_without_text_names_the_file_and_row(tmp_path):
    import pyarrow.parquet as pq  # in requirements-dev.txt
    import pyarrow as pa

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "nocol.parquet")
    with pytest.raises(SystemExit, match=r"nocol\.parquet: no 'text' column \(columns: content\)"):
        prepare([str(tmp_path / "nocol.parquet")], tmp_path / "out")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "null.parquet")
    with pytest.raises(ValueError, match=r"null\.parquet, row 1: 'text' is None"):
        prepare([str(tmp_path / "null.parquet")], tmp_path / "out")


def test_unusable_inputs_are_refused_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no such file"):
        prepare([str(tmp_path / "missing.jsonl")], tmp_path / "out")
    (tmp_path / "docs.txt").write_text("text")
    with pytest.raises(SystemExit, match=r"expected a \.jsonl file .* or a \.parquet file"):
        prepare([str(tmp_path / "docs.txt")], tmp_path / "out")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(SystemExit, match="pip install datasets.*--input"):
        fineweb.main(["--out_dir", str(tmp_path / "out")])
