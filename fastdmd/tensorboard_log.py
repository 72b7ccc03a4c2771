"""TensorBoard beside metrics.jsonl: the same rows, one scalar per key at the row's step.

metrics.jsonl is always written (trainer._log); this adds <run_dir>/tensorboard/ when
torch.utils.tensorboard can be imported (`pip install 'fastdmd[logging]'`, i.e. tensorboard).
trainer.tensorboard: auto (log there when installed, say once in the run header how to enable it
when not), on (a missing install fails before any work), off. Rank 0 writes; the other ranks get
a disabled log. On resume the writer purges the events logged after the checkpoint, as
metrics.jsonl drops its lines after it.
"""

from __future__ import annotations

from fastdmd.config import ConfigError

ENABLE_HINT = "pip install 'fastdmd[logging]' (or pip install tensorboard)"


def tensorboard_off_reason(mode: str) -> str | None:
    """Why nothing goes to TensorBoard with trainer.tensorboard = mode (the run header says it), or None.

    Raises ConfigError for mode "on" when torch.utils.tensorboard cannot be imported."""
    if mode == "off":
        return "off"
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as e:
        if mode == "on":
            raise ConfigError(f"trainer.tensorboard = on but TensorBoard cannot be imported ({e}); "
                              f"{ENABLE_HINT}, or set trainer.tensorboard auto or off") from None
        return f"off (not installed; {ENABLE_HINT} to enable it)"
    return None


class TensorBoardLog:
    """`write(row)` adds every key but "step" as a scalar at row["step"]; `status` is the header's word on it.

    enabled=False (ranks other than 0) writes nothing; resume_step: the step the run resumes from."""

    def __init__(self, mode: str, log_dir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.writer = None
        off = tensorboard_off_reason(mode if enabled else "off")
        self.status = off or f"{log_dir} (tensorboard --logdir {log_dir})"
        if off is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at steps after the checkpoint, logged before the run was cut, are dropped
            self.writer = SummaryWriter(log_dir, purge_step=None if resume_step is None else resume_step + 1)

    def write(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
