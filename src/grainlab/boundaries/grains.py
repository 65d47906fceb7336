"""From a boundary probability map to a one-pixel tracing, grains and grain statistics.

Post-processing (method 'skeleton') follows Patrick et al. 2023: hysteresis threshold,
dilation, filling small holes, skeletonising and pruning spurs. Method 'watershed' floods
the probability map from its low regions instead, so every boundary closes. Grains are
the 4-connected regions between the one-pixel boundaries.

Grain size by the Heyn lineal-intercept method: horizontal and vertical test lines every
`spacing` px; each run of boundary pixels a line crosses is one intercept; the mean
lineal intercept is total line length / intercepts. ASTM E112 grain size number from the
mean lineal intercept l (in mm):  G = -6.643856 * log10(l) - 3.288.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage import filters, measure, morphology, segmentation

_NEIGHBOURS = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]])


@dataclass(frozen=True)
class Postprocess:
    """Settings of `trace_boundaries` and `label_grains` (mirrors config.PostprocessConfig)."""

    method: str = "watershed"
    smooth_px: float = 2.0
    marker_depth: float = 0.005
    low: float = 0.3
    high: float = 0.6
    dilate_px: int = 1
    min_hole_px: int = 16
    spur_px: int = 10
    min_grain_px: int = 20
    drop_edge_grains: bool = False
    border_px: int = 0


def prune_spurs(skeleton: np.ndarray, max_length: int, passes: int = 2) -> np.ndarray:
    """Remove branches shorter than max_length px that end free inside the image.

    A branch is walked from its free end to the first junction; branches ending on the
    image border are kept (the boundary goes on outside the image).
    """
    skel = skeleton.astype(bool).copy()
    if max_length <= 0:
        return skel
    h, w = skel.shape
    for _ in range(passes):
        count = ndimage.convolve(skel.astype(np.uint8), _NEIGHBOURS, mode="constant") * skel
        removed = False
        for y, x in zip(*np.nonzero(count == 1), strict=False):
            if y in (0, h - 1) or x in (0, w - 1):
                continue
            path = [(y, x)]
            while len(path) <= max_length:
                cy, cx = path[-1]
                nbrs = [
                    (cy + dy, cx + dx)
                    for dy in (-1, 0, 1)
                    for dx in (-1, 0, 1)
                    if 0 <= cy + dy < h
                    and 0 <= cx + dx < w
                    and skel[cy + dy, cx + dx]
                    and (cy + dy, cx + dx) not in path
                ]
                if len(nbrs) != 1:
                    break  # next to a junction, or the end of an isolated fragment
                path.append(nbrs[0])
            if len(path) <= max_length:
                for p in path:
                    skel[p] = False
                removed = True
        if not removed:
            break
    return skel


def ignore_border(prob: np.ndarray, border_px: int) -> np.ndarray:
    """The map with a band of `border_px` px along each image edge replaced by the values just
    inside it, copied outwards perpendicular to the edge.

    A bright or dark scan edge (the frame of a micrograph, a cut edge) makes a line parallel
    to the border that is not a grain boundary: in the band it is overwritten. A boundary that
    crosses the band runs on unchanged to the edge, so grains at the edge stay closed.
    """
    b = int(border_px)
    h, w = prob.shape
    if b <= 0 or h <= 2 * b or w <= 2 * b:
        return prob
    return np.pad(prob[b : h - b, b : w - b], b, mode="edge")


def trace_boundaries(prob: np.ndarray, post: Postprocess = Postprocess()) -> np.ndarray:
    """Probability map -> one-pixel boundary tracing (bool), by post.method; the border band
    (post.border_px) is ignored first (see `ignore_border`)."""
    prob = ignore_border(prob, post.border_px)
    if post.method == "watershed":
        return watershed_boundaries(prob, post)
    return skeleton_boundaries(prob, post)


def watershed_boundaries(prob: np.ndarray, post: Postprocess = Postprocess()) -> np.ndarray:
    """Closed one-pixel boundaries: watershed of the smoothed probability from its basins.

    The map is smoothed (Gaussian, post.smooth_px); every minimum at least post.marker_depth
    deep seeds one grain, and the watershed lines between the grains are the boundaries.
    """
    smooth = filters.gaussian(prob, post.smooth_px) if post.smooth_px > 0 else prob
    markers = measure.label(morphology.h_minima(smooth, post.marker_depth))
    if markers.max() < 2:
        return np.zeros(prob.shape, bool)
    return segmentation.watershed(smooth, markers, watershed_line=True) == 0


def skeleton_boundaries(prob: np.ndarray, post: Postprocess = Postprocess()) -> np.ndarray:
    """Patrick et al. 2023: hysteresis threshold, dilation, hole filling, skeleton, spur pruning."""
    mask = filters.apply_hysteresis_threshold(prob, post.low, post.high)
    if post.dilate_px > 0:
        mask = ndimage.binary_dilation(mask, morphology.disk(post.dilate_px))
    if post.min_hole_px > 0:
        mask = morphology.remove_small_holes(mask, max_size=post.min_hole_px)
    # a frame of boundary around the image keeps lines that run off the edge from retracting
    framed = morphology.skeletonize(np.pad(mask, 1, constant_values=True))[1:-1, 1:-1]
    return prune_spurs(framed, post.spur_px)


def label_grains(tracing: np.ndarray, post: Postprocess = Postprocess()) -> np.ndarray:
    """One-pixel tracing -> grain instance map (int32, 0 on boundaries and dropped grains)."""
    labels = measure.label(~tracing.astype(bool), connectivity=1)
    if post.min_grain_px > 0:
        small = np.bincount(labels.ravel()) < post.min_grain_px
        small[0] = False
        labels[small[labels]] = 0
    if post.drop_edge_grains:
        labels = segmentation.clear_border(labels)
    labels, _, _ = segmentation.relabel_sequential(labels)
    return labels.astype(np.int32)


def fill_partition(labels: np.ndarray) -> np.ndarray:
    """Grow grains over boundary pixels so that the labels cover the image (for VI and Rand)."""
    if labels.max() == 0:
        return np.ones_like(labels)
    return segmentation.expand_labels(labels, distance=max(labels.shape)).astype(np.int32)


def heyn_counts(tracing: np.ndarray, spacing: int = 8) -> tuple[int, int]:
    """(total test-line length px, boundary crossings) of the Heyn grid on one tracing; the
    counts of several fields add up to their pooled mean intercept."""
    t = tracing.astype(bool)
    lines = [t[y, :] for y in range(spacing // 2, t.shape[0], spacing)]
    lines += [t[:, x] for x in range(spacing // 2, t.shape[1], spacing)]
    length = sum(len(line) for line in lines)
    crossings = sum(int(np.count_nonzero(np.diff(line.astype(np.int8)) == 1) + line[0]) for line in lines)
    return length, crossings


def heyn_intercept(tracing: np.ndarray, spacing: int = 8) -> float:
    """Mean lineal intercept in px (Heyn): test-line length per boundary crossing; inf if none."""
    length, crossings = heyn_counts(tracing, spacing)
    return length / crossings if crossings else float("inf")


def astm_grain_size(intercept_mm: float) -> float:
    """ASTM E112 grain size number G from the mean lineal intercept in mm."""
    if not np.isfinite(intercept_mm) or intercept_mm <= 0:
        return float("nan")
    return float(-6.643856 * np.log10(intercept_mm) - 3.288)


@dataclass(frozen=True)
class GrainStats:
    """Grain statistics of one image; lengths in px, and in nm when the pixel size is known."""

    count: int
    mean_area_px: float
    mean_diameter_px: float
    heyn_intercept_px: float
    pixel_size_nm: float | None
    heyn_intercept_nm: float | None
    astm_g: float | None

    def to_dict(self) -> dict:
        """As plain values; infinite or NaN numbers (no boundary crossed) become None."""
        return {
            k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in asdict(self).items()
        }


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent circle diameter sqrt(4 A / pi) of every grain, in px."""
    areas = np.bincount(labels.ravel())[1:]
    return np.sqrt(4 * areas[areas > 0] / np.pi)


