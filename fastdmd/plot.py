"""Pictures of a run (matplotlib, headless): labelled sample grids, single samples, and the training
curves of a finished or running run: `python -m fastdmd.plot RUN_DIR [--out FILE]`."""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from fastdmd.runs import UsageError, cli_errors, require_run_dir  # noqa: E402


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """Samples live in [-1, 1]; pictures in [0, 1]."""
    return images.float().cpu().clamp(-1, 1) * 0.5 + 0.5


def _tile(images: torch.Tensor, labels: torch.Tensor, classes: list[int], per_class: int) -> torch.Tensor:
    """One row per class in `classes`, `per_class` samples each, as one [H*rows, W*per_class] image in
    [0, 1] (grayscale), or [H*rows, W*per_class, 3] for RGB samples. A class with fewer samples
    (eval.num_samples not a multiple of the classes) leaves its row's last cells black."""
    rows = []
    for c in classes:
        picked = _to_unit(images[labels == c][:per_class])
        picked = torch.cat([picked, picked.new_zeros((per_class - len(picked), *picked.shape[1:]))])
        pictures = picked[:, 0] if picked.shape[1] != 3 else picked.permute(0, 2, 3, 1)
        rows.append(torch.cat(list(pictures), dim=1))
    return torch.cat(rows, dim=0)


def save_grids(panels: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str, per_class: int = 10) -> None:
    """One panel per sampler, each titled, one row per requested class (those present in the labels)."""
    classes = {title: sorted(set(labels.tolist())) for title, (_, labels) in panels.items()}
    rows = max(len(c) for c in classes.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.4 + 3.2 * rows / per_class), squeeze=False)
    for ax, (title, (images, labels)) in zip(axes[0], panels.items()):
        grid = _tile(images.float().cpu(), labels.cpu(), classes[title], per_class)
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([(row + 0.5) * images.shape[-2] for row in range(len(classes[title]))])
        ax.set_yticklabels([str(c) for c in classes[title]], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_images(images: torch.Tensor, names: list[str], out_dir: str) -> list[str]:
    """Each sample as its own PNG (grayscale, or RGB for 3 channels) at its native resolution; returns the paths."""
    paths = []
    for image, name in zip(_to_unit(images), names):
        paths.append(os.path.join(out_dir, name))
        if image.shape[0] == 3:
            plt.imsave(paths[-1], image.permute(1, 2, 0).numpy())
        else:
            plt.imsave(paths[-1], image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    return paths


# ----- training curves ---------------------------------------------------------------------------
def read_metrics(run_dir: str) -> list[dict]:
    """RUN_DIR/metrics.jsonl: one JSON object per logged step, as the trainer writes it."""
    require_run_dir(run_dir)
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UsageError(f"{path} is missing; expected the metrics log that `python -m fastdmd.train` writes "
                         f"(one JSON object per logged step, the first after trainer.log_every steps)")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path} line {number} is not valid JSON ({e}): {line.strip()[:80]!r}") from None
            if not isinstance(row, dict) or "step" not in row:
                raise UsageError(f"{path} line {number} is not a metrics row; expected a JSON object with a "
                                 f"\"step\" key, got {line.strip()[:80]!r}")
            rows.append(row)
    if not rows:
        raise UsageError(f"{path} is empty; the run has not logged a step yet (every trainer.log_every steps)")
    return rows


def _series(ax, rows: list[dict], key: str) -> None:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _bars(ax, names: list[str], values: list[float], title: str) -> None:
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=7)


def plot_curves(run_dir: str, out: str) -> dict[str, list[str]]:
    """One PNG: each loss_* key against step (own panel, own scale: loss_dmd is orders of magnitude
    below loss_critic), throughput and learning rate, and when summary.json exists the FD and class
    accuracy of each sampler (digits; an SD3 / FLUX summary has none). Returns panel row -> what it shows."""
    rows = read_metrics(run_dir)
    keys = sorted({k for r in rows for k in r})
    shown = {"losses": [k for k in keys if k.startswith("loss_")],
             "throughput and learning rate": ["samples_per_s"] + [k for k in keys if k.startswith("lr_")]}
    summary_path = os.path.join(run_dir, "summary.json")
    samplers = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            samplers = json.load(f).get("samplers", {})  # families with a metric model (digits) score samplers
    if samplers:
        shown["FD and accuracy"] = list(samplers)
    fig = plt.figure(figsize=(13, 3.4 * len(shown)), layout="constrained")
    panels = dict(zip(shown, fig.subfigures(len(shown), 1, squeeze=False)[:, 0]))
    for row in ("losses", "throughput and learning rate"):
        for ax, key in zip(panels[row].subplots(1, len(shown[row]), squeeze=False)[0], shown[row]):
            _series(ax, rows, key)
    if "FD and accuracy" in shown:
        names = shown["FD and accuracy"]
        fd_ax, acc_ax = panels["FD and accuracy"].subplots(1, 2, width_ratios=[2, 1])
        _bars(fd_ax, names, [samplers[n]["fd"] for n in names], "FD to held-out digits (lower is better)")
        _bars(acc_ax, [""] * len(names), [samplers[n]["accuracy"] for n in names], "class accuracy")
    fig.suptitle(f"{run_dir}  (step {rows[-1]['step']})", fontsize=10)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return shown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdmd.plot",
                                     description="Draw a run's training curves and final scores into one PNG.")
    parser.add_argument("run_dir", help="a run directory written by `python -m fastdmd.train`")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.run_dir, "curves.png")
    with cli_errors("fastdmd.plot"):
        shown = plot_curves(args.run_dir, out)
    for panel, what in shown.items():
        print(f"  {panel}: {', '.join(what)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
