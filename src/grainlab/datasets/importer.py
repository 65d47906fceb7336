"""Import real micrographs with hand tracings into the dataset layout (see folder.py).

Micrographs and tracings are matched by file stem. Tracings may be drawn white-on-black
or black-on-white, anti-aliased or not: they are thresholded and stored white-on-black.
The dataset is built in a temporary folder and renamed into place only when every file
passed its checks, so a failed import leaves nothing behind. An existing dataset is only
replaced when asked (replace=True, `--replace`), and never one that `grainlab data synth`
writes (a recipe or the test set).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from grainlab.datasets.folder import MANIFEST, DatasetError, check_folder_path, write_manifest
from grainlab.images import (
    IMAGE_SUFFIXES,
    list_images,
    read_image,
    read_mask,
    remove_stale_stages,
    staged_dir,
    write_image,
    write_mask,
)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
IMAGE_DIRS = ("images", "micrographs")
MASK_DIRS = ("masks", "labels", "tracings")


def _find_dir(src: Path, explicit: str | None, candidates: tuple[str, ...], what: str) -> Path:
    if explicit:
        path = Path(explicit) if Path(explicit).is_absolute() else src / explicit
        if not path.is_dir():
            raise DatasetError(f"{path}: {what} folder not found")
        return path
    for name in candidates:
        if (src / name).is_dir():
            return src / name
    raise DatasetError(f"{src}: no {what} folder; expected one of {list(candidates)} (or pass it explicitly)")


def _by_stem(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in files:
            raise DatasetError(
                f"{folder}: two files share the stem {path.stem!r}: {files[path.stem].name}, {path.name}"
            )
        files[path.stem] = path
    return files


def check_name(name: str) -> str:
    """A dataset name is one plain folder name: no separators, no '..', no hidden files."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise DatasetError(
            f"dataset name {name!r} is not a plain folder name; expected letters, digits, '-', '_' or '.'"
        )
    return name


