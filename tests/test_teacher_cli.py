"""python -m fastdmd.teacher refuses arguments it cannot train with before any work."""

import pytest

from fastdmd.teacher import main


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--cfg-dropout", "1.5"], "--cfg-dropout must be in [0, 1), got 1.5"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--out", "{tmp}/afile"], "--out {tmp}/afile is a file; give a folder"),
])
def test_bad_arguments_are_named(tmp_path, capsys, argv, message):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as done:
        main([a.format(tmp=tmp_path) for a in argv])
    assert done.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err
