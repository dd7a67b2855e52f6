"""python -m demokit: build the demo's models and corpus once (see demokit/__init__.py)."""

import argparse
import os
import sys
import time
from pathlib import Path

import demokit
from demokit import BuildError, corpus_path, demo_dir, log, smollm2_path, whisper_tiny_path


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m demokit",
        description=demokit.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--only",
        choices=["models", "corpus"],
        default=None,
        help="build only the models or only the corpus",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="build the small corpus (corpus-small/) instead of the full one",
    )
    p.add_argument(
        "--size",
        choices=["full", "large", "small"],
        default=None,
        help="the corpus to build (default: full)",
    )
    p.add_argument(
        "--demo-dir",
        default=None,
        help="the cache folder (default: $SPEECHLLM_DEMO_DIR, else demo/ in the repo)",
    )
    args = p.parse_args(argv)
    if args.demo_dir:
        os.environ["SPEECHLLM_DEMO_DIR"] = str(Path(args.demo_dir).expanduser().resolve())
    t0 = time.time()
    if args.only in (None, "models"):
        log(f"SmolLM2-135M-Instruct: {smollm2_path()}")
        log(f"Whisper tiny.en: {whisper_tiny_path()}")
    if args.only in (None, "corpus"):
        log(f"corpus: {corpus_path(small=args.small, size=args.size, qa=True)}")
    log(f"done in {time.time() - t0:.0f} s; everything is cached under {demo_dir()}")


if __name__ == "__main__":
    try:
        main()
    except BuildError as e:  # what the user can fix (a download, a hash): one line, not a traceback
        sys.exit(f"python -m demokit: error: {e}")
