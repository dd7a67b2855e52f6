r"""
The comparison's toplines: no projector, the frozen LLM reads text where the speech would be.

    # the text topline: the reference transcript
    python -m scripts.toplines --read transcript --task asr
    # a cascade: Whisper tiny.en's transcript
    python -m scripts.toplines --read whisper --task qa

    python -m scripts.toplines --read whisper --task asr --asr-model openai/whisper-large-v3 \
        --data test.jsonl

The transcript's own token embeddings take the speech's place in the same chat prompt, and the
answers are generated and scored exactly as evaluate.py does (for --read whisper --task asr,
Whisper's transcript is the answer). Writes out/read-<read>/eval-<task>.json unless --out.
"""

from pathlib import Path

import common
import demokit
from data import load_row_audio, need_transcripts, read_manifest, task_examples
from evaluate import (
    add_decoding_flags,
    decoding_defaults,
    print_results,
    unique_questions,
    write_results,
)
from extras import decoding, demo
from model import SpeechLLM


def get_args(argv=None):
    p = common.parser(__doc__)
    p.add_argument(
        "--read", choices=["transcript", "whisper"], required=True, help="what the LLM reads"
    )
    p.add_argument("--task", choices=["asr", "st", "qa"], required=True, help="the task to score")
    add_decoding_flags(p)
    p.add_argument("--llm", default="smollm2", help=common.LLMS)
    p.add_argument(
        "--encoder", default="whisper-tiny", help="the encoder the model is built with (not run)"
    )
    p.add_argument("--asr-model", default="demo", help="--read whisper: a Whisper folder or hub id")
    p.add_argument("--ckpt", help="ignored (compare.py passes its cell folder)")
    p.add_argument("--out", help="results JSON (default: out/read-<read>/eval-<task>.json)")
    common.add_system_flags(p, training=False)
    args = p.parse_args(argv)
    decoding_defaults(args, "demo")  # the demo recipe's decoding (common.RECIPES)
    return args


def whisper_transcripts(asr_model, examples, batch_size):
    """A Whisper model's own transcript of each example's audio (the cascade's first stage)."""
    from demokit.models import transcribe

    folder = demokit.whisper_tiny_path() if asr_model == "demo" else asr_model
    return transcribe(str(folder), [load_row_audio(ex) for ex in examples], batch_size)


def main(argv=None):
    args = get_args(argv)
    _, _, device = common.setup(args.device, seed=0)
    dtype = common.resolve_dtype(args.dtype, device)
    model = SpeechLLM(args.llm, args.encoder, dtype=dtype, resolve=demo.resolve_model)
    model = model.to(device).eval()
    data = demo.test_manifest(args.data, args.task, args.demo_corpus)
    examples = task_examples(read_manifest(data)[: args.limit], args.task)
    examples = unique_questions(examples) if args.task == "qa" else examples
    if args.read == "transcript":
        heard = [ex["text"] for ex in need_transcripts(examples, "--read transcript")]
    else:
        heard = whisper_transcripts(args.asr_model, examples, args.batch_size)
    examples = [
        {**ex, "heard": h} for ex, h in zip(examples, heard)
    ]  # extras.decoding.generate_answers reads it
    cascade = args.read == "whisper" and args.task == "asr"  # Whisper's transcript is the answer
    result = decoding.score(
        model, args.task, examples, args, device, dtype, hypotheses=heard if cascade else None
    )
    result = {"ckpt": f"read-{args.read}", "data": data, **result}
    print_results(result, args.show)
    write_results(Path(args.out or f"out/read-{args.read}/eval-{args.task}.json"), result)
    return result


if __name__ == "__main__":
    common.run_main(main)
