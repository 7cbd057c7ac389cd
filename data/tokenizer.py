"""GPT-2's BPE through tiktoken, offline too, with an error that says what to do when its files cannot be had.

tiktoken downloads two files on first use and caches them (in TIKTOKEN_CACHE_DIR if set). Without internet, either
put tiktoken's cached files in a folder and set TIKTOKEN_CACHE_DIR to it, or set GPT2_BPE_DIR to a folder holding
OpenAI's original `vocab.bpe` and `encoder.json` (from openaipublic.blob.core.windows.net/gpt-2/encodings/main/,
or any copy of GPT-2's release): the encoding is then built from those two files, checked against their known hashes.
"""
import os

# sha256 of OpenAI's files, as tiktoken checks them: a different file is refused rather than used.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
HOW = ("Without internet, set TIKTOKEN_CACHE_DIR to a folder of tiktoken's cached files, or GPT2_BPE_DIR to a folder "
       "holding OpenAI's vocab.bpe and encoder.json (see README); training on already prepared tokens needs neither.")


def gpt2_encoding():
    import tiktoken

    if os.environ.get("GPT2_BPE_DIR"):
        return encoding_from_files(os.environ["GPT2_BPE_DIR"])
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises whatever its HTTP client raised
        raise RuntimeError(f"could not load the GPT-2 BPE files, which tiktoken downloads on first use "
                           f"({type(e).__name__}). {HOW}") from e


def encoding_from_files(folder):
    """The GPT-2 encoding built from OpenAI's original vocab.bpe and encoder.json in folder."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab, encoder = os.path.join(folder, "vocab.bpe"), os.path.join(folder, "encoder.json")
    missing = [p for p in (vocab, encoder) if not os.path.isfile(p)]
    if missing:
        raise RuntimeError(f"GPT2_BPE_DIR={folder!r}: {', '.join(missing)} not found. {HOW}")
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab, encoder_json_file=encoder,
                                                vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    except ValueError as e:  # a hash mismatch: not GPT-2's files
        raise RuntimeError(f"GPT2_BPE_DIR={folder!r}: {e}") from None
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def gpt2_encoding_or_exit():
    """For the preparation commands: the encoding, or an exit with the message above instead of a traceback."""
    try:
        return gpt2_encoding()
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