def grain_table(labels: np.ndarray, pixel_size_nm: float | None = None) -> list[dict]:
    """One row per grain: id, area, equivalent diameter, centroid (px, and nm when known)."""
    rows = []
    for region in measure.regionprops(labels):
        row = {
            "grain": region.label,
            "area_px": int(region.area),
            "diameter_px": float(np.sqrt(4 * region.area / np.pi)),
            "centroid_y": float(region.centroid[0]),
            "centroid_x": float(region.centroid[1]),
        }
        if pixel_size_nm:
            row["area_nm2"] = row["area_px"] * pixel_size_nm**2
            row["diameter_nm"] = row["diameter_px"] * pixel_size_nm
        rows.append(row)
    return rows


def grain_stats(tracing: np.ndarray, labels: np.ndarray, pixel_size_nm: float | None = None) -> GrainStats:
    diameters = equivalent_diameters(labels)
    intercept = heyn_intercept(tracing)
    intercept_nm = intercept * pixel_size_nm if pixel_size_nm else None
    return GrainStats(
        count=int(len(diameters)),
        mean_area_px=float(np.mean(np.pi * diameters**2 / 4)) if len(diameters) else 0.0,
        mean_diameter_px=float(diameters.mean()) if len(diameters) else 0.0,
        heyn_intercept_px=float(intercept),
        pixel_size_nm=pixel_size_nm,
        heyn_intercept_nm=intercept_nm,
        astm_g=astm_grain_size(intercept_nm * 1e-6) if intercept_nm else None,
    )
