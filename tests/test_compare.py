"""compare.py: the grid runs end to end (--quick, tiny models), writes its table, JSON and figures,
and a rerun skips the cells that finished."""

import json

import pytest
from tiny import argv, write_manifest

from scripts import compare


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The demo corpus's layout with tiny synthetic data: sentences_* (ASR, with an open test split)
    and qa_*."""
    folder = tmp_path_factory.mktemp("corpus")
    write_manifest(folder, n=4, seed=3, name="sentences_open_test.jsonl")
    for split, n, seed in (("train", 40, 0), ("dev", 4, 1), ("test", 4, 2)):
        write_manifest(folder, n=n, seed=seed, name=f"sentences_{split}.jsonl")
        qa = {
            i: {"task": "qa", "question": f"what is number {i}?", "answer": f"number {i}"}
            for i in range(n)
        }
        write_manifest(folder, n=n, seed=10 + seed, name=f"qa_{split}.jsonl", extra=qa)
    return folder


def grid(corpus, out, *extra):
    line = (
        "--quick --corpus {corpus} --out {out} --llm tiny --encoder tiny"
        " --evaluate-args '--batch-size 4'"
    )
    return compare.main([*argv(line, corpus=corpus, out=out), *extra])


def test_the_table_spreads_over_seeds():
    cells = [
        {
            "variant": "cos-all",
            "frac": 0.1,
            "seed": s,
            "task": "asr",
            "finetune_seconds": 60,
            "metrics": {"wer": w, "wer_mean": w + 1, "exact": 50.0, "wer_median": 0.0},
        }
        for s, w in ((42, 4.0), (43, 6.0))
    ]
    args = compare.get_args(["--tasks", "asr"])
    readouts = {("cos-all", 42): 30.0, ("cos-all", 43): 40.0}
    table = compare.table(cells, {("cos-all", 42): 300, ("cos-all", 43): 360}, args, readouts)
    row = "| cos-all | 10% | 5.0 ± 1.0 | 6.0 ± 1.0 | 50.0 ± 0.0 | 0.0 ± 0.0 | 35.0 ± 5.0 | 2 | 5.5 min |"
    assert row in table
    assert "| readout WER | seeds | stage-1 time | fine-tune time (asr) |" in table
    assert compare.spread([3.0]) == "3.0"
    assert "open test" not in table  # a corpus without an open test split: no column for it
    cells[0]["metrics"]["open_wer"] = 20.0
    table = compare.table(cells, {}, args)
    assert "| ASR median WER | ASR WER, open test | readout WER | seeds |" in table
    assert "| 0.0 ± 0.0 | 20.0 | - | 2 |" in table


@pytest.mark.slow
def test_a_small_grid_and_its_resume(corpus, tmp_path, capsys):
    grid(corpus, tmp_path, "--variants", "none", "--tasks", "asr", "--toplines", "transcript")
    cells = sorted(p.stem for p in (tmp_path / "cells").glob("*.json"))
    assert cells == [
        "evaluate-none-s42-asr-0.1",
        "evaluate-none-s42-asr-1",
        "evaluate-open-none-s42-asr-0.1",
        "evaluate-open-none-s42-asr-1",
        "finetune-none-s42-asr-0.1",
        "finetune-none-s42-asr-1",
        "topline-open-transcript-asr",
        "topline-transcript-asr",
    ]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(c["variant"], c.get("frac")) for c in results["cells"]} == {
        ("none", 0.1),
        ("none", 1.0),
        ("read-transcript", None),
    }
    assert all(
        {"wer", "exact", "wer_median", "open_wer", "open_exact"} <= set(c["metrics"])
        for c in results["cells"]
    )
    table = (tmp_path / "results.md").read_text()
    assert "| ASR WER, open test |" in table
    assert (
        "| none | 10% |" in table
        and "| none | 100% |" in table
        and "| read-transcript | - |" in table
    )
    assert (tmp_path / "metrics.png").stat().st_size > 0

    # a killed grid: one cell never recorded; the rerun runs that cell alone
    (tmp_path / "cells" / "evaluate-none-s42-asr-1.json").unlink()
    log_before = (tmp_path / "grid.log").read_text()
    grid(corpus, tmp_path, "--variants", "none", "--tasks", "asr", "--toplines", "transcript")
    rerun = (tmp_path / "grid.log").read_text()[len(log_before) :]
    assert rerun.count("=== ") == 1 and "=== evaluate-none-s42-asr-1:" in rerun
    assert (tmp_path / "cells" / "evaluate-none-s42-asr-1.json").exists()


@pytest.mark.slow
def test_the_whole_quick_grid(corpus, tmp_path):
    grid(corpus, tmp_path, "--toplines", "transcript")
    results = json.loads((tmp_path / "results.json").read_text())
    starts = {(c["variant"], c.get("frac")) for c in results["cells"]}
    assert starts == {(v, 0.1) for v in compare.VARIANTS} | {
        ("none", 1.0),
        ("read-transcript", None),
    }
    assert {c["task"] for c in results["cells"]} == {"asr", "qa"}
    assert set(results["stage1_seconds"]) == {f"{v}-s42" for v in compare.VARIANTS if v != "none"}
    assert (tmp_path / "r1_per_layer.png").exists() and (tmp_path / "metrics.png").exists()


def test_a_cells_record_names_repository_paths_relative_to_it():
    """The records are committed under docs/results/: no machine's checkout path in them."""
    inside = str(compare.REPO / "demo" / "corpus" / "sentences_train.jsonl")
    command = ["pretrain.py", "--data", inside, "--out", "/elsewhere/out"]
    assert compare.relative_to_repo(command) == [
        "pretrain.py",
        "--data",
        "demo/corpus/sentences_train.jsonl",
        "--out",
        "/elsewhere/out",
    ]


def test_the_full_data_model_gets_the_steps_of_the_frac_runs():
    """The task-specialised model (100%) trains as many steps as the 10% runs: nothing to add where
    the recipe counts steps (the demo's), the epochs scaled down where it counts epochs."""
    demo = compare.get_args([])
    assert compare.same_steps_budget(demo, 1.0) == []
    paper = compare.get_args(["--llm", "llama"])
    assert compare.same_steps_budget(paper, 1.0) == ["--epochs", f"{2 * paper.frac:g}"]
    epochs = compare.get_args(["--finetune-args", "--epochs 4"])
    assert compare.same_steps_budget(epochs, 1.0) == ["--epochs", f"{4 * epochs.frac:g}"]
