"""TensorBoard beside metrics.jsonl (fastdmd/tensorboard_log.py), through tiny training runs."""

import os
import sys

import pytest

from fastdmd.train import main
from test_train import TINY, read_metrics


def read_scalars(run_dir):
    """{tag: [(step, value), ...]} from every event file of the run, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_same_as_metrics(scalars, rows):
    assert set(scalars) == set(rows[0]) - {"step"}
    for tag, events in scalars.items():
        assert [step for step, _ in events] == [r["step"] for r in rows], tag
        assert [value for _, value in events] == pytest.approx([r[tag] for r in rows], rel=1e-6, abs=1e-30), tag


def test_every_metrics_row_is_in_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run_dir = str(tmp_path / "run")
    main(TINY + ["--trainer.steps", "3", "--run_dir", run_dir])
    log_dir = os.path.join(run_dir, "tensorboard")
    assert f"tensorboard={log_dir} (tensorboard --logdir {log_dir})" in capsys.readouterr().out
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["loss_generator"] != rows[2]["loss_generator"]
    assert_same_as_metrics(read_scalars(run_dir), rows)


def test_resume_drops_the_events_logged_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = str(tmp_path / "run")
    main(TINY + ["--trainer.steps", "3", "--trainer.checkpoint_every", "2", "--run_dir", run_dir])
    # As if the run had died after logging step 3 but before its checkpoint was complete.
    os.remove(os.path.join(run_dir, "checkpoints", "step_0000003", "meta.json"))
    main(["--resume", "--run_dir", run_dir, "--trainer.steps", "4"])
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert_same_as_metrics(read_scalars(run_dir), rows)  # step 3 once, not once per run


def test_missing_tensorboard_is_said_once_and_on_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    auto = str(tmp_path / "auto")
    main(TINY + ["--trainer.steps", "2", "--run_dir", auto])
    out = capsys.readouterr().out
    assert out.count("tensorboard=off (not installed; pip install 'fastdmd[logging]'") == 1
    assert not os.path.exists(os.path.join(auto, "tensorboard")) and len(read_metrics(auto)) == 2

    on = str(tmp_path / "on")
    with pytest.raises(SystemExit) as done:
        main(TINY + ["--trainer.steps", "2", "--trainer.tensorboard", "on", "--run_dir", on])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1
    assert "trainer.tensorboard = on but TensorBoard cannot be imported" in err[0]
    assert "pip install 'fastdmd[logging]'" in err[0] and not os.path.exists(on)


def test_off_writes_no_events(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    main(TINY + ["--trainer.steps", "1", "--trainer.tensorboard", "off", "--run_dir", run_dir])
    assert " tensorboard=off\n" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(run_dir, "tensorboard")) and len(read_metrics(run_dir)) == 1
