import os
import sys

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable must be set before triton is
# first imported, hence here and not in a fixture.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# WANDB is never contacted by the tests.
os.environ.setdefault("WANDB_MODE", "disabled")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gpt2_or_skip():
    """GPT-2's BPE encoding, or a skip that names what the test needs (CI provides the files through
    TIKTOKEN_CACHE_DIR, so nothing is skipped there)."""
    import pytest
    from data.tokenizer import gpt2_encoding
    try:
        return gpt2_encoding()
    except RuntimeError as e:
        pytest.skip(f"needs GPT-2's BPE files: {e}", allow_module_level=True)
