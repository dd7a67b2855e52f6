"""A dress rehearsal of the README's GPU section on CPU: its commands, run as written, from the
converters to the scores, with tiny random models of the paper's architectures (a Llama, a HuBERT) in
place of Llama-3.1-8B and HuBERT-large, and bf16 forced as on CUDA. What changes in each line, and
only that: the models (--llm, --encoder), the paths (tmp folders for /data, data/paper and runs/),
--device cpu --dtype bfloat16, the sizes (steps, batch, the projector's width, the QA dev passages),
and --comet dropped (its model comes from the hub). A pretraining run is killed after a checkpoint
and resumed with the README's `--resume`. Each step must print the protocol of the authors' recipe.

    python -m pytest -q -m slow -k rehearsal
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_prepare_data import fake_mustc, mustc_root, squad_root, tone  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SIZES = {
    "pretrain.py": "--max-steps 2 --batch-size 2 --grad-accum 1 --eval-every 1 --qformer-dim 32"
    " --qformer-heads 4 --qformer-layers 2",
    "finetune.py": "--max-steps 2 --batch-size 1 --grad-accum 1",
    "evaluate.py": "--batch-size 2",
    "mix": "--qa-dev-passages 1",
}


def readme_gpu_commands():
    """The python lines of the README's GPU block, continuation lines joined."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## The paper's setup on a GPU") :]
    block = section[
        section.index("```bash") + 7 : section.index("```", section.index("```bash") + 7)
    ]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.startswith("python")]


def rehearse(line, paths, mustc, squad, tmp):
    """One README line as the rehearsal runs it (see the module's docstring)."""
    line = line.replace("/data/MUST-C", str(mustc)).replace("/data/Spoken-SQuAD", str(squad))
    line = line.replace("data/paper", str(tmp / "data" / "paper")).replace("runs/", f"{tmp}/runs/")
    line = re.sub(r" --comet \S+", "", line)
    words = shlex.split(line)
    if words[1] == "-m":
        return [sys.executable, *words[1:], *shlex.split(SIZES.get(words[3], ""))]
    script = words[1]
    words = [sys.executable, *words[1:]]
    if "--llm" in words:
        words[words.index("--llm") + 1] = paths["llm"]
        words += ["--encoder", paths["hubert"]]
    return words + ["--device", "cpu", "--dtype", "bfloat16", *shlex.split(SIZES[script])]


def run(words, **kwargs):
    result = subprocess.run(words, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, (
        " ".join(words) + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
    )
    return result.stdout + result.stderr


def test_rehearsal_of_the_readme_gpu_section(paths, mustc_root, squad_root, tmp_path):  # noqa: F811
    # the authors' tests are tst-COMMON + tst-HE: give en-de a tst-HE too
    talk = tone(2, 440)
    fake_mustc(mustc_root, "de", "tst-HE", [("ted_9", 0.0, 2.0, "He said.", "Er sagte.")],
               {"ted_9": talk})  # fmt: skip
    lines = readme_gpu_commands()
    assert [w.split()[1] for w in lines] == ["-m"] * 3 + ["pretrain.py"] + ["finetune.py"] * 2 + [
        "evaluate.py"
    ] * 3
    outputs = {}
    for line in lines:
        words = rehearse(line, paths, mustc_root, squad_root, tmp_path)
        if words[1] == "pretrain.py":
            outputs[line] = kill_and_resume(words, tmp_path / "runs" / "contr-cos-all")
        else:
            outputs[line] = run(words)
    data = tmp_path / "data" / "paper"
    assert "He said." in (data / "sentences_test.jsonl").read_text()  # tst-HE joined the test
    stage1, mix, qa, *scores = (outputs[line] for line in lines[3:])
    for printed in (stage1, mix, qa):  # every step says it runs the paper's recipe
        assert "recipe paper" in printed
    assert "grad_checkpoint=True" in stage1 and "cache_features=False" in stage1
    assert "0 dev" in mix and "final dev loss" in qa  # the mix line names no dev data
    authors = (
        "protocol: the paper recipe's (the authors): greedy, at most 200 new tokens, loop guard off"
    )
    for printed in scores:
        assert authors in printed
    asr, st, qa_scores = scores
    assert "wer" in asr and "bleu" in st and "f1" in qa_scores


def kill_and_resume(words, out):
    """Start stage 1 with a checkpoint every step, SIGKILL it once one is on disk, then the same
    command with --resume finishes the run from there."""
    first = words + ["--save-every", "1", "--max-steps", "4"]
    process = subprocess.Popen(first, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while not list(out.glob("ckpt-*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert list(out.glob("ckpt-*")), process.stdout.read()[-3000:]
    printed = run(first + ["--resume"])
    assert "resumed from" in printed and (out / "projector.safetensors").exists()
    return printed
