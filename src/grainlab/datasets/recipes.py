"""The poster's dataset recipes, built from synthetic BF TEM tilt series.

A recipe says how many regions are imaged, how many (image, tracing) pairs each region
gives, whether the tilts come from the fixed stage grid (`grid`: the same tilts for every
region) or are drawn at random (`unique`), whether one composite tracing serves the whole
tilt series (`composite`) or each image gets its own tracing of what it shows
(`per_image`), the fraction of repeat exposures of an already used tilt
(`duplicate_fraction`), and which simulated tracer draws the labels.

Every region is generated from its own seed (params seed, recipe name, region index), so
the output is byte-identical on any machine and independent of the number of workers.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from grainlab.config import Params, RecipeConfig
from grainlab.datasets.folder import write_manifest
from grainlab.images import (
    process_pool,
    remove_stale_stages,
    staged_dir,
    write_image,
    write_labels,
    write_mask,
)
from grainlab.synth import tem

TEST_SET = "test"


def synthetic_names(params: Params | None = None) -> list[str]:
    """The dataset folders `grainlab data synth` writes: every recipe (the built-in ones and
    those of `params`) and the held-out test set. No import may take these names."""
    names = set(Params().recipes) | {TEST_SET}
    if params is not None:
        names |= set(params.recipes)
    return sorted(names)


def region_rng(seed: int, dataset: str, region: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(dataset.encode()), region]))


def choose_tilts(recipe: RecipeConfig, params: Params, rng) -> list[tuple[float, float]]:
    """The (alpha, beta) stage tilts of one region's pairs, repeat exposures included."""
    n = recipe.pairs_per_region
    n_unique = n - round(n * recipe.duplicate_fraction)
    t = params.tilts
    if recipe.tilt_mode == "grid":
        grid = t.grid_alpha_deg
        idx = np.round(np.linspace(0, len(grid) - 1, n_unique)).astype(int)
        distinct = [(float(grid[i]), t.grid_beta_deg) for i in idx]
    else:
        alpha = rng.uniform(-t.max_alpha_deg, t.max_alpha_deg, n_unique)
        beta = rng.uniform(-t.max_beta_deg, t.max_beta_deg, n_unique)
        distinct = [(round(float(a), 2), round(float(b), 2)) for a, b in zip(alpha, beta, strict=True)]
    repeats = [distinct[i] for i in rng.integers(0, n_unique, n - n_unique)]
    return distinct + repeats


def max_tilts(params: Params, recipe: RecipeConfig | None = None) -> tuple[float, float]:
    """The largest |alpha|, |beta| a recipe (None: the test set) uses: sets the specimen margin."""
    t = params.tilts
    if recipe is not None and recipe.tilt_mode == "grid":
        return max((abs(a) for a in t.grid_alpha_deg), default=0.0), abs(t.grid_beta_deg)
    return t.max_alpha_deg, t.max_beta_deg


def _image_path(name: str, fmt: str) -> str:
    return f"images/{name}.{'tif' if fmt == 'tiff16' else 'png'}"


