"""bench.py runs end to end and its table holds what the README reports (slow: real demo models, the
paper-sized loss shapes, one timed repeat): `python -m pytest -m slow tests/test_bench.py`. CI runs
it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_bench_prints_every_row_and_our_wasserstein_matches_geomloss():
    pytest.importorskip("geomloss")
    cmd = [sys.executable, "-m", "scripts.bench", "--repeats", "1", "--small-corpus"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| \d\. ", line)]
    assert [row.split(" | ")[0] for row in rows] == ["| 1. cos loss, fwd+bwd"] * 4 + [
        "| 2. wasserstein loss, fwd+bwd"
    ] * 3 + ["| 3. pretraining step"] * 3
    for row in rows:  # a time in every row; the losses agree with their section's reference
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 0
        tolerance = (
            5e-2 if cells[0].startswith("3.") else 1e-2
        )  # section 3: our step reads fp16-cached features
        assert cells[6] == "" or float(cells[6]) < tolerance, row
    divergences = re.search(r"section 2: .* max relative difference ([0-9.e+-]+)", result.stdout)
    assert (
        divergences and float(divergences.group(1)) < 1e-2
    )  # the 700 divergences themselves, against geomloss
    assert re.search(r"section 3: ours / floor = [0-9.]+", result.stdout)
