"""Shared pytest setup. Runs before any test module is imported.

- TRITON_INTERPRET=1: Triton kernels run on the CPU through Triton's interpreter. Triton reads this
  when `@triton.jit` decorates a kernel, i.e. when contrastive_fast.py is first imported, so it must
  be set here.
- One torch thread: the tests' tensors are tiny, and two threads fighting another process for 2
  cores can run far slower than one.
- The repository root on sys.path, so `import contrastive` works however pytest is started.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def paths(tmp_path_factory):
    """The tiny random models (a Llama with its tokenizer, a HuBERT, a Whisper encoder), built once
    per session and saved to a temporary folder; tests load them through from_pretrained like real
    ones."""
    from tiny import tiny_models

    return tiny_models(tmp_path_factory.mktemp("models"))
