"""Sampling from a trained generator (fastdmd.generate), from a run directory or from its export."""

import os

import pytest
import torch

from fastdmd.export import export_run
from fastdmd.generate import load_generator, main, sample, sampling_sigmas
from fastdmd.models.digits import load_digits_assets
from fastdmd.runs import UsageError
from fastdmd.train import main as train


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    run, export = str(root / "run"), str(root / "export")
    train(["--trainer.steps", "2", "--trainer.batch_size", "4", "--trainer.sample_every", "0",
           "--eval.at_end", "false", "--run_dir", run])
    export_run(run, export)
    return {"run": run, "export": export}


def test_run_and_export_give_identical_pngs(sources, tmp_path, capsys):
    args = ["--label", "3", "--label", "7", "--num", "4", "--seed", "5"]
    written = {name: main([path, *args, "--out", str(tmp_path / name)]) for name, path in sources.items()}
    out = capsys.readouterr().out
    assert out.count("generator: EMA weights from") == 2 and out.count("sampling on cpu") == 2
    assert f"wrote {tmp_path / 'run' / 'grid.png'}" in out
    names = [os.path.basename(p) for p in written["run"]]
    assert names == ["grid.png"] + [f"label{c}_{i:03d}.png" for c in (3, 7) for i in range(4)]
    for a, b in zip(written["run"], written["export"]):
        assert open(a, "rb").read() == open(b, "rb").read(), (a, b)


def test_seed_and_labels_control_the_samples(sources):
    gen = load_generator(sources["export"])
    sigmas = list(gen.sigmas)
    images, labels = sample(gen, [3, 7], 8, sigmas, seed=0)
    assert labels.tolist() == [3] * 8 + [7] * 8
    assert torch.equal(images, sample(gen, [3, 7], 8, sigmas, seed=0)[0])
    assert not torch.equal(images, sample(gen, [3, 7], 8, sigmas, seed=1)[0])
    _, classifier, _ = load_digits_assets()
    accuracy = (classifier(images).argmax(1) == labels).float().mean()
    assert accuracy >= 0.75, f"the classifier reads the requested digit in only {accuracy:.0%} of samples"


def test_other_step_counts_respace_the_sigmas_linearly_from_one():
    trained = (1.0, 0.75, 0.5, 0.25)
    assert sampling_sigmas(trained, None) == sampling_sigmas(trained, 4) == list(trained)
    assert sampling_sigmas(trained, 2) == [1.0, 0.5]
    assert sampling_sigmas(trained, 1) == [1.0]
    with pytest.raises(UsageError, match="--steps must be >= 1, got 0"):
        sampling_sigmas(trained, 0)


@pytest.mark.parametrize("label", ["10", "-1"])
def test_label_outside_0_to_9_names_it_and_the_range(sources, tmp_path, capsys, label):
    with pytest.raises(SystemExit) as exit_info:
        main([sources["run"], "--label", "3", "--label", label, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert f"label {label} is not a digit class; valid labels are 0..9" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a red square"], "a digits run draws classes: give --label (a digit 0..9), repeated for several"),
    (["--label", "3", "--prompt", "a red square"], "give --label (a digit 0..9), repeated for several, and no --prompt"),
    (["--label", "3", "--out", "{tmp}/afile"], "--out {tmp}/afile is a file; give a folder"),
    (["--label", "3", "--device", "gpu0"], "--device 'gpu0' is not a device; give cpu, cuda or cuda:N"),
    (["--label", "3", "--device", "cuda:64"], "--device 'cuda:64': "),
], ids=["prompt-for-digits", "both", "out-is-a-file", "bad-device", "missing-cuda-device"])
def test_what_a_digits_run_cannot_draw_is_refused(sources, tmp_path, capsys, args, message):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main([sources["run"], "--out", str(tmp_path / "x"), *(a.format(tmp=tmp_path) for a in args)])
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_neither_run_nor_export_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--label", "3", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert f"{tmp_path} is neither a run nor an export directory" in err
    assert "config.json and checkpoints/" in err and "fastdmd.json and unet/" in err