def _synthetic_kind(folder: Path) -> str | None:
    """The manifest's kind when `folder` holds synthetic data, else None."""
    try:
        kind = json.loads((folder / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) and kind.startswith("synthetic") else None


def check_target(dest_root: Path, name: str, *, replace: bool, reserved: Iterable[str]) -> Path:
    """The folder an import may write: not a synthetic dataset's, not an existing one unless `replace`."""
    reserved = sorted(reserved)
    if name.casefold() in {r.casefold() for r in reserved}:
        raise DatasetError(
            f"dataset name {name!r} belongs to the synthetic data (`grainlab data synth` writes "
            f"{reserved}); choose another --name"
        )
    check_folder_path(dest_root, "dataset folder")
    target = dest_root / name
    if target.exists() or target.is_symlink():
        kind = _synthetic_kind(target)
        if kind is not None:
            raise DatasetError(
                f"{target}: dataset {name!r} is synthetic data (kind {kind!r}) from `grainlab data synth`; "
                "an import never replaces it; choose another --name"
            )
        if not replace:
            raise DatasetError(
                f"{target}: dataset {name!r} already exists; pass --replace to overwrite it, "
                "or choose another --name"
            )
    return target


def _regions(stems: Iterable[str], region_re: re.Pattern, images: dict[str, Path]) -> dict[str, str]:
    """The region of every stem: the pattern's first group (or whole match); every stem must match."""
    regions, misses = {}, []
    for stem in stems:
        match = region_re.search(stem)
        region = (match.group(1) if region_re.groups else match.group(0)) if match else None
        if region:
            regions[stem] = region
        else:
            misses.append(stem)
    if misses:
        raise DatasetError(
            f"--region-pattern {region_re.pattern!r}: no region in the stem {misses[0]!r} of "
            f"{images[misses[0]]} ({len(misses)} of {len(misses) + len(regions)} stems do not match); "
            "expected a regex whose first group is the region id in every file stem"
        )
    return regions


def import_dataset(
    src: str | Path,
    dest_root: str | Path,
    name: str,
    *,
    pixel_size_nm: float | None = None,
    images_dir: str | None = None,
    masks_dir: str | None = None,
    region_pattern: str = r"^([^-_]+)",
    max_pixels: int = 100_000_000,
    replace: bool = False,
    reserved: Iterable[str] | None = None,
) -> dict:
    """Check and copy a folder of micrographs + tracings into dest_root/name; return the manifest.

    An existing dest_root/name is replaced only with `replace`; a name in `reserved`
    (default: the names `grainlab data synth` writes) or a synthetic dataset never is.
    """
    from grainlab.datasets.recipes import synthetic_names

    src, dest_root = Path(src), Path(dest_root)
    check_name(name)
    target = check_target(
        dest_root, name, replace=replace, reserved=synthetic_names() if reserved is None else reserved
    )
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder not found")
    if pixel_size_nm is not None and not (np.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise DatasetError(
            f"--pixel-size {pixel_size_nm}: expected a positive number of nanometres per pixel"
        )
    try:
        region_re = re.compile(region_pattern)
    except re.error as exc:
        raise DatasetError(
            f"--region-pattern {region_pattern!r}: not a valid regular expression ({exc})"
        ) from None

    images = _by_stem(_find_dir(src, images_dir, IMAGE_DIRS, "micrograph"))
    masks = _by_stem(_find_dir(src, masks_dir, MASK_DIRS, "tracing"))
    if not images:
        raise DatasetError(f"{src}: no micrographs ({', '.join(IMAGE_SUFFIXES)}) found")
    lonely_images = sorted(set(images) - set(masks))
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_images or lonely_masks:
        parts = []
        if lonely_images:
            parts.append(f"micrographs without a tracing: {[images[s].name for s in lonely_images]}")
        if lonely_masks:
            parts.append(f"tracings without a micrograph: {[masks[s].name for s in lonely_masks]}")
        raise DatasetError(f"{src}: " + "; ".join(parts))
    regions = _regions(sorted(images), region_re, images)

    pairs, channels = [], 1
    loaded = []
    for stem in sorted(images):
        img_path, mask_path = images[stem], masks[stem]
        rgb = read_image(img_path, channels="rgb", max_pixels=max_pixels)
        is_grey = np.allclose(rgb[..., 0], rgb[..., 1]) and np.allclose(rgb[..., 1], rgb[..., 2])
        image = rgb[..., 0] if is_grey else rgb
        mask = read_mask(mask_path, max_pixels=max_pixels)
        if mask.shape != image.shape[:2]:
            raise DatasetError(
                f"size mismatch: micrograph {img_path} is {image.shape[1]}x{image.shape[0]} but "
                f"tracing {mask_path} is {mask.shape[1]}x{mask.shape[0]}"
            )
        if not mask.any():
            raise DatasetError(f"{mask_path}: the tracing is empty (no boundary pixels)")
        channels = max(channels, 1 if is_grey else 3)
        loaded.append((stem, image, mask, regions[stem], img_path, mask_path))

    remove_stale_stages(target)  # leftovers of an interrupted import under this name
    with staged_dir(target) as tmp:
        for stem, image, mask, region, img_path, mask_path in loaded:
            rel_img, rel_mask = f"images/{stem}.png", f"labels/{stem}.png"
            for rel in (rel_img, rel_mask):
                if not (tmp / rel).resolve().is_relative_to(tmp.resolve()):
                    raise DatasetError(f"{img_path}: file name would be written outside the dataset folder")
            if channels == 3 and image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            write_image(tmp / rel_img, image)
            write_mask(tmp / rel_mask, mask)
            pairs.append(
                {
                    "image": rel_img,
                    "label": rel_mask,
                    "region": region,
                    "source_image": img_path.name,
                    "source_label": mask_path.name,
                }
            )
        manifest = {
            "name": name,
            "kind": "imported",
            "source": str(src),
            "pixel_size_nm": pixel_size_nm,
            "channels": channels,
            "pairs": pairs,
        }
        write_manifest(tmp, manifest)
    return manifest
