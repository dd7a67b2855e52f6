"""The repository holds code, not runs: no tracked text file names an absolute path of the machine
that wrote it (/work/..., /home/<user>/..., /root/..., /tmp/...), and the tracked files stay under
1.5 MB in all. Fast (reads `git ls-files`; skipped outside a git checkout):
`python -m pytest tests/test_repo.py -q`."""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SELF = "tests/test_repo.py"  # holds the pattern itself
MACHINE_PATH = re.compile(r"(/work/|/home/[a-z]|/root/|/tmp/)[A-Za-z0-9_.-]+/")
BINARY = {
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".ogg",
    ".wav",
    ".flac",
    ".mp3",
    ".pt",
    ".safetensors",
    ".gz",
    ".zip",
}
MAX_BYTES = 1_500_000
MAX_LINE = 100  # pyproject.toml's line-length: ruff format sets the code, prose is wrapped by hand
MAX_LONG_SHARE = 0.05


def tracked_files():
    """Repository-relative paths of the tracked files, or a skip when this is not a git checkout."""
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"git not usable: {e}")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO:
        pytest.skip(f"{REPO} is not the root of a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60, check=True
    )
    return [name for name in listed.stdout.decode("utf-8", "surrogateescape").split("\0") if name]


def test_no_absolute_machine_path_in_tracked_files():
    offending = []
    for name in tracked_files():
        path = REPO / name
        if name == SELF or path.suffix.lower() in BINARY or not path.is_file() or path.is_symlink():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # not a text file
        if "\0" in text:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                offending.append(f"{name}:{number}: {line.strip()[:160]}")
                break
    assert not offending, (
        f"{len(offending)} tracked file(s) hold an absolute machine path (make it "
        "repository-relative):\n" + "\n".join(offending[:10])
    )


def test_tracked_files_under_the_size_limit():
    sizes = {}
    for name in tracked_files():
        path = REPO / name
        if os.path.lexists(path):  # the working tree may have deleted a file git still tracks
            sizes[name] = os.lstat(path).st_size
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:10]
    assert total < MAX_BYTES, (
        f"tracked files: {total:,} bytes, limit {MAX_BYTES:,}; largest:\n"
        + "\n".join(f"{size:>10,}  {name}" for name, size in largest)
    )


def test_few_lines_run_past_100_characters():
    per_file = {}
    total = 0
    for name in tracked_files():
        path = REPO / name
        if not name.endswith(".py") or not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        total += len(lines)
        per_file[name] = sum(len(line) > MAX_LINE for line in lines)
    long = sum(per_file.values())
    share = long / max(total, 1)
    worst = sorted(per_file.items(), key=lambda item: -item[1])[:5]
    assert share < MAX_LONG_SHARE, (
        f"{long} of {total} lines ({share:.1%}) of the tracked *.py files run past {MAX_LINE} "
        f"characters (limit {MAX_LONG_SHARE:.0%}); rewrap the prose. Most in:\n"
        + "\n".join(f"{count:>5}  {name}" for name, count in worst)
    )
