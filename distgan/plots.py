"""Pictures of a run, shared by the Tracker and `distgan.sample`: sample grids and curves.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

LOSS_KEYS = ("loss_d", "loss_g")
D_OUTPUT_KEYS = ("d_real", "d_fake")  # mean sigmoid D(x) and D(G(z)) of the last step


def save_grid(images: torch.Tensor, path: Path) -> None:
    """images (N, C, H, W) in [-1, 1] -> one PNG, a ~square grid (torchvision make_grid/save_image)."""
    from torchvision.utils import save_image

    images = images.detach().float().cpu()
    save_image(images, path, nrow=math.ceil(math.sqrt(images.shape[0])), normalize=True, value_range=(-1, 1),
               format="png")


def _series(rows: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    by_step = {}
    for row in rows:
        if row.get("kind") == kind and row.get(key) is not None:
            by_step[row["step"]] = row[key]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _on_twin_axis(ax, rows: list[dict[str, Any]], key: str, label: str, color: str, marker: str):
    """An eval series on a second y axis of `ax` (None when there is none to draw)."""
    steps, values = _series(rows, "eval", key)
    if not steps:
        return None
    twin = ax.twinx()
    twin.plot(steps, values, color=color, marker=marker, markersize=3, label=key)
    twin.set_ylabel(label, color=color)
    return twin


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 7.5), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global backend state, safe beside other threads
    (ax_loss, ax_d), (ax_fid, ax_cls) = fig.subplots(2, 2)
    panels = [(ax_loss, "losses", "step", LOSS_KEYS), (ax_d, "discriminator outputs", "step", D_OUTPUT_KEYS),
              (ax_fid, "Fréchet distance (classifier features)", "eval", ("fid",)),
              (ax_cls, "classes and diversity", "eval", ("coverage", "diversity"))]
    for ax, title, kind, keys in panels:
        for key in keys:
            steps, values = _series(rows, kind, key)
            if steps:
                ax.plot(steps, values, marker="o" if kind == "eval" else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    ax_d.set_ylim(-0.02, 1.02)
    ax_d.set_ylabel("mean sigmoid output")
    if ax_fid.lines:
        ax_fid.set_yscale("log")
        _on_twin_axis(ax_fid, rows, "kid", "kid", "tab:red", "s")
    twin = _on_twin_axis(ax_cls, rows, "classifier_score", "classifier score (1-10)", "tab:green", "^")
    if twin is not None:
        twin.set_ylim(0.8, 10.2)
    ax_cls.set_ylim(-0.02, 1.1)
    fig.savefig(path, format="png", dpi=90)
