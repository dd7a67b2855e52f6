"""
extras/lora.py: low-rank updates of the frozen LLM's attention (Hu et al. 2021), an addition: the
paper trains the projector alone.

    python finetune.py --task asr --lora 8               # LoRA of rank 8 with the projector
    python finetune.py --task asr --lora 8 --freeze-projector   # LoRA alone

add_lora wraps every q/k/v/o projection of the LLM from outside (SpeechLLM knows nothing of it);
the low-rank weights train and are saved beside the projector, in lora.safetensors, never the LLM
itself. meta.json's "additions" records the rank, so evaluate.py rebuilds the same model.
"""

import json
import math

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common import ModelError, UserError, write_atomically

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


def targets(model):
    """(parent module, child name, the nn.Linear) of every attention projection LoRA wraps (the
    Linear inside a wrapper already there)."""
    found = []
    for module in model.llm.modules():
        for name, child in module.named_children():
            base = child.base if isinstance(child, LoRALinear) else child
            if name in TARGETS and isinstance(base, nn.Linear):
                found.append((module, name, base))
    return found


def shapes(model, rank):
    """The LoRA weights' names and shapes at this rank, as lora.safetensors holds them."""
    prefix = {id(module): name for name, module in model.llm.named_modules()}
    out = {}
    for module, name, base in targets(model):
        key = f"{prefix[id(module)]}.{name}".lstrip(".")
        out[f"{key}.lora_a.weight"] = [rank, base.in_features]
        out[f"{key}.lora_b.weight"] = [base.out_features, rank]
    return out


def add_lora(model, rank, alpha=None):
    """Wrap the LLM's attention projections in LoRALinear (once); recorded in model.additions. A
    rank above a projection's smaller side adds parameters (and memory: --lora 1000000 would ask
    for terabytes) without adding anything a full-rank update would not, so it is refused."""
    if model.additions.get("lora"):
        return
    found = targets(model)
    if not found:
        raise UserError(f"--lora: the LLM {model.llm_name} has no {'/'.join(TARGETS)} to adapt")
    limit = min(min(base.in_features, base.out_features) for _, _, base in found)
    if rank > limit:
        raise UserError(
            f"--lora {rank}: the LLM's attention projections have {limit} dimensions on their "
            f"smaller side, so a rank above {limit} adds nothing but memory: use --lora {limit} or "
            "less (the demo: 8)"
        )
    alpha = alpha or 2 * rank
    for module, name, base in found:
        setattr(module, name, LoRALinear(base, rank, alpha))
    model.additions["lora"] = {"rank": rank, "alpha": alpha}


def save(model, folder):
    """The LoRA weights beside the projector: a few MB, never the LLM itself."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.llm.named_parameters()
             if ".lora_" in k}  # fmt: skip
    write_atomically(folder / FILE, lambda tmp: save_file(state, tmp))


def restore(model, spec, folder):
    """A checkpoint's LoRA (model.load_projector, through extras.restore): meta.json's "lora" and
    lora.safetensors are checked against each other and against the LLM before any LoRA weight is
    allocated, then LoRA is added and its weights loaded."""
    rank, alpha = checked_spec(spec, folder)
    if model.additions.get("lora", spec) != spec:  # --resume into a model that has its own
        raise ModelError(
            f"{folder}: LoRA {spec} there, {model.additions['lora']} in this model: resume with "
            "the run's own --lora and --lora-alpha"
        )
    path, wanted = folder / FILE, shapes(model, rank)
    saved = file_shapes(path)
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            raise ModelError(
                f"{path} does not match {folder / 'meta.json'} (LoRA of rank {rank}) and this LLM: "
                f"{key} is {saved.get(key, 'missing')} there, {wanted.get(key, 'not one')} here. "
                "The files come from two runs: put back the run's own lora.safetensors and meta.json"
            )
    add_lora(model, rank, alpha)
    load(model, folder)


def checked_spec(spec, folder):
    """meta.json's "lora": {"rank": an integer >= 1, "alpha": a number > 0}, as (rank, alpha)."""
    ok = isinstance(spec, dict) and set(spec) <= {"rank", "alpha"}
    rank = spec.get("rank") if ok else None
    ok = ok and isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1
    alpha = spec.get("alpha", 2 * rank) if ok else None
    ok = ok and isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not (ok and math.isfinite(alpha) and alpha > 0):
        raise ModelError(
            f'{folder / "meta.json"}: "additions" holds "lora": {json.dumps(spec)}, not '
            '{"rank": an integer >= 1, "alpha": a number > 0}: put back the run\'s own meta.json'
        )
    return rank, alpha


def file_shapes(path):
    """The names and shapes in lora.safetensors (its header), or one line on what is wrong."""
    if not path.exists():
        raise ModelError(
            f"{path.parent} was trained with LoRA but has no {FILE}: copy it back from one of "
            f"the run's checkpoints (ckpt-*/{FILE}), or fine-tune again"
        )
    try:
        with safe_open(str(path), "pt") as f:
            return {key: f.get_slice(key).get_shape() for key in f.keys()}
    except Exception as e:  # safetensors' errors for random bytes or a cut file
        raise ModelError(damaged(path, e)) from None


def damaged(path, e):
    why = " ".join(str(e).split())[:200]
    return (
        f"{path} is damaged ({type(e).__name__}: {why}): copy it back from one of the run's "
        f"checkpoints (ckpt-*/{FILE}), or fine-tune again"
    )


def load(model, folder):
    """lora.safetensors into the wrapped LLM (restore has checked its names and shapes)."""
    path = folder / FILE
    try:
        state = load_file(path)
    except Exception as e:  # a file damaged past its header
        raise ModelError(damaged(path, e)) from None
    model.llm.load_state_dict(state, strict=False)  # the LoRA weights only: the LLM stays frozen
