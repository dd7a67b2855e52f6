"""
extras/finetuning.py: what finetune.py builds for the additions (one line there, marked
`# extras: ctc and lora`): the CTC blank kept training (--ctc-weight), compressed speech
(--compress), LoRA on the LLM (--lora), a frozen projector (--freeze-projector).

    python finetune.py --task asr --frac 0.1 --compress --lora 8 --ctc-weight 1
"""

from common import UserError


def build(model, args, world=1):
    """Apply the additions' flags to a freshly built (or --init loaded) SpeechLLM, in this order:
    the blank, compression, LoRA, then freeze the projector."""
    from extras import ctc, lora

    if args.lora and world > 1:
        raise UserError("--lora trains weights inside the LLM, which DDP here does not synchronise")
    if args.compress or args.ctc_weight:
        ctc.add_blank(model, trains=bool(args.ctc_weight))
    if args.ctc_weight or "ctc" in model.additions:  # the temperature joint decoding reads
        model.additions["ctc"] = {"temperature": args.ctc_temperature}
    if args.compress:
        model.additions["compress"] = True
    if args.lora:
        lora.add_lora(model, args.lora, args.lora_alpha)
    if args.freeze_projector:  # LoRA alone learns: the LLM learns to read the stage-1 projector
        model.projector.requires_grad_(False)
