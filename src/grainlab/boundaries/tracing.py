"""Trace image files with a trained model and write every output for them.

For each IMAGE, into the output folder:
    <stem>-probability.png   boundary probability (8-bit)
    <stem>-tracing.png       one-pixel boundary network
    <stem>-grains.png        grain label map (16-bit)
    <stem>-overlay.png       the image with the tracing in red
    <stem>-grains.csv        one row per grain (area, equivalent diameter, centroid)
and for all images together stats.csv and stats.json (count, mean area and diameter,
Heyn mean intercept, ASTM E112 G when the pixel size is known).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from grainlab.boundaries.evaluate import model_tracer
from grainlab.boundaries.figures import overlay
from grainlab.boundaries.grains import grain_stats, grain_table
from grainlab.boundaries.infer import LoadedModel
from grainlab.config import BoundaryConfig
from grainlab.images import atomic_path, read_image, write_image, write_labels, write_mask


def _write_csv(path: Path, rows: list[dict]):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["grain"])
        writer.writeheader()
        writer.writerows(rows)


def trace_files(
    model: LoadedModel,
    images: list[Path],
    out_dir: Path,
    cfg: BoundaryConfig,
    pixel_size_nm: float | None = None,
    max_pixels: int = 100_000_000,
) -> list[dict]:
    """Trace each image file; returns one statistics row per image."""
    tracer = model_tracer(model, cfg)
    channels = "rgb" if model.in_channels == 3 else "grey"
    rows = []
    for path in images:
        image = read_image(path, channels=channels, max_pixels=max_pixels)
        result = tracer(image)
        stem = Path(path).stem
        write_image(out_dir / f"{stem}-probability.png", result.probability)
        write_mask(out_dir / f"{stem}-tracing.png", result.tracing)
        write_labels(out_dir / f"{stem}-grains.png", result.grains)
        write_image(out_dir / f"{stem}-overlay.png", overlay(image, result.tracing))
        _write_csv(out_dir / f"{stem}-grains.csv", grain_table(result.grains, pixel_size_nm))
        rows.append(
            {"image": str(path), **grain_stats(result.tracing, result.grains, pixel_size_nm).to_dict()}
        )
    _write_csv(out_dir / "stats.csv", rows)
    with atomic_path(out_dir / "stats.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
    return rows
