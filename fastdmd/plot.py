"""Pictures of a run: labelled sample grids (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fastdmd.data.digits import NUM_CLASSES  # noqa: E402


def _tile(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Rows = classes 0..9, `per_class` samples each, as one [H*10, W*per_class] image in [0, 1]."""
    rows = []
    for c in range(NUM_CLASSES):
        picked = images[labels == c][:per_class].clamp(-1, 1) * 0.5 + 0.5
        rows.append(torch.cat(list(picked[:, 0]), dim=1))
    return torch.cat(rows, dim=0)


def save_grids(panels: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str, per_class: int = 10) -> None:
    """One panel per sampler, each titled, rows labelled with the requested class."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, (images, labels)) in zip(axes[0], panels.items()):
        grid = _tile(images.float().cpu(), labels.cpu(), per_class)
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([(c + 0.5) * images.shape[-2] for c in range(NUM_CLASSES)])
        ax.set_yticklabels([str(c) for c in range(NUM_CLASSES)], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
