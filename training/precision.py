"""bf16 parameters with an fp32 master copy (llm.c's scheme), the `bf16_params` setting.

The model that trains is a bf16 copy of the fp32 model: its activations, residual stream, LayerNorms and gradients
are bf16 end to end (no autocast, no per-micro-step casts of the weights), which halves the memory traffic of the
elementwise work. AdamW updates the fp32 master parameters, which the checkpoints hold; after each step the bf16
copy is refreshed from them.

Each micro-step's bf16 gradients are added to fp32 master gradients at once (llm.c sums them in bf16, which costs
precision over 8 micro-steps). They live in one flat buffer, so that with several processes one all-reduce of the
fp32 sum replaces DDP's bf16 one; DDP then never synchronises during backward (`no_sync` on every micro-step).
"""
import copy

import torch
import torch.distributed as dist


class BF16Params:
    def __init__(self, master):
        self.model = copy.deepcopy(master).to(torch.bfloat16)  # deepcopy keeps the tied embedding tied
        self.master = list(master.parameters())
        self.working = list(self.model.parameters())
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.master), device=self.master[0].device)
        self.grads = [g.view_as(p) for g, p in zip(self.flat_grad.split([p.numel() for p in self.master]),
                                                   self.master)]

    @torch.no_grad()
    def add_grads(self, first):
        """Adds the bf16 gradients of the micro-step that just ran to the fp32 sum (the first micro-step of a step
        overwrites it) and frees them, so that the next backward writes fresh ones."""
        working = [w.grad for w in self.working]
        if first:
            torch._foreach_copy_(self.grads, working)
        else:
            torch._foreach_add_(self.grads, working)
        for w in self.working:
            w.grad = None

    @torch.no_grad()
    def grads_to_master(self, world):
        """The summed gradients (averaged over the processes) on the master parameters, for the norm, clipping and
        AdamW."""
        if world > 1:
            dist.all_reduce(self.flat_grad)  # SUM: gloo has no AVG
            self.flat_grad.div_(world)
        for m, g in zip(self.master, self.grads):
            m.grad = g

    @torch.no_grad()
    def master_to_model(self):
        torch._foreach_copy_(self.working, self.master)
