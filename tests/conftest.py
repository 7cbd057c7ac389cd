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
