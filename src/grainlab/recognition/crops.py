"""Random crops of random physical size, resampled to a fixed size; the crop's px/um is its magnification."""

from __future__ import annotations

import math

import cv2
import numpy as np

from grainlab.errors import GrainlabError


def check_px_per_um(value, what: str = "px_per_um") -> float:
    """The magnification as a positive finite float; a GrainlabError naming `what` otherwise."""
    try:
        m = float(value)
    except (TypeError, ValueError):
        raise GrainlabError(
            f"{what} = {value!r}: expected the magnification in pixels per micrometre, a positive number"
        ) from None
    if not math.isfinite(m) or m <= 0:
        raise GrainlabError(
            f"{what} = {value!r}: expected the magnification in pixels per micrometre, a positive number"
        )
    return m


def check_size(shape, crop_min_px: int, what: str = "image") -> None:
    h, w = shape[:2]
    if min(h, w) < crop_min_px:
        raise GrainlabError(
            f"{what}: {w}x{h} pixels is smaller than the smallest crop ({crop_min_px} px, recognition.crop_min_px); "
            "expected an image at least that large"
        )


def sample_boxes(rng: np.random.Generator, shape, n: int, crop_min_px: int, crop_max_px: int) -> np.ndarray:
    """n square boxes (top, left, side) inside an image; sides log-uniform in [crop_min_px, crop_max_px]."""
    h, w = shape[:2]
    hi = min(crop_max_px, h, w)
    side = np.exp(rng.uniform(np.log(crop_min_px), np.log(hi + 1), n)).astype(int).clip(crop_min_px, hi)
    top = (rng.uniform(size=n) * (h - side + 1)).astype(int)
    left = (rng.uniform(size=n) * (w - side + 1)).astype(int)
    return np.stack([top, left, side], axis=1)


def extract(img: np.ndarray, boxes: np.ndarray, out_px: int) -> np.ndarray:
    """The boxes of a grey image resampled to (n, out_px, out_px) float32 (area-averaged when shrinking)."""
    out = np.empty((len(boxes), out_px, out_px), np.float32)
    for i, (top, left, s) in enumerate(boxes):
        interp = cv2.INTER_AREA if s > out_px else cv2.INTER_LINEAR
        out[i] = cv2.resize(img[top : top + s, left : left + s], (out_px, out_px), interpolation=interp)
    return out


def crop_magnification(px_per_um: float, boxes: np.ndarray, out_px: int) -> np.ndarray:
    """px/um of each crop after resampling."""
    return (px_per_um * out_px / boxes[:, 2]).astype(np.float32)


def to_channels(crops: np.ndarray, edge_channel: bool) -> np.ndarray:
    """(n, h, w) crops in [0, 1] -> (n, c, h, w) network input: centred intensity, plus Sobel magnitude."""
    x = crops[:, None] - 0.5
    if not edge_channel:
        return np.ascontiguousarray(x, dtype=np.float32)
    edges = np.empty_like(crops)
    for i, c in enumerate(crops):
        gx = cv2.Sobel(c, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(c, cv2.CV_32F, 0, 1, ksize=3)
        edges[i] = np.sqrt(gx * gx + gy * gy)
    return np.ascontiguousarray(np.concatenate([x, edges[:, None]], axis=1), dtype=np.float32)
