"""The on-disk layout of a grain-boundary dataset, shared by synthetic and imported data.

    <root>/images/<name>.png      micrographs (grey or RGB)
    <root>/labels/<name>.png      boundary tracings, white on black
    <root>/manifest.json          {"name", "kind", "pixel_size_nm", "channels", "pairs": [...]}

Each pair in the manifest names its image, label and region (the area of the specimen it
shows; train/validation splits never put one region on both sides), plus free metadata
(tilt, tracer settings, ...). The held-out test set adds `grains/` (instance maps) and
`labels/` holds the exact boundary network there; a synthetic test set also names, per image,
the boundaries visible at its tilt (`visible`, image frame) and a perfect composite tracing of
its region's tilt series (`composite`, reference frame).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grainlab.errors import GrainlabError
from grainlab.images import write_json

MANIFEST = "manifest.json"


class DatasetError(GrainlabError):
    pass


@dataclass(frozen=True)
class Pair:
    image: Path
    label: Path
    region: str
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path
    pairs: list[Pair]
    pixel_size_nm: float | None
    channels: int

    @property
    def regions(self) -> list[str]:
        return sorted({p.region for p in self.pairs})


@dataclass(frozen=True)
class TestItem:
    name: str
    image: Path
    boundaries: Path
    grains: Path
    region: str
    pixel_size_nm: float | None
    visible: Path | None = None  # the boundaries visible at this image's tilt (None: not known)
    composite: Path | None = None  # every boundary seen in the region's tilt series, reference frame


def _inside(root: Path, rel: str, what: str, manifest: Path) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DatasetError(f"{manifest}: {what} path {rel!r} points outside the dataset folder {root}")
    if not path.is_file():
        raise DatasetError(f"{manifest}: {what} file {rel!r} does not exist")
    return path


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"{root}: no {MANIFEST}; expected a dataset folder made by `grainlab data synth` or `grainlab data import`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("pairs"), list):
        raise DatasetError(f"{path}: expected an object with a 'pairs' list")
    return manifest


def load_dataset(root: str | Path) -> Dataset:
    """Read a dataset folder; every pair's files must exist inside it."""
    root = Path(root)
    manifest = read_manifest(root)
    path = root / MANIFEST
    pairs = []
    for i, entry in enumerate(manifest["pairs"]):
        try:
            image, label, region = entry["image"], entry["label"], str(entry["region"])
        except (KeyError, TypeError):
            raise DatasetError(f"{path}: pairs[{i}] needs 'image', 'label' and 'region'") from None
        meta = {k: v for k, v in entry.items() if k not in ("image", "label", "region")}
        pairs.append(
            Pair(_inside(root, image, "image", path), _inside(root, label, "label", path), region, meta)
        )
    if not pairs:
        raise DatasetError(f"{path}: the dataset has no pairs")
    return Dataset(
        name=str(manifest.get("name", root.name)),
        root=root,
        pairs=pairs,
        pixel_size_nm=manifest.get("pixel_size_nm"),
        channels=int(manifest.get("channels", 1)),
    )


def load_test_set(root: str | Path) -> list[TestItem]:
    """The held-out test set: images with their exact boundary networks and grain maps (and, where
    the manifest names them, the visible boundaries and the composite tracing)."""
    root = Path(root)
    manifest = read_manifest(root)
    path = root / MANIFEST
    items = []
    for i, entry in enumerate(manifest["pairs"]):
        if "grains" not in entry:
            raise DatasetError(f"{path}: pairs[{i}] has no 'grains' map; a test set needs exact truth")
        items.append(
            TestItem(
                name=Path(entry["image"]).stem,
                image=_inside(root, entry["image"], "image", path),
                boundaries=_inside(root, entry["label"], "label", path),
                grains=_inside(root, entry["grains"], "grains", path),
                region=str(entry["region"]),
                pixel_size_nm=entry.get("pixel_size_nm", manifest.get("pixel_size_nm")),
                **{
                    key: _inside(root, entry[key], key, path)
                    for key in ("visible", "composite")
                    if key in entry
                },
            )
        )
    return items


def split_by_region(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into train and validation so that no region is on both sides."""
    regions = sorted({p.region for p in pairs})
    if len(regions) < 2:
        raise DatasetError(f"need at least 2 regions to split train/validation by region, found {regions}")
    order = np.random.default_rng(seed).permutation(len(regions))
    n_val = min(len(regions) - 1, max(1, round(len(regions) * val_fraction)))
    val_regions = {regions[i] for i in order[:n_val]}
    train = [p for p in pairs if p.region not in val_regions]
    val = [p for p in pairs if p.region in val_regions]
    return train, val


def check_folder_path(path: str | Path, what: str) -> Path:
    """`path` is, or can be made, a folder: neither it nor a parent is an existing file.

    `what` names the setting in the message, e.g. "--out".
    """
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            break
        if p.exists() or p.is_symlink():
            what_is = "it exists and is not a folder" if p == path else f"{p} exists and is not a folder"
            raise DatasetError(
                f"{what} {path}: {what_is}; expected a folder (or a path where one can be made)"
            )
    return path


def write_manifest(root: Path, manifest: dict):
    write_json(root / MANIFEST, manifest, sort_keys=True)
