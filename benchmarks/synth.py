"""Data synthesis: pairs/s of `build_tem_datasets` (regions in parallel worker processes, as
`grainlab data synth` runs it) against the plain serial loop (one process, one region after
the other) over the same recipes, regions and seeds."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import Figure, best_times
from grainlab.config import Params, apply_overrides
from grainlab.datasets.recipes import build_tem_datasets

CPU = torch.device("cpu")


def scaled(params: Params, regions: int | None, image_px: int | None) -> Params:
    """The recipes with at most `regions` regions each (None: as configured) at `image_px` px."""
    over = {}
    if regions is not None:
        over.update(
            {f"recipes.{name}.regions": min(regions, r.regions) for name, r in params.recipes.items()}
        )
        over["test_set.regions"] = min(regions, params.test_set.regions)
    if image_px is not None:
        over["tem.image_px"] = image_px
    return apply_overrides(params, over, "benchmark") if over else params


def synth_figures(
    params: Params, profile: str, regions: int | None, image_px: int | None, repeats: int = 1
) -> list[Figure]:
    params = scaled(params, regions, image_px)
    workers = params.data.workers
    counts = {}

    def build(n: int):
        with tempfile.TemporaryDirectory() as tmp:
            counts.update(build_tem_datasets(params, Path(tmp), workers=n, progress=False))

    t_fast, t_ref = best_times([lambda: build(workers), lambda: build(1)], repeats, CPU, warmup=False)
    pairs = sum(counts.values())
    rates = {"grainlab": pairs / t_fast, "reference": pairs / t_ref}
    return [
        Figure(
            "synth",
            "data synthesis",
            "pairs/s",
            rates["grainlab"],
            rates["reference"],
            f"{profile}: {pairs} pairs ({len(counts)} datasets, {params.tem.image_px} px, written as "
            f"{params.data.image_format}); grainlab {workers} worker processes; reference serial, one process; "
            f"best of {repeats} interleaved rounds",
            {"pairs": pairs, "workers": workers, "image_px": params.tem.image_px},
        )
    ]
