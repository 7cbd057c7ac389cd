"""GPT-2's BPE through tiktoken, with an error that says what to do when its files cannot be fetched."""


def gpt2_encoding():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises whatever its HTTP client raised
        raise RuntimeError(
            f"could not load the GPT-2 BPE files, which tiktoken downloads on first use ({type(e).__name__}). "
            "Without internet, put them in a directory and set TIKTOKEN_CACHE_DIR to it (see README); "
            "training on already prepared tokens needs neither."
        ) from e


def gpt2_encoding_or_exit():
    """For the preparation commands: the encoding, or an exit with the message above instead of a traceback."""
    try:
        return gpt2_encoding()
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
