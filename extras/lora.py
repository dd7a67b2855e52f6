"""
extras/lora.py: low-rank updates of the frozen LLM's attention (Hu et al. 2021), an addition: the
paper trains the projector alone.

    python finetune.py --task asr --lora 8               # LoRA of rank 8 with the projector
    python finetune.py --task asr --lora 8 --freeze-projector   # LoRA alone

add_lora wraps every q/k/v/o projection of the LLM from outside (SpeechLLM knows nothing of it);
the low-rank weights train and are saved beside the projector, in lora.safetensors, never the LLM
itself. meta.json's "additions" records the rank, so evaluate.py rebuilds the same model.
"""

import torch.nn as nn
from safetensors.torch import load_file, save_file

from common import ModelError, write_atomically

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama-style attention (SmolLM2, Llama)
FILE = "lora.safetensors"


class LoRALinear(nn.Module):
    """A frozen nn.Linear W plus a trainable low-rank update: W x + (alpha / r) B A x, with A random
    and B zero, so the wrapped LLM starts exactly as the frozen one."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.zeros_(self.lora_b.weight)  # the update starts at zero

    def forward(self, x):
        # the update in float32: it is small next to the frozen output, and bf16 would round it away
        return self.base(x) + (self.lora_b(self.lora_a(x.float())) * self.scale).to(x.dtype)


def add_lora(model, rank, alpha=None):
    """Wrap the LLM's attention projections in LoRALinear (once); recorded in model.additions."""
    if model.additions.get("lora"):
        return
    alpha = alpha or 2 * rank
    for module in list(model.llm.modules()):
        for name, child in list(module.named_children()):
            if name in TARGETS and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    model.additions["lora"] = {"rank": rank, "alpha": alpha}


def save(model, folder):
    """The LoRA weights beside the projector: a few MB, never the LLM itself."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.llm.named_parameters()
             if ".lora_" in k}  # fmt: skip
    write_atomically(folder / FILE, lambda tmp: save_file(state, tmp))


def load(model, folder):
    path = folder / FILE
    if not path.exists():
        raise ModelError(f"{folder} was trained with LoRA but has no {FILE}")
    model.llm.load_state_dict(load_file(path), strict=False)
