"""Figures for people: loss curves, tracing overlays, the poster grid, grain-size plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from grainlab.images import atomic_path  # noqa: E402


def _save(fig, path: Path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_losses(ax, history: list[dict]):
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train/loss"] for h in history], label="train")
    validated = [h for h in history if "val/loss" in h]  # boundaries.eval_every may skip epochs
    ax.plot([h["epoch"] for h in validated], [h["val/loss"] for h in validated], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)


def write_loss_curve(path: Path, history: list[dict], title: str):
    fig, ax = plt.subplots(figsize=(4, 3))
    plot_losses(ax, history)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def overlay(image: np.ndarray, tracing: np.ndarray) -> np.ndarray:
    """An RGB float image with the tracing drawn in red."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3].copy()
    rgb = rgb.astype(np.float32)
    rgb[tracing.astype(bool)] = (1.0, 0.1, 0.1)
    return rgb


def write_poster_grid(path: Path, rows: list[dict]):
    """Rows: {'title', 'snapshots': [(epoch, probability)], 'history'}; last column the loss curves."""
    n_cols = max(len(r["snapshots"]) for r in rows) + 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.4 * n_cols, 2.4 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows, strict=False):
        for ax, (epoch, prob) in zip(ax_row, row["snapshots"], strict=False):
            ax.imshow(prob, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"epoch {epoch}", fontsize=8)
            ax.axis("off")
        ax_row[0].text(
            -0.1,
            0.5,
            row["title"],
            transform=ax_row[0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=8,
        )
        for ax in ax_row[len(row["snapshots"]) : -1]:
            ax.axis("off")
        plot_losses(ax_row[-1], row["history"])
    fig.tight_layout()
    _save(fig, path)


def write_size_distributions(path: Path, truth: np.ndarray, curves: dict[str, np.ndarray], title: str):
    """Cumulative distributions of equivalent diameters (px): truth against each tracer."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, d in {"truth": truth, **curves}.items():
        if len(d):
            x = np.sort(d)
            ax.step(
                x,
                np.arange(1, len(x) + 1) / len(x),
                where="post",
                label=name,
                lw=2.5 if name == "truth" else 1,
                color="k" if name == "truth" else None,
            )
    ax.set_xlabel("equivalent diameter (px)")
    ax.set_ylabel("cumulative fraction")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    _save(fig, path)
