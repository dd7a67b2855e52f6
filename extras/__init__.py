"""
extras/: what this project adds beside the paper, one concept per file. The root (model.py,
contrastive.py, data.py, pretrain.py, finetune.py, evaluate.py) implements the paper; this package
imports the root, and the root reaches it only at lines marked `# extras: <file>`, each under an
`if` on a flag or on what a checkpoint says. A run with the paper's recipe never imports it
(tests/test_layout.py blocks it and runs the paper's path).

    ctc.py       the token-level alignment: CTC over the LLM's embedding table, the readout,
                 compression (pretrain.py --loss contrastive+ctc, finetune.py --compress)
    joint.py     joint CTC / LLM decoding of ASR (evaluate.py --joint-ctc)
    lora.py      low-rank updates of the LLM's attention (finetune.py --lora)
    decoding.py  evaluate.py's decoding beyond the paper's: length caps that follow the audio, the
                 loop guard, --seen-in, and the route to joint decoding and the readout
    demo.py      the offline demo (demokit/) as the scripts see it: models by name, --data demo

This file holds what model.py calls when it saves or loads a checkpoint (save, restore): the
additions a model carries are listed in model.additions and in meta.json's "additions".
"""


def save(model, folder):
    """model.save_projector: what the additions trained besides the projector (LoRA's weights)."""
    if model.additions.get("lora"):
        from extras import lora

        lora.save(model, folder)


def restore(model, meta, folder, state):
    """model.load_projector: rebuild what a checkpoint's additions changed before its tensors load:
    the CTC blank on the projector, LoRA on the LLM (and its weights), compression. Checkpoints
    written before extras/ existed keep these as meta.json's top-level keys."""
    additions = dict(meta.get("additions") or legacy_additions(meta))
    if "blank" in state:
        from extras.ctc import add_blank

        add_blank(model, trains=False)
    if "lora" in additions:  # checked against lora.safetensors before it is added
        from extras import lora

        lora.restore(model, additions["lora"], folder)
    for key, value in additions.items():
        model.additions.setdefault(key, value)


def legacy_additions(meta):
    additions = {}
    if meta.get("ctc_aligned"):
        additions["ctc"] = {"temperature": meta.get("args", {}).get("ctc_temperature", 0.05)}
    if meta.get("compress"):
        additions["compress"] = True
    if meta.get("lora"):
        additions["lora"] = meta["lora"]
    return additions
