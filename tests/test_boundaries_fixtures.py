"""Small synthetic grain images for the boundary tests (imported by the other test_boundaries_* files).

A Voronoi tessellation gives exact grains; its one-pixel boundary network is the exact
truth; a noisy grey image with a random intensity per grain is the micrograph; the
boundaries widened to 3 px are the "hand tracing" used for training.
"""

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from grainlab.images import write_image, write_labels, write_mask


def voronoi_grains(size: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, size, (n, 2))
    yy, xx = np.mgrid[:size, :size]
    d = (yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2
    return (d.argmin(axis=2) + 1).astype(np.int32)


def boundary_network(labels: np.ndarray) -> np.ndarray:
    """One-pixel boundaries: pixels whose right or lower neighbour is another grain."""
    b = np.zeros(labels.shape, bool)
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return b


def micrograph(labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shade = rng.uniform(0.25, 0.75, labels.max() + 1)
    img = shade[labels]
    img[boundary_network(labels)] = 0.1
    img = ndimage.gaussian_filter(img, 1.0) + rng.normal(0, 0.04, labels.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def grain_map(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    out[boundary_network(labels)] = 0
    return out


def write_dataset(
    root: Path, regions: int = 3, per_region: int = 2, size: int = 64, grains: int = 12, seed: int = 0
):
    """A training dataset folder (images/, labels/, manifest.json) with `regions` regions."""
    pairs = []
    for r in range(regions):
        labels = voronoi_grains(size, grains, seed * 1000 + r)
        tracing = ndimage.binary_dilation(boundary_network(labels), iterations=1)
        for k in range(per_region):
            name = f"r{r:03d}-{k}"
            write_image(root / "images" / f"{name}.png", micrograph(labels, seed * 1000 + r * 10 + k))
            write_mask(root / "labels" / f"{name}.png", tracing)
            pairs.append(
                {"image": f"images/{name}.png", "label": f"labels/{name}.png", "region": f"r{r:03d}"}
            )
    manifest = {"name": root.name, "pixel_size_nm": 2.0, "channels": 1, "pairs": pairs}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_test_set(root: Path, count: int = 2, size: int = 96, grains: int = 15, seed: int = 99):
    """A held-out test set folder with exact boundaries and grain maps."""
    pairs = []
    for i in range(count):
        labels = voronoi_grains(size, grains, seed + i)
        name = f"t{i:03d}"
        write_image(root / "images" / f"{name}.png", micrograph(labels, seed + 50 + i))
        write_mask(root / "labels" / f"{name}.png", boundary_network(labels))
        write_labels(root / "grains" / f"{name}.png", grain_map(labels))
        pairs.append(
            {
                "image": f"images/{name}.png",
                "label": f"labels/{name}.png",
                "grains": f"grains/{name}.png",
                "region": f"t{i}",
            }
        )
    (root / "manifest.json").write_text(json.dumps({"name": "test", "pixel_size_nm": 2.0, "pairs": pairs}))
    return root


def write_data_root(data_root: Path, datasets=("toy",), **kw) -> Path:
    """data/grain_boundaries/<name>/ for each dataset plus data/grain_boundaries/test/."""
    base = data_root / "grain_boundaries"
    for i, name in enumerate(datasets):
        write_dataset(base / name, seed=i, **kw)
    write_test_set(base / "test")
    return data_root


def test_fixture_boundaries_separate_the_grains():
    labels = voronoi_grains(48, 8, 0)
    net = boundary_network(labels)
    assert 0.05 < net.mean() < 0.3
    assert len(np.unique(grain_map(labels))) == 9  # 8 grains + boundary 0