def build_region(params: Params, dataset: str, index: int, out: Path) -> list[dict]:
    """Generate one region of a recipe (or of the test set), write its files, return its pairs."""
    rng = region_rng(params.seed, dataset, index)
    cfg, fmt = params.tem, params.data.image_format
    region = tem.make_region(cfg, rng, max_tilts(params, params.recipes.get(dataset)))
    rid = f"r{index:03d}"
    truth = out / "truth"  # region files: the reference view (untilted, undrifted), as composite tracings
    write_labels(truth / f"{rid}_grains.png", tem.sequential_grains(region.reference(region.grains)))
    write_mask(truth / f"{rid}_boundaries.png", region.reference(region.boundaries))

    if dataset == TEST_SET:
        n = params.test_set.tilts_per_region
        t = params.tilts
        tilts = [
            (round(float(a), 2), round(float(b), 2))
            for a, b in zip(
                rng.uniform(-t.max_alpha_deg, t.max_alpha_deg, n),
                rng.uniform(-t.max_beta_deg, t.max_beta_deg, n),
                strict=True,
            )
        ]
        recipe, tracer = None, None
    else:
        recipe = params.recipes[dataset]
        tracer = params.tracers[recipe.tracer]
        tilts = choose_tilts(recipe, params, rng)

    rendered = [tem.render(region, cfg, a, b, rng) for a, b in tilts]
    union = np.logical_or.reduce([shot.visible for shot in rendered])  # every boundary the series shows
    pairs = []
    if recipe is None:
        # A perfect composite tracing of the series, in the reference view as one is drawn: scored in each
        # image's frame it gives the composite ceiling (the tilt misalignment alone).
        composite = f"truth/composite/{rid}.png"
        write_mask(out / composite, region.reference(union))
    elif recipe.label_mode == "composite":
        # One tracing of the whole series, drawn in the reference view: it misaligns with tilted and
        # drifted exposures as a real composite tracing does.
        guide = tem.bend_contour_map(region, cfg, *tilts[0])
        composite = f"labels/{rid}.png"
        write_mask(out / composite, region.reference(tem.trace(region, union, tracer, rng, guide)))

    for k, ((alpha, beta), shot) in enumerate(zip(tilts, rendered, strict=True)):
        name = f"{rid}_{k:02d}"
        img_rel = _image_path(name, fmt)
        write_image(out / img_rel, shot.image, bits=16 if fmt == "tiff16" else 8)
        grains, boundaries, visible = tem.image_truth(region, shot.affine, shot.visible)
        write_mask(truth / "visible" / f"{name}.png", visible)
        entry = {
            "image": img_rel,
            "region": rid,
            "tilt_deg": [alpha, beta],
            "pixel_size_nm": cfg.pixel_nm,
            "visible": f"truth/visible/{name}.png",
            # true transform, reference-view pixels (x, y, 1) -> this image's pixels
            "affine": [[round(float(v), 6) for v in row] for row in shot.affine],
        }
        if recipe is None:
            entry["label"] = f"labels/{name}.png"
            entry["grains"] = f"grains/{name}.png"
            entry["composite"] = composite
            write_mask(out / entry["label"], boundaries)
            write_labels(out / entry["grains"], grains)
        elif recipe.label_mode == "composite":
            entry["label"] = composite
        else:
            # The tracer draws on the image itself: the tracing is in the image frame.
            entry["label"] = f"labels/{name}.png"
            guide = tem.bend_contour_map(region, cfg, alpha, beta)
            traced = tem.trace(region, shot.visible, tracer, rng, guide)
            write_mask(out / entry["label"], tem.warp_to_image(region, shot.affine, traced, "mask"))
        if recipe is not None:
            entry.update(label_mode=recipe.label_mode, tracer=recipe.tracer, tracer_settings=asdict(tracer))
        pairs.append(entry)
    return pairs


def _build_region_job(job):
    params, dataset, index, out = job
    return build_region(params, dataset, index, out)


def build_tem_datasets(
    params: Params, out_root: Path | Mapping[str, Path], workers: int = 1, progress: bool = True
) -> dict[str, int]:
    """Write every recipe and the held-out test set; return pair counts by dataset.

    `out_root` is the folder that receives one sub-folder per dataset, or a mapping from
    each dataset name to its own folder.
    """
    names = [*params.recipes, TEST_SET]
    folders = (
        {n: Path(out_root[n]) for n in names}
        if isinstance(out_root, Mapping)
        else {n: Path(out_root) / n for n in names}
    )
    jobs = []
    for name, recipe in params.recipes.items():
        jobs += [(params, name, i, folders[name]) for i in range(recipe.regions)]
    jobs += [(params, TEST_SET, i, folders[TEST_SET]) for i in range(params.test_set.regions)]

    results = {}
    bar = tqdm(total=len(jobs), desc="tem regions", unit="region", disable=not progress)
    if workers > 1:
        with process_pool(workers) as pool:
            for job, pairs in zip(jobs, pool.map(_build_region_job, jobs, chunksize=1), strict=True):
                results[(job[1], job[2])] = pairs
                bar.update()
    else:
        for job in jobs:
            results[(job[1], job[2])] = _build_region_job(job)
            bar.update()
    bar.close()

    counts = {}
    for dataset in names:
        pairs = [p for (d, _), ps in sorted(results.items()) if d == dataset for p in ps]
        manifest = {
            "name": dataset,
            "kind": "synthetic-tem",
            "pixel_size_nm": params.tem.pixel_nm,
            "channels": 1,
            "seed": params.seed,
            "tem": asdict(params.tem),
            "pairs": pairs,
        }
        if dataset != TEST_SET:
            manifest["recipe"] = asdict(params.recipes[dataset])
        write_manifest(folders[dataset], manifest)
        counts[dataset] = len(pairs)
    return counts


def synthesize_tem(
    params: Params, datasets_root: Path, workers: int = 1, progress: bool = True
) -> tuple[dict[str, int], list[Path]]:
    """Regenerate the recipes and the test set under datasets_root, each folder swapped in atomically.

    Only the folders this generator writes are replaced; any other dataset there (an
    imported one) is left alone. Leftovers of an interrupted run (temporary folders beside
    them) are removed first. Returns the pair counts and the leftovers removed.
    """
    datasets_root = Path(datasets_root)
    names = [*params.recipes, TEST_SET]
    # An older grainlab staged the whole datasets_root; its leftovers sit beside it.
    removed = remove_stale_stages(datasets_root)
    for name in names:
        removed += remove_stale_stages(datasets_root / name)
    with contextlib.ExitStack() as stack:
        folders = {name: stack.enter_context(staged_dir(datasets_root / name)) for name in names}
        counts = build_tem_datasets(params, folders, workers=workers, progress=progress)
    return counts, removed
