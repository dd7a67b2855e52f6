"""Logs people can look at: --wandb / --tensorboard get the values of log.jsonl (optional packages,
faked here unless installed), and plot_log.py draws a run's log as a PNG.

    python -m pytest -q tests/test_logs.py
"""

import json
import sys
import types

import pytest
import torch
from tiny import argv, write_manifest

import common
import pretrain
from data import UserError
from scripts import plot_log


class FakeWandb(types.ModuleType):
    """What JsonLog uses of wandb: init(...) -> a run with log(values, step) and finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values, step=None):
        self.logged.append((step, values))

    def finish(self):
        self.finished += 1


class FakeWriter:
    """torch.utils.tensorboard.SummaryWriter's add_scalar and close."""

    written = []

    def __init__(self, folder):
        self.folder = folder

    def add_scalar(self, name, value, step):
        FakeWriter.written.append((name, value, step))

    def close(self):
        FakeWriter.written.append("closed")


@pytest.fixture
def fakes(monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    FakeWriter.written = []
    return wandb


def test_wandb_and_tensorboard_get_what_log_jsonl_gets(tmp_path, fakes):
    log = common.JsonLog(tmp_path, wandb_project="proj", tensorboard=True, config={"lr": 1e-4})
    log(
        step=3,
        loss=torch.tensor(0.5).item(),
        per_layer=torch.tensor([0.25, 0.75]),
        acc=[0.5, 1.0],
        layers=[0, 5],
    )
    log(step=4, dev_r1=[0.1, 0.2], layers=[0, 5], note="text is not a scalar")
    log.close()
    line = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert line["loss"] == 0.5 and line["per_layer"] == [0.25, 0.75] and line["layers"] == [0, 5]
    assert fakes.inits == [
        {"project": "proj", "name": tmp_path.name, "dir": str(tmp_path), "config": {"lr": 1e-4}}
    ]
    expect = {
        "loss": 0.5,
        "per_layer/layer0": 0.25,
        "per_layer/layer5": 0.75,
        "acc/layer0": 0.5,
        "acc/layer5": 1.0,
    }
    assert (
        fakes.logged[0][0] == 3
        and {k: v for k, v in fakes.logged[0][1].items() if k != "time"} == expect
    )
    assert fakes.logged[1] == (4, {"dev_r1/layer0": 0.1, "dev_r1/layer5": 0.2})
    assert ("acc/layer5", 1.0, 3) in FakeWriter.written and FakeWriter.written[-1] == "closed"
    assert fakes.finished == 1


def test_missing_package_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UserError, match="--wandb needs the wandb package: pip install wandb"):
        common.JsonLog(tmp_path, wandb_project="proj")
    common.JsonLog(tmp_path, enabled=False, wandb_project="proj")  # other ranks import nothing


def test_real_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = common.JsonLog(tmp_path, tensorboard=True)
    for step in (1, 2):
        log(step=step, loss=1.0 / step, acc=[0.5, 0.25 * step], layers=[0, 5])
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("acc/layer5")] == [(1, 0.25), (2, 0.5)]


def test_pretrain_flags_reach_the_log(paths, tmp_path, fakes):
    manifest = write_manifest(tmp_path / "data", n=8)
    out = tmp_path / "run"
    line = (
        "--llm {llm} --encoder {hubert} --qformer-dim 32 --qformer-heads 4 --qformer-layers 2"
        " --device cpu --data {data} --dev-data {data} --out {out} --batch-size 4 --max-steps 2"
        " --wandb --wandb-project p --tensorboard"
    )
    pretrain.main(argv(line, **paths, data=manifest, out=out))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2]  # two training steps, the final dev retrieval
    assert fakes.inits[0]["project"] == "p" and fakes.inits[0]["config"]["max_steps"] == 2
    assert [step for step, _ in fakes.logged] == [1, 2, 2] and fakes.finished == 1
    assert "dev_r1/layer0" in fakes.logged[-1][1] and FakeWriter.written[-1] == "closed"


# -----------------------------------------------------------------------------
# plot_log.py


def synthetic_pretrain_log(path, steps=40, layers=(0, 5, 10)):
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            shown = [0] if step <= 10 else list(layers)  # the demo's warm start logs layer 0 only
            acc = [min(1.0, step / steps + 0.1 * i) for i in range(len(shown))]
            record = {
                "step": step,
                "loss": 5.0 / step,
                "per_layer": [1.0] * len(shown),
                "acc": acc,
                "layers": shown,
            }
            f.write(json.dumps(record) + "\n")
            if step % 20 == 0:
                r1 = [step / steps / (i + 1) for i in range(len(layers))]
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "dev_r1": r1,
                            "dev_r1_centred": r1[::-1],
                            "layers": list(layers),
                        }
                    )
                    + "\n"
                )
        f.write('{"step": 41, "loss": ')  # a run killed mid-write


def test_plot_a_pretrain_log(tmp_path):
    log = tmp_path / "log.jsonl"
    synthetic_pretrain_log(log)
    records = plot_log.read_log(log)
    assert len(records) == 42  # 40 steps, 2 dev evaluations; the broken last line skipped
    assert plot_log.per_layer(records, "dev_r1")[5] == ([20, 40], [0.25, 0.5])
    assert plot_log.per_layer(records, "acc")[0][0] == list(range(1, 41))
    out = plot_log.main([str(log), "--smooth", "5"])
    assert out == tmp_path / "log.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_a_finetune_log_and_errors(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": s, "loss": 2.0 / s, "lr": 1e-4} for s in range(1, 11)] + [
        {"step": 10, "dev_loss": 0.3}
    ]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = plot_log.main([str(log), "--out", str(tmp_path / "ft.png")])
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_log.smoothed([1.0, 3.0, 5.0], 2).tolist() == [1.0, 2.0, 4.0]
    with pytest.raises(UserError, match="no log at"):
        plot_log.main([str(tmp_path / "nowhere.jsonl")])
