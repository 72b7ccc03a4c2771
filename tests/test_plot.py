"""Pictures of a run: the training-curves CLI (fastdmd.plot) and sample grids of a few classes."""

import json
import os
import shutil

import matplotlib.pyplot as plt
import pytest
import torch

from fastdmd.plot import _tile, main, save_grids
from fastdmd.train import main as train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Three logged steps and a (tiny) final evaluation, so summary.json exists; 25 samples do not divide
    over the 10 classes, and the final grids have short rows."""
    path = str(tmp_path_factory.mktemp("plot") / "run")
    train(["--trainer.steps", "3", "--trainer.batch_size", "4", "--trainer.log_every", "1",
           "--trainer.sample_every", "0", "--eval.num_samples", "25", "--eval.batch_size", "25",
           "--eval.teacher_steps", "2", "--eval.cache_teacher", "false", "--run_dir", path])
    return path


def test_curves_png_shows_losses_speed_and_scores(run_dir, capsys):
    main([run_dir])
    out = capsys.readouterr().out
    path = os.path.join(run_dir, "curves.png")
    assert f"wrote {path}" in out
    assert "losses: loss_critic, loss_dmd" in out
    assert "throughput and learning rate: samples_per_s, lr_generator" in out
    assert "FD and accuracy: teacher 2-step Euler, teacher 4-step Euler, student 4-step" in out
    image = plt.imread(path)
    assert image.shape[0] > 800 and image.shape[1] > 1000  # three rows of panels
    assert image[..., :3].std() > 0.1  # drawn, not blank
    assert os.path.getsize(path) > 30_000


@pytest.mark.parametrize("summary", [None, {"recipe": "sd3-dmd2", "family": "sd3", "student_samples_per_s": 1.0}],
                         ids=["no-summary", "sd3-summary-without-scores"])
def test_without_scores_only_the_curves(run_dir, tmp_path, capsys, summary):
    shutil.copy(os.path.join(run_dir, "metrics.jsonl"), tmp_path)
    if summary is not None:
        (tmp_path / "summary.json").write_text(json.dumps(summary))
    main([str(tmp_path), "--out", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert "FD and accuracy" not in out and "losses: loss_critic, loss_dmd" in out
    assert plt.imread(tmp_path / "c.png").shape[0] < 800  # two rows


@pytest.mark.parametrize("metrics, expected", [
    (None, "metrics.jsonl is missing; expected the metrics log that `python -m fastdmd.train` writes"),
    ("", "metrics.jsonl is empty"),
    ('{"step": 1, "loss_dmd": 0.1}\n{"loss_dmd": 0.2\n', "metrics.jsonl line 2 is not valid JSON"),
    ('{"loss_dmd": 0.1}\n', "metrics.jsonl line 1 is not a metrics row; expected a JSON object with a \"step\" key"),
])
def test_bad_metrics_fail_with_a_clear_message(tmp_path, capsys, metrics, expected):
    if metrics is not None:
        (tmp_path / "metrics.jsonl").write_text(metrics)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdmd.plot: error: ") and str(tmp_path) in err and expected in err, err


def test_grid_of_a_few_classes_has_one_row_each(tmp_path):
    images, labels = torch.zeros(6, 1, 16, 16), torch.tensor([7, 3, 7, 3, 7, 3])
    save_grids({"two classes": (images, labels)}, str(tmp_path / "g.png"), per_class=3)
    height, width = plt.imread(tmp_path / "g.png").shape[:2]
    assert height < width  # 2 rows of 3, not the 10 x 10 grid of the trainer


def test_a_class_short_of_samples_leaves_black_cells():
    images = torch.ones(5, 1, 4, 4)  # white samples
    labels = torch.tensor([0, 0, 0, 1, 1])  # eval.num_samples 15 gives such counts over 10 classes
    grid = _tile(images, labels, [0, 1], per_class=3)
    assert grid.shape == (8, 12)
    assert (grid[:4] == 1).all() and (grid[4:, :8] == 1).all() and (grid[4:, 8:] == 0).all()
