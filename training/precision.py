"""bf16 parameters with an fp32 master copy (llm.c's scheme), the `bf16_params` setting.

The model that trains is a bf16 copy of the fp32 model: its activations, residual stream, LayerNorms and gradients
are bf16 end to end (no autocast, no per-micro-step casts of the weights), which halves the memory traffic of the
elementwise work. AdamW updates the fp32 master parameters, which the checkpoints hold; after each step the bf16
copy is refreshed from them. Gradients accumulate over micro-steps in bf16, as in llm.c.
"""
import copy

import torch


class BF16Params:
    def __init__(self, master):
        self.model = copy.deepcopy(master).to(torch.bfloat16)  # deepcopy keeps the tied embedding tied
        self.master = list(master.parameters())
        self.working = list(self.model.parameters())

    @torch.no_grad()
    def grads_to_master(self):
        """The bf16 gradients, as fp32, on the master parameters (for the norm, clipping and AdamW)."""
        for m, w in zip(self.master, self.working):
            m.grad = None if w.grad is None else w.grad.float()
            w.grad = None

    @torch.no_grad()
    def master_to_model(self):
        torch._foreach_copy_(self.working, self.master)
