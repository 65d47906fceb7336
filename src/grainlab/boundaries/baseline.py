"""The classical baseline, no learning: smoothed gradient magnitude + marker watershed.

Grains are regions of even intensity, so the gradient is low inside them. Markers are
the connected low-gradient areas (below a percentile of the gradient); the watershed of
the gradient from these markers draws one-pixel lines between grains.
"""

from __future__ import annotations

import numpy as np
from skimage import filters, measure, morphology, segmentation


def trace_classical(
    image: np.ndarray, sigma: float = 2.0, marker_percentile: float = 30.0, min_marker_px: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """A grey or RGB float image -> (gradient map scaled to [0, 1], one-pixel tracing)."""
    grey = image if image.ndim == 2 else image[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    gradient = filters.sobel(filters.gaussian(grey, sigma=sigma))
    low = gradient < np.percentile(gradient, marker_percentile)
    markers = measure.label(morphology.remove_small_objects(low, max_size=min_marker_px - 1))
    if markers.max() < 2:
        return gradient / max(gradient.max(), 1e-12), np.zeros(grey.shape, bool)
    regions = segmentation.watershed(gradient, markers, watershed_line=True)
    return (gradient / max(gradient.max(), 1e-12)).astype(np.float32), regions == 0
